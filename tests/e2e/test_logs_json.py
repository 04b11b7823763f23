"""`--log-format json`: a whole run (clients, a killed worker, a bad client, shutdown) is one JSON
object per line, with the stable keys, and the context keys on the lines that have them."""
import json
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TRANSPORTS, free_port, wait_for

STABLE_KEYS = {"ts", "level", "logger", "msg"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def test_every_line_of_a_run_is_a_json_object_with_the_stable_keys(start_pplex, start_worker):
    first = start_worker()
    # The second worker is a process killed with SIGKILL: its streams break at once. (An in-process
    # worker stopped with grace 0 sends GOAWAY first, and may end its stream cleanly once pplex
    # half-closes it: a drain with no "left rotation" warning.)
    port = free_port()
    second = subprocess.Popen([sys.executable, "-m", "pplex.worker", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_and_check(start_pplex, first, second, port)
    finally:
        second.kill()
        second.wait(10)


def run_and_check(start_pplex, first, second, port):
    pplex = start_pplex("--log-format", "json", "--plugins", "framing_line,access_log",
                        "--upstream", f"127.0.0.1:{first.port}", "--upstream", f"127.0.0.1:{port}",
                        config={"plugins": {"framing_line": {"max_frame_bytes": 64}}})
    pplex.wait_ready_upstreams(2)
    killed = f"127.0.0.1:{port}"
    clients = [pplex.client() for _ in range(4)]
    for client in clients:
        client.send(b"hello\n")
        assert client.recv_line() == b"hello"
    second.kill()
    wait_for(lambda: [u["state"] for u in pplex.upstreams()] == ["ready", "unready"], timeout=10,
             message="the killed worker out of rotation")
    for client in clients:
        client.send(b"still here\n")
        assert client.recv_line() == b"still here"
    bad = pplex.client()
    bad.send(b"x" * 200)  # no delimiter within max_frame_bytes
    assert bad.is_closed_by_peer(timeout=5)
    for client in clients:
        client.close()
    wait_for(lambda: pplex.stats()["connections_open"] == 0, message="every client closed")
    pplex.stop()

    lines = pplex.log_path.read_text().splitlines()
    assert len(lines) > 20
    records = []
    for line in lines:
        record = json.loads(line)  # every line, or the test fails here naming it
        assert isinstance(record, dict) and STABLE_KEYS <= set(record), line
        assert TIMESTAMP.match(record["ts"]) and record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR"), line
        records.append(record)
    assert any(r["logger"] == "pplex.upstreams" and r["level"] == "WARNING" and r.get("upstream") == killed
               and ("left rotation: " + r["reason"]) in r["msg"] for r in records)
    bad_close = [r for r in records if r.get("reason") == "protocol_error" and "bad input" in r["msg"]]
    assert bad_close and all(len(r["uuid"]) == 36 for r in bad_close)
    opened = {r["uuid"] for r in records if r["logger"] == "pplex.access" and r["msg"].startswith("open ")}
    assert len(opened) == 5
    assert any(r["msg"] == "stopped" for r in records)
