"""One fault stays with its owner: a raising plugin, a flapping, stuck or departing worker (fault isolation).

Real pplex processes, real gRPC workers (grpcio servers in this process, or
custom servicers misbehaving on purpose), real TCP clients; every test runs
on both transports.
"""
import concurrent.futures
import struct
import threading
import time

import grpc
import pytest

from pplex._proto import upstream_pb2, upstream_pb2_grpc
from pplex.timestamps import rfc3339_now
from pplex.worker import EchoWorker, Worker
from tests.e2e.test_failover import SteadyClients
from tests.helpers import TRANSPORTS, wait_for


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def install_plugin(tmp_path, name, source):
    """A plugin package on disk with its entry point, as a third party ships one."""
    root = tmp_path / "plugins"
    (root / f"{name}_pkg").mkdir(parents=True)
    (root / f"{name}_pkg" / "__init__.py").write_text(source)
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[pplex.plugins]\n{name} = {name}_pkg\n")
    return {"PYTHONPATH": str(root)}


class Servicer(upstream_pb2_grpc.UpstreamPeerServiceServicer):
    """A worker that is ready and live, with a data stream the subclass decides."""

    def ready(self, request, context):
        return upstream_pb2.ReadyResult(time=rfc3339_now(), ready=True)

    def live(self, request_iterator, context):
        for _ in request_iterator:
            yield upstream_pb2.LiveResult(time=rfc3339_now(), live=True)


def serve(servicer):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
    upstream_pb2_grpc.add_UpstreamPeerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def servers():
    started = []

    def start(servicer):
        server, port = serve(servicer)
        started.append(server)
        return port

    yield start
    for server in started:
        server.stop(0)


# -- an exception in one place stops nothing else ----------------------------------------------
class PairWorker(Worker):
    """`hello` registers the sender as the witness; `big` replies 70,000 bytes to its sender, then
    `after` to the witness, in the same burst."""

    def __init__(self):
        super().__init__()
        self.witness = None

    def on_message(self, stream, client_uuid, payload):
        if payload == b"hello":
            self.witness = client_uuid
            stream.reply(client_uuid, b"hi")
        elif payload == b"big":
            stream.reply(client_uuid, b"B" * 70_000)
            stream.reply(self.witness, b"after")
        else:
            stream.reply(client_uuid, payload)


def frame2(payload):
    return struct.pack(">H", len(payload)) + payload


def test_a_reply_the_framing_cannot_encode_drops_only_that_reply(start_pplex, start_worker):
    worker = start_worker(PairWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"plugins": {"framing_len": {"width": 2}}})
    pplex.wait_ready_upstreams(1)
    witness, asker = pplex.client(), pplex.client()
    witness.send(frame2(b"hello"))
    assert witness.recv_exact(4) == frame2(b"hi")
    rounds = 300  # 300 x 70 KB: well past the stream's receive window, which must be given back
    asker.send(b"".join(frame2(b"big") for _ in range(rounds)))
    assert witness.recv_exact(7 * rounds) == frame2(b"after") * rounds
    asker.send(frame2(b"still here"))
    assert asker.recv_exact(12) == frame2(b"still here")  # the asker was not closed either
    stats = pplex.stats()
    assert stats["drops"]["reply_not_encodable"] == rounds
    assert stats["errors"]["plugin framing encode"] == rounds
    assert "does not fit a 2-byte length prefix" in pplex.log()


def test_an_observer_that_raises_leaves_no_worker_half_out_of_rotation(start_pplex, start_worker, tmp_path):
    env = install_plugin(tmp_path, "grumpy", (
        "from pplex import hookimpl\n\n"
        "@hookimpl\n"
        "def pplex_upstream_lost(upstream, reason):\n"
        "    raise RuntimeError('observer bug')\n"))
    first = start_worker()
    spare = start_worker()
    port = first.port
    pplex = start_pplex("--upstream", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{spare.port}",
                        "--plugins", "grumpy", env=env)
    pplex.wait_ready_upstreams(2)
    first.stop(grace=0)
    wait_for(lambda: pplex.upstreams()[0]["state"] == "unready", timeout=10, message="the lost worker unready")
    client = pplex.client()
    for index in range(20):  # every message goes to the worker still in rotation, none to the lost one
        client.send(b"m%d\n" % index)
        assert client.recv_line() == b"m%d" % index
    start_worker(port=port)
    wait_for(lambda: pplex.upstreams()[0]["state"] == "ready", timeout=15, message="the worker back in rotation")
    assert pplex.stats()["errors"]["plugin pplex_upstream_lost"] >= 1
    assert "observer bug" in pplex.log()


def test_an_error_while_writing_to_one_client_leaves_the_others_written(start_pplex, start_worker, tmp_path):
    env = install_plugin(tmp_path, "sloppy", (
        "from pplex import hookimpl\n\n"
        "class Lines:\n"
        "    merges = False\n"
        "    def decode(self, conn, data):\n"
        "        return [line + b'\\n' for line in data.split(b'\\n') if line]\n"
        "    def encode(self, payload):\n"
        "        return payload.decode() if payload == b'poison\\n' else payload  # a str: a bug\n\n"
        "@hookimpl\n"
        "def pplex_framing():\n"
        "    return Lines()\n"))
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", "--plugins", "sloppy", env=env)
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(6)]
    wait_for(lambda: pplex.stats()["connections_open"] == 6, message="6 clients")
    clients[0].send(b"broadcast:0:poison\n")  # the worker broadcasts it: every client's write fails alone
    for client in clients:
        assert client.is_closed_by_peer(timeout=10)
    # The MARK broadcast right after it is not lost for a new client: the reactor went on.
    fresh = pplex.client()
    fresh.send(b"after\n")
    assert fresh.recv_line() == b"after"
    stats = pplex.stats()
    assert stats["closes"]["internal_error"] == 6 and stats["errors"]["client flush"] == 6


# -- a worker that flaps, stalls or leaves -------------------------------------------------------
class Flapping(Servicer):
    """Ready and live, but its data stream fails the moment it opens."""

    def bidirectionalStreaming(self, request_iterator, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "broken on purpose")


@pytest.mark.parametrize("redeliver", [False, True])
def test_a_flapping_worker_is_let_back_less_and_less_often(start_pplex, start_worker, servers, redeliver):
    flapping = servers(Flapping())
    healthy = start_worker(EchoWorker())
    pplex = start_pplex(config={
        "server": {"redeliver_unconfirmed": redeliver},
        "upstream": [{"host": "127.0.0.1", "port": flapping, "alive_timeout": 5},
                     {"host": "127.0.0.1", "port": healthy.port, "alive_timeout": 5}]})
    pplex.wait_ready_upstreams(1)
    clients = SteadyClients(pplex.port, 20, interval=0.02, max_seconds=30)
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 6, timeout=10, interval=0.1, message="6 s of traffic")
    clients.pause_sending = True
    entered = pplex.log().count(f"127.0.0.1:{flapping} ready")
    # Without damping it came back about 12 times a second (70 in 6 s); ejections now double.
    assert 2 <= entered <= 7, f"the flapping worker entered rotation {entered} times in 6 s"
    info = [u for u in pplex.upstreams() if u["port"] == flapping][0]
    assert info["ejections"] >= 2 and "broken on purpose" in info["last_error"]
    sent = sum(clients.sent)
    wait_for(lambda: sum(clients.snapshot()) + pplex.stats()["unconfirmed"] >= sent, timeout=10,
             message="every message answered or counted unconfirmed")
    clients.stop()
    stats = pplex.stats()
    if redeliver:
        assert stats["unconfirmed"] == 0 and sum(clients.snapshot()) == sent
    assert sum(clients.snapshot()) + stats["unconfirmed"] == sent


class StuckWorker(EchoWorker):
    """Takes one message and then never reads its stream again; still answers ready and live."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def on_message(self, stream, client_uuid, payload):
        self.release.wait(30)


def test_a_worker_that_stops_reading_is_ejected_and_its_clients_go_on(start_pplex, start_worker):
    stuck = start_worker(StuckWorker())
    healthy = start_worker(EchoWorker())
    try:
        pplex = start_pplex(config={"upstream": [
            {"host": "127.0.0.1", "port": stuck.port, "alive_timeout": 0.5, "stall_timeout": 1},
            {"host": "127.0.0.1", "port": healthy.port, "alive_timeout": 0.5}]})
        pplex.wait_ready_upstreams(2)
        clients = SteadyClients(pplex.port, 50, interval=0.01, max_seconds=40)
        # 50 clients x 100 lines/s of ~10 bytes... made big enough to fill its flow-control windows.
        filler = pplex.client()
        for _ in range(400):
            filler.send(b"f" * 32768 + b"\n")
        wait_for(lambda: "stalled" in (pplex.upstreams()[0]["last_error"] or ""), timeout=20,
                 message="the stuck worker ejected for a stalled stream")
        assert pplex.upstreams()[0]["state"] != "ready" and pplex.upstreams()[1]["state"] == "ready"
        before = clients.snapshot()
        wait_for(lambda: all(now > then for now, then in zip(clients.snapshot(), before)), timeout=10,
                 message="every client answered again after the ejection")
        clients.stop()
        assert pplex.stats()["rerouted"] > 0
    finally:
        stuck.release.set()


def test_a_worker_that_stops_gracefully_is_drained_and_nothing_is_lost(start_pplex, start_worker):
    leaving, staying = start_worker(EchoWorker()), start_worker(EchoWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{leaving.port}", "--upstream", f"127.0.0.1:{staying.port}")
    pplex.wait_ready_upstreams(2)
    clients = SteadyClients(pplex.port, 50, interval=0.02, max_seconds=30)
    wait_for(lambda: min(clients.snapshot()) >= 5, message="traffic flowing")
    stopping = threading.Thread(target=leaving.server.stop, args=(5,))  # GOAWAY, then 5 s of grace
    stopping.start()
    wait_for(lambda: pplex.upstreams()[0]["state"] == "unready", timeout=10,
             message="the leaving worker drained and out")
    log = pplex.log()
    # A drain (it half-closed its stream and the worker ended it), not an ejection.
    assert "draining: the worker is going away (GOAWAY" in log and "drained (it ended its stream)" in log
    assert "left rotation" not in log and pplex.upstreams()[0]["ejections"] == 0
    clients.pause_sending = True
    sent = sum(clients.sent)
    wait_for(lambda: sum(clients.snapshot()) == sent, timeout=10, message="every message answered")
    stats = pplex.stats()
    clients.stop()
    stopping.join(10)
    assert stats["unconfirmed"] == 0 and stats["drops"] == {}


class Ticker(Servicer):
    """Broadcasts a tick every 50 ms and never ends its stream, even after pplex half-closes it."""

    def bidirectionalStreaming(self, request_iterator, context):
        threading.Thread(target=lambda: [None for _ in request_iterator], daemon=True).start()
        while context.is_active():
            yield upstream_pb2.OutputStreamRequest(time=rfc3339_now(), broadcast=0, payload=b"tick\n")
            time.sleep(0.05)


def test_draining_waits_for_the_end_of_the_stream_not_for_the_first_message(start_pplex, servers):
    port = servers(Ticker())
    pplex = start_pplex(config={"upstream": [{"host": "127.0.0.1", "port": port, "drain_timeout": 2}]})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    assert client.recv_line() == b"tick"
    assert pplex.admin("POST", "/upstreams/u1/drain")[0] == 200
    drained = time.monotonic()
    assert client.recv_line() == b"tick"  # it still speaks while draining
    assert pplex.upstreams()[0]["state"] == "draining"
    wait_for(lambda: pplex.upstreams() == [], timeout=10, message="removed at the drain deadline")
    assert time.monotonic() - drained >= 1.9
    assert "drain_timeout (2 s) passed" in pplex.log()
