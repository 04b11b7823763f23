"""pplex with `--transport h2`: the core and failover scenarios, end to end.

Real pplex processes, real sockets, in-process Python gRPC workers, worker
processes that can be killed or frozen, and the Go reference worker
(conformance/go-upstream) in reference and echo modes.
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.test_failover import SlowReadyWorker, SteadyClients, WorkerProcess
from tests.helpers import ROOT, RecordingWorker, free_port, wait_for

H2 = ("--transport", "h2")
ALL, ACTIVE, NOT_ACTIVE = 0, 1, 2
GO_WORKER = os.path.join(ROOT, "conformance", "go-upstream", "bin", "go-upstream")
SALUT = "Salut à toi cher downstream".encode()


def upstream_args(*workers):
    return [a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")]


@pytest.fixture
def worker_processes():
    started = []

    def start(port=None):
        worker = WorkerProcess(port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.signal(signal.SIGCONT)
        except ProcessLookupError:
            pass
        worker.stop()


class GoWorker:
    def __init__(self, mode):
        self.port = free_port()
        self.proc = subprocess.Popen([GO_WORKER, "--port", str(self.port), "--mode", mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        assert "listening on" in line, line
        # reference mode prints every message: drain stdout so it never blocks
        self.lines = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(5)
        self.proc.stdout.close()


@pytest.fixture
def go_worker():
    # Not a skip: `./dev test` and CI build it before pytest runs.
    assert os.access(GO_WORKER, os.X_OK), f"{GO_WORKER} is missing: bash conformance/go-upstream/build.sh"
    started = []

    def start(mode):
        worker = GoWorker(mode)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def state_of(pplex, port):
    return [u for u in pplex.upstreams() if u["port"] == port][0]


def test_the_config_key_chooses_the_transport_and_the_flag_overrides_it(start_pplex, start_worker, tmp_path):
    worker = start_worker()
    by_config = start_pplex(*upstream_args(worker), config={"transport": "h2"})
    by_flag = start_pplex(*H2, *upstream_args(worker), config={"transport": "grpcio"})
    default = start_pplex(*upstream_args(worker))
    for pplex, used in ((by_config, "h2"), (by_flag, "h2"), (default, "grpcio")):
        pplex.wait_ready_upstreams(1)
        assert f"workers are reached with the {used} transport" in pplex.log()
        client = pplex.client()
        client.send(b"ping\n")
        assert client.recv_line() == b"ping"
    bad = tmp_path / "bad.json"
    bad.write_text('{"transport": "quic"}')
    result = subprocess.run([sys.executable, "-m", "pplex", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"{bad}: transport: ")


def test_fifty_clients_two_workers_replies_in_order(start_pplex, start_worker):
    workers = [start_worker(), start_worker()]
    pplex = start_pplex(*H2, *upstream_args(*workers))
    pplex.wait_ready_upstreams(2)
    clients = [pplex.client() for _ in range(50)]
    rounds = 20
    errors = []

    def talk(index, client):
        try:
            for seq in range(rounds):
                message = f"client {index} message {seq}".encode()
                client.send(message + b"\n")
                assert client.recv_line() == message
        except Exception as error:  # reported below, with the client's number
            errors.append((index, error))

    threads = [threading.Thread(target=talk, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    counts = [w.count() for w in workers]
    assert sum(counts) == 50 * rounds
    assert all(abs(c - 500) <= 50 for c in counts), counts
    # Pipelined: 200 lines in one write come back in order.
    client = clients[0]
    client.send(b"".join(b"p%d\n" % i for i in range(200)))
    assert [client.recv_line() for _ in range(200)] == [b"p%d" % i for i in range(200)]
    upstreams = pplex.upstreams()
    assert all(u["live_rtt_seconds"] is not None and u["ready_probe_seconds"] is not None for u in upstreams)


def test_broadcasts_reach_the_right_clients_once(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*H2, *upstream_args(worker), config={"server": {"active_window": 5.0}})
    pplex.wait_ready_upstreams(1)
    active = [pplex.client() for _ in range(5)]
    quiet = [pplex.client() for _ in range(20)]
    wait_for(lambda: pplex.stats()["connections_open"] == 25, message="25 open connections")
    for client in active:
        client.send(b"hi\n")
        assert client.recv_line() == b"hi"
    active[0].send(f"broadcast:{ALL}:hello everyone\n".encode())
    for client in active + quiet:
        assert client.recv_line() == b"hello everyone"
        assert client.recv_line() == b"MARK"
    active[0].send(f"broadcast:{ACTIVE}:to the active\n".encode())
    for client in active:
        assert client.recv_line() == b"to the active"
        assert client.recv_line() == b"MARK"
    for client in quiet:
        assert client.recv_line() == b"MARK"
    active[0].send(f"broadcast:{NOT_ACTIVE}:to the quiet\n".encode())
    for client in quiet:
        assert client.recv_line() == b"to the quiet"
        assert client.recv_line() == b"MARK"


def test_unknown_uuid_and_no_target_are_counted_not_fatal(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*H2, *upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"unknown\n")
    assert client.recv_line() == b"done"
    client.send(b"notarget\n")
    assert client.recv_line() == b"done"
    assert pplex.stats()["drops"] == {"unknown_uuid": 1, "bad_worker_message": 1}


def test_a_worker_down_at_start_is_retried_and_used_once_up(start_pplex, start_worker):
    port = free_port()
    pplex = start_pplex(*H2, "--upstream", f"127.0.0.1:{port}")
    client = pplex.client()
    client.send(b"early\n")  # waits in pplex: no worker is ready
    wait_for(lambda: pplex.upstreams()[0]["last_error"], message="a failed ready probe")
    assert "cannot connect" in pplex.upstreams()[0]["last_error"]
    assert pplex.upstreams()[0]["state"] in ("connecting", "unready")
    start_worker(port=port)
    client.sock.settimeout(15)
    assert client.recv_line() == b"early"
    assert pplex.upstreams()[0]["state"] == "ready"


def test_dns_names_resolve_off_the_reactor_thread(start_pplex, start_worker):
    """A worker named by a DNS name is reached; a name that does not resolve is an error, not a stall."""
    worker = start_worker()
    pplex = start_pplex(*H2, "--upstream", f"localhost:{worker.port}", "--upstream", "no-such-worker.invalid:5000")
    wait_for(lambda: "cannot resolve" in (state_of(pplex, 5000)["last_error"] or ""),
             message="the unresolvable worker's error")
    wait_for(lambda: state_of(pplex, worker.port)["state"] == "ready", message="the localhost worker ready")
    client = pplex.client()
    client.send(b"by name\n")
    assert client.recv_line() == b"by name"
    assert state_of(pplex, 5000)["state"] in ("connecting", "unready")


def test_not_ready_and_slow_ready_workers_never_get_traffic(start_pplex, start_worker):
    good = start_worker()
    refusing = RecordingWorker("refusing")
    refusing.ready = False
    refusing = start_worker(refusing)
    slow = start_worker(SlowReadyWorker("slow"))
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "ready_timeout": 0.3}
                           for w in (good, refusing, slow)]}
    pplex = start_pplex(*H2, config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    for i in range(30):
        client.send(b"m%d\n" % i)
        assert client.recv_line() == b"m%d" % i
    wait_for(lambda: "DEADLINE_EXCEEDED" in (state_of(pplex, slow.port)["last_error"] or ""),
             message="the slow probe's deadline")
    assert "ready=false" in state_of(pplex, refusing.port)["last_error"]
    for i in range(30):
        client.send(b"n%d\n" % i)
        assert client.recv_line() == b"n%d" % i
    assert good.count() == 60
    assert refusing.count() == 0 and slow.count() == 0
    assert state_of(pplex, slow.port)["state"] != "ready"


def test_sigstop_is_ejected_by_the_live_deadline_and_sigcont_brings_it_back(start_pplex, worker_processes):
    workers = [worker_processes(), worker_processes()]
    alive_timeout = 0.3
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "alive_timeout": alive_timeout,
                            "ready_timeout": 0.5} for w in workers]}
    pplex = start_pplex(*H2, config=config)
    pplex.wait_ready_upstreams(2)
    frozen = workers[0].port
    clients = SteadyClients(pplex.port, 10, interval=0.05)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=10, message="replies flowing")
        workers[0].signal(signal.SIGSTOP)
        wait_for(lambda: state_of(pplex, frozen)["state"] == "unready", timeout=3 * alive_timeout + 1,
                 message="the stopped worker ejected by the live deadline")
        assert "live" in state_of(pplex, frozen)["last_error"]
        after_eject = clients.snapshot()
        wait_for(lambda: all(n >= t + 3 for n, t in zip(clients.snapshot(), after_eject)), timeout=10,
                 message="replies flowing from the other worker")
        workers[0].signal(signal.SIGCONT)
        wait_for(lambda: state_of(pplex, frozen)["state"] == "ready", timeout=10,
                 message="the continued worker back in rotation after a ready probe")
        # ... and it takes traffic again on its fresh stream.
        wait_for(lambda: state_of(pplex, frozen)["messages_routed"] > 0 and
                 all(n >= t + 10 for n, t in zip(clients.snapshot(), after_eject)), timeout=10,
                 message="replies from both workers again")
        assert not any(clients.closed)
    finally:
        clients.stop()


def test_kill_9_one_of_three_workers_under_200_clients(start_pplex, worker_processes):
    workers = [worker_processes() for _ in range(3)]
    alive_timeout = 1.0
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "alive_timeout": alive_timeout}
                           for w in workers]}
    pplex = start_pplex(*H2, config=config)
    pplex.wait_ready_upstreams(3)
    clients = SteadyClients(pplex.port, 200, interval=0.1)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=20, message="every client getting replies")
        killed_at = time.monotonic()
        workers[0].signal(signal.SIGKILL)
        wait_for(lambda: state_of(pplex, workers[0].port)["state"] != "ready",
                 timeout=2 * alive_timeout, message="the killed worker out of rotation")
        left_after = time.monotonic() - killed_at
        after_kill = clients.snapshot()
        wait_for(lambda: all(now >= then + 5 for now, then in zip(clients.snapshot(), after_kill)),
                 timeout=20, message="every client getting replies after the kill")
        assert not any(clients.closed), "a client lost its connection"
        assert left_after < 2 * alive_timeout
    finally:
        clients.stop()
    assert sorted(u["state"] for u in pplex.upstreams()) == ["ready", "ready", "unready"]
    assert pplex.stats()["connections_open"] == 200
    assert "UNAVAILABLE" in state_of(pplex, workers[0].port)["last_error"]


def test_add_under_load_takes_traffic_and_drain_loses_nothing(start_pplex, start_worker):
    first = start_worker()
    pplex = start_pplex(*H2, "--upstream", f"127.0.0.1:{first.port}")
    pplex.wait_ready_upstreams(1)
    clients = SteadyClients(pplex.port, 20, interval=0.02)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=10, message="replies flowing")
        second = start_worker()
        status, body = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": second.port,
                                                             "ready_timeout": 1})
        assert status == 201
        wait_for(lambda: second.count() > 0, timeout=5, message="the added worker taking traffic")
        status, _ = pplex.admin("POST", f"/upstreams/{body['id']}/drain")
        assert status == 200
        wait_for(lambda: body["id"] not in [u["id"] for u in pplex.upstreams()], timeout=10,
                 message="the drained worker removed")
        clients.pause_sending = True
        wait_for(lambda: clients.snapshot() == clients.sent, timeout=10,
                 message="a reply for every message sent")
        assert not any(clients.closed)
        assert pplex.stats()["drops"] == {}
        assert pplex.stats().get("unconfirmed", 0) == 0
    finally:
        clients.stop()


def _frame(body):
    return struct.pack(">I", len(body)) + body


def _recv_frame(client):
    (length,) = struct.unpack(">I", client.recv_exact(4))
    return client.recv_exact(length)


def test_a_one_mib_payload_with_framing_len(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*H2, "--plugins", "framing_len", *upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    body = os.urandom(1024 * 1024)
    client.send(_frame(body))
    assert _recv_frame(client) == body
    client.send(_frame(b"small after big"))
    assert _recv_frame(client) == b"small after big"
    assert [len(p) for _, p in worker.received] == [len(body), 15]


def test_go_reference_worker_alternates_uuid_and_broadcast_all(start_pplex, go_worker):
    worker = go_worker("reference")
    pplex = start_pplex(*H2, "--upstream", f"127.0.0.1:{worker.port}")
    pplex.wait_ready_upstreams(1)
    sender, other = pplex.client(), pplex.client()
    wait_for(lambda: pplex.stats()["connections_open"] == 2, message="2 open connections")
    for round_ in range(3):
        sender.send(b"odd %d" % round_)
        assert sender.recv_exact(len(SALUT)) == SALUT           # 1st, 3rd, ...: to the sender
        sender.send(b"even %d" % round_)
        assert sender.recv_exact(len(SALUT)) == SALUT           # 2nd, 4th, ...: BROADCAST_ALL
        assert other.recv_exact(len(SALUT)) == SALUT
    other.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        other.sock.recv(1)  # the uuid-targeted ones never reached it
    stats = pplex.stats()
    assert stats["drops"] == {} and stats["broadcasts"] == 3


def test_go_echo_worker_with_a_short_heartbeat_and_a_clean_drain(start_pplex, go_worker):
    worker = go_worker("echo")
    config = {"upstream": [{"host": "127.0.0.1", "port": worker.port, "alive_timeout": 0.1}]}
    pplex = start_pplex(*H2, "--plugins", "framing_len", config=config)
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(20)]
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < 1.0 or rounds < 5:  # well past several heartbeats
        for i, client in enumerate(clients):
            client.send(_frame(b"c%d r%d" % (i, rounds)))
        for i, client in enumerate(clients):
            assert _recv_frame(client) == b"c%d r%d" % (i, rounds)
        rounds += 1
    big = os.urandom(1024 * 1024)
    clients[0].send(_frame(big))
    assert _recv_frame(clients[0]) == big
    upstream = pplex.upstreams()[0]
    assert upstream["state"] == "ready" and upstream["last_error"] is None
    status, _ = pplex.admin("POST", f"/upstreams/{upstream['id']}/drain")
    assert status == 200
    wait_for(lambda: pplex.upstreams() == [], message="the drained worker removed")
    log = pplex.log()
    assert "drained" in log and "live check failed" not in log and "left rotation" not in log
