"""`pplex --processes N`: children share the client port (SO_REUSEPORT), each a node with its own admin API."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.brokers import BrokerProcess, available
from tests.e2e.test_cluster import ClusterWorker, read_until
from tests.helpers import ROOT, Client, wait_for

PROCESS_LINE = re.compile(r"process (\d+) \(pid (\d+)\): node (\S+), admin API on (\S+)")
LISTEN_LINE = re.compile(r"pplex listening on (\S+):(\d+), admin API on")


class Supervised:
    """`python -m pplex --processes N` as a real process: its children's pids, nodes and admin ports."""

    def __init__(self, tmp_path, config, *args):
        path = tmp_path / "pplex.json"
        path.write_text(json.dumps(config))
        self.log_path = tmp_path / "pplex.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pplex", "--config", str(path), "--listen", "127.0.0.1:0",
             "--admin", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=self.log_file, cwd=ROOT, start_new_session=True)
        self.children = []
        self.port = None
        try:
            self._read_startup()
        except BaseException:
            self.stop()
            raise

    def _read_startup(self):
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(raw.decode()) for raw in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 40
        while self.port is None:
            assert time.monotonic() < deadline, f"no startup line: {self.log()}"
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.log()}"
                continue
            if match := PROCESS_LINE.search(line):
                self.children.append({"pid": int(match.group(2)), "node": match.group(3),
                                      "admin": match.group(4)})
            elif match := LISTEN_LINE.search(line):
                self.port = int(match.group(2))

    def log(self):
        self.log_file.flush()
        return self.log_path.read_text()[-3000:]

    def admin(self, index, path):
        import urllib.request
        with urllib.request.urlopen(f"{self.children[index]['admin']}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the children too
                self.proc.wait(5)
        self.log_file.close()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def nats(tmp_path):
    if not available("nats"):
        pytest.skip("nats-server not installed (./dev test installs it)")
    broker = BrokerProcess("nats", tmp_path)
    yield broker
    broker.stop()


def test_two_processes_share_the_port_and_act_as_one(tmp_path, start_worker, nats):
    broker = nats
    worker = start_worker(ClusterWorker())
    supervised = Supervised(tmp_path, {
        "upstream": [{"host": "127.0.0.1", "port": worker.port}],
        "cluster": {"broker": broker.url, "node": "edge", "heartbeat": 0.2, "dead_after": 1},
    }, "--processes", "2")
    try:
        assert [c["node"] for c in supervised.children] == ["edge-0", "edge-1"]
        assert len({c["admin"] for c in supervised.children}) == 2  # each child its own admin API
        for index in (0, 1):
            wait_for(lambda: supervised.admin(index, "/readyz").get("ready_upstreams") == 1, 10,
                     message=f"child {index} ready")
            wait_for(lambda: {n["node"] for n in supervised.admin(index, "/cluster")["nodes"]}
                     == {"edge-0", "edge-1"}, 10, message=f"child {index} sees both")
        # The kernel spreads connections over both listeners: 24 clients all on one has odds of 2^-23.
        clients = [Client(supervised.port) for _ in range(24)]
        for client in clients:
            client.send(b"hello\n")
            assert client.recv_line() == b"hello"
        opened = [supervised.admin(i, "/stats")["connections_open"] for i in (0, 1)]
        assert sum(opened) == 24 and min(opened) > 0, opened
        assert supervised.admin(1, "/stats?scope=cluster")["connections_open"] == 24
        # One broadcast, on the stream of whichever child serves clients[0]: every client, once.
        clients[0].send(b"bcast 0 everyone\n")
        assert clients[0].recv_line() == b"everyone"
        clients[0].send(b"bcast 0 end\n")
        for client in clients:
            assert read_until(client, b"end") == ([] if client is clients[0] else [b"everyone"])
    finally:
        pids = [c["pid"] for c in supervised.children]
        supervised.stop()
    assert supervised.proc.returncode == 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, message="children stopped with the parent")


def test_more_processes_without_a_broker_is_a_config_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pplex", "--processes", "2", "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config: server.processes: more than one process needs cluster.broker (nats://host:port or "
        "redis://host:port) to act as one proxy (got 2)"]
