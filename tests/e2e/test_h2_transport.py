"""What only the h2 transport has to prove, end to end: choosing it, DNS names, big messages, Go workers.

The core and failover scenarios run on both transports in test_core.py and
test_failover.py. Here: real pplex processes, real sockets, in-process Python
gRPC workers, and the Go reference worker (conformance/go-upstream) in
reference and echo modes.
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import ROOT, PplexProcess, free_port, wait_for

H2 = ("--transport", "h2")
GO_WORKER = os.path.join(ROOT, "conformance", "go-upstream", "bin", "go-upstream")
SALUT = "Salut à toi cher downstream".encode()


def upstream_args(*workers):
    return [a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")]


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
    # PplexProcess, not start_pplex (which always names a transport): the config and the default.
    by_config = PplexProcess(tmp_path, *upstream_args(worker), config={"transport": "grpcio"})
    default = PplexProcess(tmp_path, *upstream_args(worker))
    try:
        by_flag = start_pplex(*H2, *upstream_args(worker), config={"transport": "grpcio"})
        for pplex, used in ((by_config, "grpcio"), (by_flag, "h2"), (default, "h2")):
            pplex.wait_ready_upstreams(1)
            assert f"workers are reached with the {used} transport" in pplex.log()
            client = pplex.client()
            client.send(b"ping\n")
            assert client.recv_line() == b"ping"
    finally:
        by_config.stop()
        default.stop()
    bad = tmp_path / "bad.json"
    bad.write_text('{"transport": "quic"}')
    result = subprocess.run([sys.executable, "-m", "pplex", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"{bad}: transport: ")


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
