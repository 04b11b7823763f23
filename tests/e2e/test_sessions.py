"""Sessions end to end (README "Sessions"): real pplex processes, real TCP clients, real gRPC workers.

Lifecycle events reach the workers that asked for them, each DISCONNECTED reason from its real
cause; CONNECTED comes before a client's first message; CLOSE, JOIN, LEAVE and group sends act on
clients; `lifecycle: "all"`; a burst of clients gives exactly one event of each kind per client; a
graceful stop (SIGTERM or POST /shutdown) closes clients over the spread window and every one of
them reaches a lifecycle worker as DISCONNECTED `shutdown` before pplex exits 0.
"""
import os
import resource
import selectors
import signal
import socket
import struct
import time

import pytest

from pplex import reasons
from tests.brokers import BrokerProcess, available
from tests.helpers import TRANSPORTS, Client, wait_for
from tests.sessionworker import CONNECTED, DISCONNECTED, MESSAGE, SessionWorker

TOKEN = b"s3cret"


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def framed(payload):
    return struct.pack(">I", len(payload)) + payload


class FramedClient(Client):
    """A client of a pplex with framing_len (4-byte big-endian lengths)."""

    def send_frame(self, payload):
        self.send(framed(payload))

    def recv_frame(self):
        size, = struct.unpack(">I", self.recv_exact(4))
        return self.recv_exact(size)


def reset(client):
    """Close with RST (SO_LINGER 0), not FIN."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def uuid_of(pplex, client):
    """The UUID pplex gave `client` (GET /connections, found by the client's address)."""
    remote = "127.0.0.1:%d" % client.sock.getsockname()[1]

    def find():
        rows = pplex.admin("GET", f"/connections?q={remote}")[1]["connections"]
        return next((row["uuid"] for row in rows if row["remote"] == remote), None)
    return wait_for(find, message=f"{remote} in GET /connections")


def raise_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def test_each_reason_reaches_the_worker_from_its_real_cause(start_pplex, start_worker, tmp_path):
    """Every code of pplex/reasons.py, each caused for real, each one DISCONNECTED after one CONNECTED
    (auth_failed alone); the client that is left gets `shutdown` on SIGTERM, and pplex exits 0."""
    worker = start_worker(SessionWorker())
    plugin_dir = tmp_path / "plugin"
    (plugin_dir / "tester_pkg").mkdir(parents=True)
    (plugin_dir / "tester_pkg" / "__init__.py").write_text(
        "from pplex import hookimpl\n\n"
        "_context = []\n\n"
        "@hookimpl\n"
        "def pplex_configure(context):\n"
        "    _context[:] = [context]\n\n"
        "@hookimpl\n"
        "def pplex_balance(conn, payload, candidates):\n"
        "    if payload.startswith(b'crash'):\n"
        "        raise RuntimeError('a balancer bug')\n"
        "    if payload.startswith(b'kick'):\n"
        "        context = _context[0]\n"
        "        context.reactor.call_soon(context.proxy.close, conn, 'kicked by the test plugin')\n"
        "    return candidates[0]\n")
    dist = plugin_dir / "tester-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tester\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pplex.plugins]\ntester = tester_pkg\n")
    spec = {"host": "127.0.0.1", "port": worker.port, "max_message_bytes": 65536}
    pplex = start_pplex(config={
        "upstream": [spec],
        "server": {"client_buffer_limit": 65536, "client_buffer_high": 16384, "client_buffer_low": 4096,
                   "max_pending_bytes": 2048, "eof_linger": 0.1, "shutdown_spread": 0.2},
        "plugins": {"framing_len": {"max_frame_bytes": 4096}, "auth_token": {"tokens": [TOKEN.decode()]},
                    "tester": {}},
    }, env={"PYTHONPATH": str(plugin_dir)})
    pplex.wait_ready_upstreams(1)
    seen = {}

    def joined(client=None):
        client = client or FramedClient(pplex.port)
        client.send_frame(TOKEN)
        client.send_frame(b"whoami")
        return client, client.recv_frame().decode()

    def gone(uuid, reason):
        wait_for(lambda: worker.reasons(uuid), message=f"the DISCONNECTED ({reason}) of {uuid}")
        seen[reason] = uuid

    client, uuid = joined()
    client.sock.shutdown(socket.SHUT_WR)
    gone(uuid, reasons.CLIENT_CLOSED)
    client, uuid = joined()
    reset(client)
    gone(uuid, reasons.CLIENT_RESET)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", pplex.port))
    client = FramedClient.__new__(FramedClient)
    client.sock, client.buffer = slow, b""
    client, uuid = joined(client)
    client.send_frame(b"flood:400:32768")  # 12.5 MiB it never reads
    gone(uuid, reasons.SLOW_CONSUMER)
    client, uuid = joined()
    client.send(struct.pack(">I", 8192))  # a frame over max_frame_bytes
    gone(uuid, reasons.PROTOCOL_ERROR)
    intruder = FramedClient(pplex.port)
    uuid = uuid_of(pplex, intruder)
    intruder.send_frame(b"not the token")
    gone(uuid, reasons.AUTH_FAILED)
    client, uuid = joined()
    client.send_frame(b"close:bye")
    assert client.recv_frame() == b"bye" and client.is_closed_by_peer()
    gone(uuid, reasons.CLOSED_BY_WORKER)
    client, uuid = joined()
    assert pplex.admin("DELETE", f"/connections/{uuid}")[0] == 200
    gone(uuid, reasons.CLOSED_BY_ADMIN)
    client, uuid = joined()
    client.send_frame(b"crash")
    gone(uuid, reasons.INTERNAL_ERROR)
    client, uuid = joined()
    client.send_frame(b"kick")
    gone(uuid, reasons.CLOSED_BY_PLUGIN)
    staying, staying_uuid = joined()
    # no_upstream: no worker ready, more than max_pending_bytes waiting. Its DISCONNECTED waits for a
    # lifecycle worker, and goes to the worker once it is back.
    client, uuid = joined()
    assert pplex.admin("DELETE", "/upstreams/u1")[0] == 200
    for _ in range(3):
        client.send_frame(b"w" * 1000)
    assert client.is_closed_by_peer()
    assert pplex.admin("POST", "/upstreams", spec)[0] == 201
    gone(uuid, reasons.NO_UPSTREAM)
    os.killpg(pplex.proc.pid, signal.SIGTERM)
    gone(staying_uuid, reasons.SHUTDOWN)
    assert pplex.proc.wait(10) == 0

    idle_worker = start_worker(SessionWorker())
    idle = start_pplex("--upstream", f"127.0.0.1:{idle_worker.port}", config={"server": {"idle_timeout": 0.5}})
    idle.wait_ready_upstreams(1)
    client = idle.client()
    client.send(b"whoami")
    uuid = client.recv_exact(36).decode()
    wait_for(lambda: idle_worker.reasons(uuid), message="the idle client's DISCONNECTED")
    seen[reasons.IDLE_TIMEOUT] = uuid

    assert sorted(seen) == sorted(reasons.REASONS)
    for reason, uuid in seen.items():
        events = [kind for kind in (idle_worker if reason == reasons.IDLE_TIMEOUT else worker).kinds(uuid)
                  if kind != MESSAGE]
        expected = [DISCONNECTED] if reason == reasons.AUTH_FAILED else [CONNECTED, DISCONNECTED]
        assert events == expected, (reason, events)
        holder = idle_worker if reason == reasons.IDLE_TIMEOUT else worker
        assert holder.reasons(uuid) == [reason]


def test_connected_first_then_close_and_groups(start_pplex, start_worker, transport):
    """On each transport: CONNECTED with its metadata before a client's first message on the same
    stream; CLOSE writes its payload then closes; JOIN, SEND to a group, LEAVE, a member that goes;
    GET /groups and the groups of each client in GET /connections."""
    worker = start_worker(SessionWorker())
    base = start_worker()  # a base-contract worker beside it: it never sees an event
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", "--upstream", f"127.0.0.1:{base.port}",
                        "--plugins", "route_sticky")
    pplex.wait_ready_upstreams(2)
    upstreams = {u["port"]: u for u in pplex.upstreams()}
    assert upstreams[worker.port]["lifecycle"] is True and upstreams[base.port]["lifecycle"] is False
    clients = [pplex.client() for _ in range(20)]
    for index, client in enumerate(clients):
        client.send(b"first %d" % index)  # at once: its CONNECTED must already be ahead of it
    for index, client in enumerate(clients):
        assert client.recv_exact(len(b"first %d" % index)) == b"first %d" % index
    node = pplex.stats()["node"]
    rows = {row["uuid"]: row for row in pplex.admin("GET", "/connections")[1]["connections"]}
    assert len(rows) == 20
    for uuid, row in rows.items():
        inputs = worker.inputs(uuid)
        # route_sticky keeps each client on the worker of its CONNECTED: the lifecycle one.
        assert [kind for kind, _ in inputs] == [CONNECTED, MESSAGE], inputs
        meta = inputs[0][1]
        assert f"{meta['remote_addr']}:{meta['remote_port']}" == row["remote"]
        assert (meta["local_addr"], meta["local_port"], meta["node"]) == ("127.0.0.1", str(pplex.port), node)
    assert base.count() == 0

    a, b, outsider = (pplex.client() for _ in range(3))
    a.send(b"whoami")
    a_uuid = a.recv_exact(36).decode()
    for client in (a, b):
        client.send(b"join:room")
        assert client.recv_exact(2) == b"ok"
    assert pplex.admin("GET", "/groups")[1]["groups"] == [{"name": "room", "members": 2}]
    listed = pplex.admin("GET", f"/connections/{a_uuid}")[1]
    assert listed["groups"] == ["room"]
    outsider.send(b"group:room:hello room")
    assert a.recv_exact(10) == b"hello room" and b.recv_exact(10) == b"hello room"
    b.send(b"leave:room")
    assert b.recv_exact(2) == b"ok"
    outsider.send(b"group:room:only a")
    assert a.recv_exact(6) == b"only a"
    reset(a)
    wait_for(lambda: worker.reasons(a_uuid), message="the DISCONNECTED of the member that went")
    assert worker.reasons(a_uuid) == [reasons.CLIENT_RESET]
    assert pplex.admin("GET", "/groups")[1]["groups"] == []  # it left the room when it went
    b.send(b"join:room")
    assert b.recv_exact(2) == b"ok"
    outsider.send(b"close-group:room:bye room")
    assert b.recv_exact(8) == b"bye room" and b.is_closed_by_peer()
    outsider.send(b"still here")
    assert outsider.recv_exact(10) == b"still here"  # nothing reached it but its own echo

    big = b"g" * 200_000
    leaving = pplex.client()
    leaving.send(b"whoami")
    uuid = leaving.recv_exact(36).decode()
    leaving.send(b"close-big:%d" % len(big))
    assert leaving.recv_exact(len(big)) == big
    assert leaving.is_closed_by_peer()
    assert leaving.sock.recv(1) == b""  # a clean close (FIN), not a reset
    wait_for(lambda: worker.reasons(uuid), message="the DISCONNECTED of the closed client")
    assert worker.kinds(uuid) == [CONNECTED, MESSAGE, MESSAGE, DISCONNECTED]
    assert worker.reasons(uuid) == [reasons.CLOSED_BY_WORKER]
    stats = pplex.stats()
    assert stats["actions"] == {"join": 3, "leave": 1, "send": 2, "close": 2}
    assert stats["lifecycle_events"] == {"connected": 24, "disconnected": 3}


def test_lifecycle_all_sends_every_event_to_every_ready_lifecycle_worker(start_pplex, start_worker):
    workers = [start_worker(SessionWorker(f"l{i}")) for i in range(2)]
    base = start_worker()
    pplex = start_pplex(*(arg for w in (*workers, base) for arg in ("--upstream", f"127.0.0.1:{w.port}")),
                        config={"server": {"lifecycle": "all", "eof_linger": 0}})
    pplex.wait_ready_upstreams(3)
    clients = [pplex.client() for _ in range(5)]
    for client in clients:
        client.send(b"x")
        client.recv_exact(1)
    for client in clients:
        client.close()
    for worker in workers:
        wait_for(lambda: worker.count(DISCONNECTED) == 5, message=f"5 DISCONNECTED at {worker.name}")
        assert worker.count(CONNECTED) == 5
        assert sorted(worker.uuids(CONNECTED)) == sorted(worker.uuids(DISCONNECTED))
    assert workers[0].uuids(CONNECTED) == workers[1].uuids(CONNECTED)
    assert base.count() == 5 - sum(w.count(MESSAGE) for w in workers)  # messages still spread over all 3


def test_a_burst_of_1000_clients_gives_exactly_1000_of_each_event(start_pplex, start_worker, transport):
    raise_file_limit()
    worker = start_worker(SessionWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", config={"server": {"eof_linger": 0}})
    pplex.wait_ready_upstreams(1)
    clients = []
    for _ in range(1000):
        clients.append(socket.create_connection(("127.0.0.1", pplex.port)))
    wait_for(lambda: worker.count(CONNECTED) == 1000, 30, message="1000 CONNECTED")
    for index, sock in enumerate(clients):
        if index % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: worker.count(DISCONNECTED) == 1000, 30, message="1000 DISCONNECTED")
    connected, disconnected = worker.uuids(CONNECTED), worker.uuids(DISCONNECTED)
    assert len(set(connected)) == 1000 and sorted(connected) == sorted(disconnected)
    reasons_seen = {data for _, kind, _, data in worker.inputs() if kind == DISCONNECTED}
    assert reasons_seen <= {reasons.CLIENT_CLOSED, reasons.CLIENT_RESET}
    assert pplex.stats()["lifecycle_events"] == {"connected": 1000, "disconnected": 1000}


@pytest.mark.parametrize("transport", ["h2"])
def test_sigterm_with_1000_clients_spreads_the_closes_and_every_one_reaches_the_worker(
        start_pplex, start_worker, transport):
    """/readyz says 503 at once; clients are closed over server.shutdown_spread; every one of them
    reaches the lifecycle worker as DISCONNECTED shutdown before pplex exits 0."""
    raise_file_limit()
    spread = 2.0
    worker = start_worker(SessionWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", config={"server": {"shutdown_spread": spread}})
    pplex.wait_ready_upstreams(1)
    selector = selectors.DefaultSelector()
    for _ in range(1000):
        sock = socket.create_connection(("127.0.0.1", pplex.port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    wait_for(lambda: worker.count(CONNECTED) == 1000, 30, message="1000 CONNECTED")
    assert pplex.admin("GET", "/readyz")[0] == 200
    os.killpg(pplex.proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    status = pplex.admin("GET", "/readyz")[0]
    readyz_after = time.monotonic() - signalled
    assert status == 503
    closed_at = []
    deadline = signalled + spread + 10
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                closed_at.append(time.monotonic() - signalled)
                selector.unregister(key.fileobj)
                key.fileobj.close()
    assert len(closed_at) == 1000
    assert pplex.proc.wait(15) == 0
    assert worker.count(DISCONNECTED) == 1000  # all there when pplex exits: nothing left to wait for
    assert {data for _, kind, _, data in worker.inputs() if kind == DISCONNECTED} == {reasons.SHUTDOWN}
    first, last = min(closed_at), max(closed_at)
    print(f"\nSIGTERM, 1000 clients, shutdown_spread {spread:g} s ({transport}): /readyz 503 after "
          f"{readyz_after * 1000:.1f} ms; first close {first * 1000:.0f} ms, last {last * 1000:.0f} ms, "
          f"spread {last - first:.2f} s")
    assert last - first > spread / 2  # spread out, not at once
    assert last < spread + 3          # and within the window (plus eof_linger and a loaded machine)


def test_post_shutdown_needs_the_token_and_stops_like_sigterm(start_pplex, start_worker):
    worker = start_worker(SessionWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"shutdown_spread": 0.2}, "management_server": {"token": "adm"}})
    wait_for(lambda: pplex.admin("GET", "/readyz", token="adm")[0] == 200, message="ready")
    clients = [pplex.client() for _ in range(10)]
    wait_for(lambda: worker.count(CONNECTED) == 10, message="10 CONNECTED")
    assert pplex.admin("POST", "/shutdown")[0] == 401
    assert worker.count(DISCONNECTED) == 0
    status, body = pplex.admin("POST", "/shutdown", token="adm")
    assert status == 202 and body["clients"] == 10 and body["status"] == "shutting down"
    assert pplex.admin("GET", "/readyz", token="adm")[0] == 503
    for client in clients:
        assert client.is_closed_by_peer()
    assert pplex.proc.wait(10) == 0
    assert worker.count(DISCONNECTED) == 10
    assert {data for _, kind, _, data in worker.inputs() if kind == DISCONNECTED} == {reasons.SHUTDOWN}


@pytest.mark.parametrize("transport", ["grpcio"])
def test_group_actions_and_actions_on_another_nodes_client_cross_the_cluster(start_pplex, start_worker, tmp_path):
    """Two nodes on NATS, one worker streaming from both: a group SEND is applied on each node to its
    own members; a JOIN or CLOSE for another node's client goes to its owner."""
    if not available("nats"):
        pytest.skip("nats-server not installed (./dev test installs it)")
    broker = BrokerProcess("nats", tmp_path)
    try:
        worker = start_worker(SessionWorker())
        nodes = {name: start_pplex("--upstream", f"127.0.0.1:{worker.port}", config={"cluster": {
            "broker": broker.url, "node": name, "heartbeat": 0.2, "dead_after": 1}}) for name in ("a", "b")}
        for pplex in nodes.values():
            pplex.wait_ready_upstreams(1)
            wait_for(lambda: len(pplex.admin("GET", "/cluster")[1]["nodes"]) == 2, 10, message="both nodes")
        x, y = nodes["a"].client(), nodes["b"].client()
        y.send(b"whoami")
        y_uuid = y.recv_exact(36).decode()
        y.send(b"join:room")
        assert y.recv_exact(2) == b"ok"
        x.send(b"group:room:hello from a")  # on node a's stream: a has no member, b has y
        assert y.recv_exact(12) == b"hello from a"
        x.send(f"join-other:{y_uuid}:room2".encode())
        assert x.recv_exact(2) == b"ok"
        wait_for(lambda: nodes["b"].admin("GET", "/groups")[1]["groups"] != [{"name": "room", "members": 1}],
                 message="room2 on node b")
        assert sorted(g["name"] for g in nodes["b"].admin("GET", "/groups")[1]["groups"]) == ["room", "room2"]
        assert nodes["a"].admin("GET", "/groups")[1]["groups"] == []  # groups live where their members are
        x.send(f"close-other:{y_uuid}:bye from a".encode())
        assert x.recv_exact(2) == b"ok"
        assert y.recv_exact(10) == b"bye from a"
        assert y.is_closed_by_peer()
        wait_for(lambda: worker.reasons(y_uuid), message="y's DISCONNECTED")
        assert worker.reasons(y_uuid) == [reasons.CLOSED_BY_WORKER]
        assert nodes["b"].stats()["cluster"]["relayed_in"] == {"action": 3}
    finally:
        broker.stop()
