"""The core path end to end: real pplex process, real TCP clients, real gRPC workers."""
import json
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import ROOT, TRANSPORTS, Client, free_port, wait_for


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """Every test here that starts pplex runs once per transport: grpcio, then h2."""
    return request.param

ALL, ACTIVE, NOT_ACTIVE = 0, 1, 2


def upstream_args(*workers):
    args = []
    for worker in workers:
        args += ["--upstream", f"127.0.0.1:{worker.port}"]
    return args


def test_fifty_clients_two_workers_round_robin_and_replies_in_order(start_pplex, start_worker):
    workers = [start_worker(), start_worker()]
    pplex = start_pplex(*upstream_args(*workers))
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
    total = 50 * rounds
    counts = [w.count() for w in workers]
    assert sum(counts) == total
    # Round-robin per message: each worker gets half, give or take a few.
    assert all(abs(c - total / 2) <= total * 0.05 for c in counts), counts
    # Every message reached a worker stamped with its own client's UUID, one UUID per client.
    uuids_by_client = {}
    for worker in workers:
        for client_uuid, payload in worker.received:
            uuids_by_client.setdefault(payload.split(b" message")[0], set()).add(client_uuid)
    assert len(uuids_by_client) == 50
    assert all(len(u) == 1 for u in uuids_by_client.values())
    assert len({u for s in uuids_by_client.values() for u in s}) == 50
    # Pipelined: 200 lines in one write come back in order.
    clients[0].send(b"".join(b"p%d\n" % i for i in range(200)))
    assert [clients[0].recv_line() for _ in range(200)] == [b"p%d" % i for i in range(200)]
    assert all(u["live_rtt_seconds"] is not None and u["ready_probe_seconds"] is not None
               for u in pplex.upstreams())


def test_broadcast_all_reaches_every_client_once(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(50)]
    wait_for(lambda: pplex.stats()["connections_open"] == 50, message="50 open connections")
    clients[0].send(f"broadcast:{ALL}:hello everyone\n".encode())
    for client in clients:
        # Exactly one copy, then the MARK the worker sent right after it on the same stream.
        assert client.recv_line() == b"hello everyone"
        assert client.recv_line() == b"MARK"


def test_broadcast_active_and_not_active_reach_the_right_sets(start_pplex, start_worker):
    worker = start_worker()
    config = {"server": {"active_window": 1.0}}
    pplex = start_pplex(*upstream_args(worker), config=config)
    pplex.wait_ready_upstreams(1)
    active = [pplex.client() for _ in range(5)]
    quiet = [pplex.client() for _ in range(5)]
    wait_for(lambda: pplex.stats()["connections_open"] == 10, message="10 open connections")
    for client in active:
        client.send(b"hi\n")
        assert client.recv_line() == b"hi"
    trigger = active[0]
    trigger.send(f"broadcast:{ACTIVE}:to the active\n".encode())
    for client in active:
        assert client.recv_line() == b"to the active"
        assert client.recv_line() == b"MARK"
    for client in quiet:
        assert client.recv_line() == b"MARK"  # nothing before the MARK
    trigger.send(f"broadcast:{NOT_ACTIVE}:to the quiet\n".encode())
    for client in quiet:
        assert client.recv_line() == b"to the quiet"
        assert client.recv_line() == b"MARK"
    for client in active[1:]:
        assert client.recv_line() == b"MARK"
    # The trigger itself sent data just now: it is active.
    assert trigger.recv_line() == b"MARK"


def test_a_client_that_disconnects_is_gone_within_a_second(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(5)]
    for client in clients:
        client.send(b"x\n")
        client.recv_line()
    assert pplex.admin("GET", "/connections")[1]["count"] == 5
    for client in clients:
        client.close()
    wait_for(lambda: pplex.admin("GET", "/connections")[1]["count"] == 0, timeout=1.0,
             message="every closed client gone from pplex's table")
    assert pplex.stats()["connections_closed"] == 5


def test_a_worker_down_at_start_is_retried_and_used_once_up(start_pplex, start_worker):
    port = free_port()
    pplex = start_pplex("--upstream", f"127.0.0.1:{port}")
    client = pplex.client()
    client.send(b"early\n")  # waits in pplex: no worker is ready
    wait_for(lambda: pplex.upstreams()[0]["last_error"], message="a failed ready probe")
    assert pplex.upstreams()[0]["state"] in ("connecting", "unready")
    start_worker(port=port)
    client.sock.settimeout(15)
    assert client.recv_line() == b"early"
    assert pplex.upstreams()[0]["state"] == "ready"


def test_half_close_still_delivers_the_reply_then_closes(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"last words\n")
    client.sock.shutdown(1)  # SHUT_WR: EOF to pplex, still reading
    assert client.recv_line() == b"last words"
    assert client.is_closed_by_peer(timeout=5)


def test_reply_to_unknown_uuid_and_message_without_target_are_counted_not_fatal(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"unknown\n")
    assert client.recv_line() == b"done"
    client.send(b"notarget\n")
    assert client.recv_line() == b"done"
    drops = pplex.stats()["drops"]
    assert drops == {"unknown_uuid": 1, "bad_worker_message": 1}
    client.send(b"still here\n")
    assert client.recv_line() == b"still here"


def test_idle_timeout_closes_quiet_clients_only(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker), config={"server": {"idle_timeout": 0.5}})
    pplex.wait_ready_upstreams(1)
    quiet, busy = pplex.client(), pplex.client()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # busy talks more often than the idle timeout
        busy.send(b"tick\n")
        assert busy.recv_line() == b"tick"
    assert quiet.is_closed_by_peer(timeout=0.1)
    assert pplex.admin("GET", "/connections")[1]["count"] == 1


def test_messages_wait_while_no_worker_is_ready_up_to_max_pending_bytes(start_pplex):
    pplex = start_pplex(config={"server": {"max_pending_bytes": 1000}})
    patient, greedy = pplex.client(), pplex.client()
    patient.send(b"a" * 500)
    greedy.send(b"b" * 1500)
    assert greedy.is_closed_by_peer(timeout=5)
    assert not patient.is_closed_by_peer(timeout=0.2)
    assert pplex.stats()["drops"] == {"max_pending_bytes": 1}
    assert "max_pending_bytes" in pplex.log()


def test_upstream_added_through_admin_api_takes_waiting_traffic(start_pplex, start_worker):
    pplex = start_pplex()
    client = pplex.client()
    client.send(b"waiting\n")
    worker = start_worker()
    status, body = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port})
    assert status == 201 and body["id"] == "u1"
    assert client.recv_line() == b"waiting"


@pytest.mark.parametrize("config, path", [
    ({"server": {"port": "7999"}}, "server.port: expected an integer port (got \"7999\")"),
    ({"upstream": [{"host": "127.0.0.1", "port": 1}, {"host": "127.0.0.1", "port": 70000}]},
     "upstream[1].port: port must be between 1 and 65535 (got 70000)"),
    ({"server": {"colour": "blue"}}, "server.colour: unknown key (got \"blue\")"),
    ({"upstream": [{"port": 5000}]}, "upstream[0].host: required key is missing"),
    ({"server": {"idle_timeout": -1}}, "server.idle_timeout: must be at least 0 and at most 31536000 (got -1)"),
])
def test_bad_config_exits_2_with_one_line_naming_the_path(tmp_path, config, path):
    config_path = tmp_path / "pplex.json"
    config_path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "pplex", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"{config_path}: {path}"]


def test_missing_or_broken_config_file_is_one_line_too(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"server": {')
    for path, expected in ((tmp_path / "absent.json", "cannot read"), (broken, "not valid JSON: line 1")):
        result = subprocess.run([sys.executable, "-m", "pplex", "--config", str(path)],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert expected in result.stderr


def test_original_config_toml_layout_is_accepted(tmp_path, start_worker):
    worker = start_worker()
    toml = tmp_path / "config.toml"
    toml.write_text(f"""
[server]
host = "127.0.0.1"
port = 0

[[upstream]]
host = "127.0.0.1"
port = {worker.port}
alive_timeout = 30
ready_timeout = 5

[management_server]
host = "127.0.0.1"
port = 0
""")
    proc = subprocess.Popen([sys.executable, "-m", "pplex", "--config", str(toml)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split(",")[0].rsplit(":", 1)[1])
        client = Client(port)
        client.send(b"from toml\n")
        assert client.recv_line() == b"from toml"
        client.close()
    finally:
        proc.terminate()  # a graceful stop; a second SIGTERM makes it immediate
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(10)


def test_a_plugin_error_closes_only_that_client(start_pplex, start_worker, tmp_path):
    plugin_dir = tmp_path / "plugin"
    (plugin_dir / "crashy_pkg").mkdir(parents=True)
    (plugin_dir / "crashy_pkg" / "__init__.py").write_text(
        "from pplex import hookimpl\n\n"
        "@hookimpl\n"
        "def pplex_balance(payload, candidates):\n"
        "    if payload.startswith(b'crash'):\n"
        "        raise RuntimeError('balancer bug')\n"
        "    return candidates[0]\n")
    dist = plugin_dir / "crashy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pplex.plugins]\ncrashy = crashy_pkg\n")
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", "--plugins", "crashy",
                        env={"PYTHONPATH": str(plugin_dir)})
    pplex.wait_ready_upstreams(1)
    victim, bystander = pplex.client(), pplex.client()
    victim.send(b"crash now\n")
    assert victim.is_closed_by_peer(timeout=5)
    bystander.send(b"fine\n")
    assert bystander.recv_line() == b"fine"
    log = pplex.log()
    assert "balancer bug" in log and "balance=crashy" in log
    assert pplex.stats()["drops"] == {"internal_error": 1}
