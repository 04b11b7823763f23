"""The edges where pplex ends things: closing, shutting down, sizes, file descriptors, bad numbers, dead peers.

Real pplex processes on 127.0.0.1, real gRPC workers, real TCP clients; the
tests about links run on both transports.
"""
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from pplex.worker import EchoWorker, Worker
from tests.helpers import ROOT, TRANSPORTS, PplexProcess, wait_for

MiB = 1024 * 1024


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


class BulkWorker(Worker):
    """`bulk N`: N replies of 256 KiB to the sender; `late MS`: one reply after MS milliseconds."""

    def on_message(self, stream, client_uuid, payload):
        command, _, number = payload.strip().partition(b" ")
        if command == b"bulk":
            for index in range(int(number)):
                stream.reply(client_uuid, bytes([65 + index % 26]) * 262144)
        elif command == b"late":
            threading.Timer(int(number) / 1000, stream.reply, (client_uuid, b"late reply\n")).start()
        else:
            stream.reply(client_uuid, payload)


# -- closing without silent loss ----------------------------------------------------------------
def test_after_a_half_close_a_large_reply_read_steadily_arrives_whole(start_pplex, start_worker):
    worker = start_worker(BulkWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"eof_linger": 0.3, "eof_stall_timeout": 1}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(b"bulk 40")
    client.sock.shutdown(socket.SHUT_WR)
    received = bytearray()
    started = time.monotonic()
    client.sock.settimeout(10)
    while True:  # ~3 MB/s: slow, steady, and longer than the linger and the stall deadline together
        chunk = client.sock.recv(32768)
        if not chunk:
            break
        received += chunk
        time.sleep(0.01)
    assert len(received) == 40 * 262144, "the whole reply, then a clean end of stream"
    assert time.monotonic() - started > 1.5
    assert pplex.stats()["closes"] == {"client_closed": 1}


def test_a_half_closed_client_that_stops_reading_gets_a_reset_not_a_clean_close(start_pplex, start_worker):
    worker = start_worker(BulkWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"eof_linger": 0.2, "eof_stall_timeout": 0.5}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.send(b"bulk 40")
    client.sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: pplex.stats()["closes"].get("slow_consumer") == 1, timeout=10,
             message="pplex gave up on the client that stopped reading")
    client.sock.settimeout(5)
    with pytest.raises(ConnectionResetError):  # what it did get ends in a reset: it can tell
        while client.sock.recv(1 << 20):
            pass
    assert "stopped reading after its half-close" in pplex.log()


def test_sigterm_stops_accepting_delivers_what_is_in_flight_then_exits_0(start_pplex, start_worker):
    worker = start_worker(BulkWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"shutdown_spread": 0.5, "eof_linger": 1.0, "shutdown_grace": 3}})
    pplex.wait_ready_upstreams(1)
    assert pplex.admin("GET", "/readyz")[0] == 200
    waiting = pplex.client()
    waiting.send(b"late 400\n")  # its reply is still at the worker when SIGTERM comes
    wait_for(lambda: pplex.stats()["messages_in"] == 1, message="the message at the worker")
    os.killpg(pplex.proc.pid, signal.SIGTERM)
    wait_for(lambda: pplex.admin("GET", "/readyz")[0] == 503, timeout=2, message="/readyz 503 at once")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pplex.port), timeout=2)  # no longer accepting
    assert waiting.recv_line() == b"late reply"
    assert waiting.is_closed_by_peer(timeout=5)
    assert pplex.proc.wait(10) == 0
    assert "shutting down" in pplex.log()


def test_a_second_sigterm_stops_at_once(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", config={"server": {"shutdown_spread": 60}})
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(5)]
    wait_for(lambda: pplex.stats()["connections_open"] == 5, message="5 clients")
    os.killpg(pplex.proc.pid, signal.SIGTERM)
    wait_for(lambda: "stopping gracefully" in pplex.log(), message="the first SIGTERM taken")
    os.killpg(pplex.proc.pid, signal.SIGTERM)
    assert pplex.proc.wait(5) == 0
    for client in clients:
        assert client.is_closed_by_peer(timeout=2)


# -- sizes ----------------------------------------------------------------------------------------
def test_a_frame_above_the_upstream_message_limit_closes_that_client_alone(start_pplex, start_worker):
    worker = start_worker(EchoWorker())
    pplex = start_pplex(config={"plugins": {"framing_len": {"max_frame_bytes": 4 * MiB}}})
    status, _ = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port,
                                                      "max_message_bytes": 1 * MiB})
    assert status == 201
    pplex.wait_ready_upstreams(1)
    big, small = pplex.client(), pplex.client()
    big.send(struct.pack(">I", 2 * MiB) + b"z" * (2 * MiB))
    assert big.is_closed_by_peer(timeout=10)
    small.send(struct.pack(">I", 5) + b"hello")
    assert small.recv_exact(9) == struct.pack(">I", 5) + b"hello"
    assert pplex.stats()["closes"] == {"protocol_error": 1}
    assert pplex.upstreams()[0]["state"] == "ready"  # the stream every client shares is untouched
    assert "above max_message_bytes (1048576)" in pplex.log()


def test_a_plugin_frame_limit_above_the_message_limit_is_a_config_error(tmp_path):
    config = tmp_path / "pplex.json"
    config.write_text(json.dumps({"plugins": {"framing_line": {"max_frame_bytes": 8 * MiB}},
                                  "upstream": [{"host": "127.0.0.1", "port": 50051}]}))
    done = subprocess.run([sys.executable, "-m", "pplex", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"{config}: plugins.framing_line.max_frame_bytes: must not be above the "
                                   "upstreams' max_message_bytes (4194304) (got 8388608)")


# -- bad numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, status, words", [
    (b'{"host": "127.0.0.1", "port": 5000, "alive_timeout": NaN}', 400, "NaN is not a JSON number"),
    (b'{"host": "127.0.0.1", "port": 5000, "ready_timeout": Infinity}', 400, "Infinity is not a JSON number"),
    (b'{"host": "127.0.0.1", "port": 5000, "alive_timeout": 1e999}', 422, "alive_timeout: must be a finite number"),
    (b'{"host": "127.0.0.1", "port": 5000, "ready_timeout": -1e999}', 422, "ready_timeout: must be a finite"),
    (b'{"host": "127.0.0.1", "port": 5000, "stall_timeout": 1e9}', 422, "stall_timeout: must be greater than 0"),
])
def test_non_finite_or_out_of_range_numbers_are_4xx_and_nothing_runs(start_pplex, raw, status, words):
    pplex = start_pplex()
    got, body = pplex.admin("POST", "/upstream/add", raw=raw)
    assert got == status and words in body["error"]
    assert pplex.upstreams() == [] and pplex.proc.poll() is None


@pytest.mark.parametrize("text", ['{"upstream": [{"host": "a", "port": 1, "alive_timeout": NaN}]}',
                                  '{"upstream": [{"host": "a", "port": 1, "ready_timeout": 1e999}]}'])
def test_non_finite_numbers_in_the_config_exit_2_with_the_path(tmp_path, text):
    config = tmp_path / "pplex.json"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "pplex", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert str(config) in done.stderr and ("NaN" in done.stderr or "upstream[0].ready_timeout" in done.stderr)


def test_admin_requests_of_any_shape_get_json_4xx(start_pplex):
    pplex = start_pplex()
    cases = [
        ("POST", "/upstream/add", b"\xff\xfe\x00garbage"),
        ("POST", "/upstream/add", b'{"host": {"nested": [1, 2]}, "port": "x"}'),
        ("POST", "/upstream/add", b"x" * (200 * 1024)),  # above max_body_bytes: refused before it is read
        ("POST", "/upstream/add", b"[" * 30000),           # nested too deeply for the parser
        ("POST", "/upstream/add", b'{"a":' * 10000 + b"1" + b"}" * 10000),
        ("GET", "/connections?limit=-1&offset=1e999", None),
        ("GET", "/connections?limit=%D9%A3", None),           # an Arabic-Indic 3: digits are ASCII only
        ("GET", "/connections?offset=1_0", None),
        ("GET", "/groups?limit=" + "9" * 5000, None),
        ("POST", "/upstream/add", b'{"host": "127.0.0.1", "port": 1, "alive_timeout": 1' + b"0" * 400 + b"}"),
        ("GET", "/connections?q=" + "x" * 500, None),
        ("DELETE", "/upstreams/%00%ff", None),
        ("GET", "/%ff%fe/../../etc/passwd", None),
    ]
    for method, path, raw in cases:
        status, body = pplex.admin(method, path, raw=raw)
        assert 400 <= status < 500, (method, path, status, body)
        assert isinstance(body, dict) and body["error"], (method, path, body)
    # A malformed request line and an oversized header: Waitress's own refusals are JSON too.
    for request in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"y" * 100_000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", pplex.admin_port), timeout=5) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1][:1] == b"4" and b"application/json" in head, head
        assert "error" in json.loads(body)
    assert pplex.proc.poll() is None and "Traceback" not in pplex.log()


@pytest.mark.parametrize("transport", ["h2"])   # the admin API is the same on both
def test_half_sent_admin_requests_cannot_lock_out_healthz(start_pplex):
    """Waitress's default (100 connections, 120 s idle) let 100 half-sent requests lock out the probes."""
    pplex = start_pplex(config={"management_server": {"connection_limit": 20, "idle_timeout": 1}})
    held = []
    try:
        for _ in range(60):   # three times the limit: the rest wait in the listen backlog
            sock = socket.create_connection(("127.0.0.1", pplex.admin_port), timeout=5)
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            held.append(sock)
        # Idle ones are closed after idle_timeout, so the probe gets through within seconds.
        wait_for(lambda: pplex.admin("GET", "/healthz") == (200, {"status": "ok"}), timeout=15,
                 message="/healthz while 60 half-sent requests are open")
        first = held[0]
        first.settimeout(5)
        assert first.recv(1024) == b""   # closed by pplex, not by us
    finally:
        for sock in held:
            sock.close()
    # With the defaults (1,000 connections), 150 of them do not even delay it.
    pplex = start_pplex()
    held = [socket.create_connection(("127.0.0.1", pplex.admin_port), timeout=5) for _ in range(150)]
    try:
        for sock in held:
            sock.sendall(b"GET /stats HTTP/1.1\r\n")
        assert pplex.admin("GET", "/healthz") == (200, {"status": "ok"})
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in pplex.log()


# -- file descriptors ------------------------------------------------------------------------------
def test_the_admin_api_answers_with_descriptors_above_1023(start_pplex, start_worker):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}")
    pplex.wait_ready_upstreams(1)
    socks = [socket.create_connection(("127.0.0.1", pplex.port)) for _ in range(1200)]
    try:
        wait_for(lambda: pplex.stats()["connections_open"] == 1200, timeout=20, message="1,200 clients")
        assert pplex.admin("GET", "/healthz") == (200, {"status": "ok"})
        assert pplex.admin("GET", "/connections?limit=5")[1]["count"] == 1200
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: pplex.stats()["connections_open"] == 0, timeout=20, message="every client gone")
    assert pplex.admin("GET", "/healthz") == (200, {"status": "ok"})


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pplex_backs_off_and_recovers(tmp_path, transport):
    worker_port_holder = EchoWorker().serve(port=0)
    port = worker_port_holder.port
    limit = 160
    pplex = PplexProcess(tmp_path, "--transport", transport, "--upstream", f"127.0.0.1:{port}",
                         prefix=[sys.executable, os.path.join(ROOT, "tests", "fdlimit.py"), str(limit)])
    try:
        pplex.wait_ready_upstreams(1)
        worker_port_holder.stop(grace=0)  # the worker goes; pplex keeps probing it
        socks = []
        try:
            for _ in range(limit + 40):  # pplex runs out of descriptors on the way
                socks.append(socket.create_connection(("127.0.0.1", pplex.port), timeout=2))
        except OSError:
            pass
        wait_for(lambda: "accept failed" in pplex.log(), timeout=10, message="pplex at its descriptor limit")
        before = cpu_seconds(pplex.proc.pid)
        time.sleep(2)  # measuring: CPU used over 2 s while out of descriptors (no busy loop)
        assert cpu_seconds(pplex.proc.pid) - before < 0.5
        log = pplex.log()
        assert log.count("accept failed") == 1
        assert log.count("Traceback") <= 1  # grpcio's own decode error once (its repeats are rate limited)
        restarted = EchoWorker().serve(port=port)  # its probes fail with EMFILE until fds come back
        try:
            for sock in socks[:60]:
                sock.close()
            wait_for(lambda: pplex.upstreams()[0]["state"] == "ready", timeout=20,
                     message="the worker back in rotation once descriptors are free")
            assert pplex.admin("GET", "/healthz")[0] == 200
        finally:
            restarted.stop(grace=0)
            for sock in socks[60:]:
                sock.close()
    finally:
        pplex.stop()


# -- the original config.toml --------------------------------------------------------------------
def test_the_original_config_toml_starts_unchanged(tmp_path, start_worker):
    worker = start_worker()
    (tmp_path / "cert.pem").write_text("certificate")
    (tmp_path / "key.pem").write_text("key")
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = 0

[[upstream]]
host = "127.0.0.1"
port = {worker.port}
alive_timeout = 60

[management_server]
host = "127.0.0.1"
port = 0
log_level = "normal"

[management_server.tls]
cert_path = "{tmp_path / 'cert.pem'}"
key_path = "{tmp_path / 'key.pem'}"
""")
    pplex = PplexProcess(tmp_path, config_path=config)
    try:
        pplex.wait_ready_upstreams(1)
        client = pplex.client()
        client.send(b"from the original config\n")
        assert client.recv_line() == b"from the original config"
        warnings = [line for line in pplex.log().splitlines() if "management_server.tls" in line]
        assert len(warnings) == 1 and "does not serve TLS" in warnings[0]
    finally:
        pplex.stop()


# -- dead peers ------------------------------------------------------------------------------------
def keepalive_timer(local_port, remote_port):
    """(timer kind, seconds left) of the TCP socket local_port -> remote_port, from /proc/net/tcp."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / os.sysconf("SC_CLK_TCK")
    return None


def test_client_sockets_have_tcp_keepalive_so_vanished_peers_are_found(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"tcp_keepalive_idle": 30, "tcp_keepalive_interval": 5,
                                           "tcp_keepalive_count": 3}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"x\n")
    assert client.recv_line() == b"x"
    mine = client.sock.getsockname()[1]
    # pplex's end of this connection: the keepalive timer (kind 2) armed for about tcp_keepalive_idle.
    kind, left = wait_for(lambda: keepalive_timer(pplex.port, mine), message="pplex's socket in /proc/net/tcp")
    assert kind == 2 and 20 < left <= 30
