"""Workers found by DNS: the address set changes, workers are added and drained; blips keep the pool.

Two ways to change what a name resolves to, both with real workers on
loopback addresses (127.0.0.1, .2, .3, one port):
- the resolver seam: a real pplex (App, reactor thread, grpcio links) in this
  process, with `Discovery(resolve=...)` answering what the test says;
- a hosts file in a private mount namespace (`unshare -m`, bind-mounted over
  /etc/hosts): a real `python -m pplex` process resolving through getaddrinfo.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from pplex.app import App
from pplex.config import validate
from pplex.discovery import Discovery
from pplex.worker import EchoWorker
from tests.helpers import ROOT, STARTUP_LINE, Client, free_port, wait_for

REFRESH = 0.3
# "within two refresh periods", with room for a loaded 2-core machine's scheduling
WITHIN = 2 * REFRESH + 0.7


@pytest.fixture
def workers():
    """One echo worker on each of 127.0.0.1, .2, .3, all on the same port (as pods behind one name)."""
    port = free_port()
    started = {f"127.0.0.{i}": EchoWorker().serve(port=port, host=f"127.0.0.{i}") for i in (1, 2, 3)}
    yield port, started
    for worker in started.values():
        worker.stop(grace=0)


class Answer:
    """The resolver seam: what the name resolves to now (a list, or an exception to raise)."""

    def __init__(self, value):
        self.value = value
        self.asked = 0

    def __call__(self, name, port):
        self.asked += 1
        if isinstance(self.value, Exception):
            raise self.value
        return list(self.value)


@pytest.fixture
def proxy_app():
    app = App(validate({"server": {"host": "127.0.0.1", "port": 0},
                        "management_server": {"host": "127.0.0.1", "port": 0}}))
    app.start()
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    yield app
    app.stop()
    thread.join(5)
    app.close()


def states(app):
    return app.control.call(lambda: {u.host: u.state for u in app.proxy.upstreams})


def test_address_changes_add_and_drain_and_blips_keep_the_pool(proxy_app, workers):
    port, _ = workers
    answer = Answer(["127.0.0.1"])
    spec = {"dns": "workers.test", "port": port, "refresh": REFRESH, "alive_timeout": 30, "ready_timeout": 1}
    discovery = proxy_app.control.call(lambda: Discovery(proxy_app.reactor, proxy_app.proxy.upstreams, resolve=answer))
    pool = proxy_app.control.call(discovery.add, spec)
    try:
        wait_for(lambda: states(proxy_app) == {"127.0.0.1": "ready"}, WITHIN, message="first address ready")
        client = Client(proxy_app.listen_address[1])
        client.send(b"one\n")
        assert client.recv_line() == b"one"

        answer.value = ["127.0.0.1", "127.0.0.2"]
        wait_for(lambda: states(proxy_app) == {"127.0.0.1": "ready", "127.0.0.2": "ready"}, WITHIN,
                 message="the new address added and ready")

        answer.value = ["127.0.0.2", "127.0.0.3"]  # .1 vanishes (drained, not cut), .3 appears
        wait_for(lambda: states(proxy_app) == {"127.0.0.2": "ready", "127.0.0.3": "ready"}, WITHIN,
                 message=".1 drained and removed, .3 added")
        client.send(b"two\n")  # the client never noticed
        assert client.recv_line() == b"two"

        for blip in ([], socket.gaierror(socket.EAI_NONAME, "Name or service not known")):
            answer.value = blip
            asked = answer.asked
            wait_for(lambda: answer.asked >= asked + 2, WITHIN + REFRESH, message="two lookups")
            assert states(proxy_app) == {"127.0.0.2": "ready", "127.0.0.3": "ready"}
        info = proxy_app.control.call(pool.as_dict)
        assert info["addresses"] == ["127.0.0.2", "127.0.0.3"] and info["failures"] >= 4
        assert "Name or service not known" in info["last_error"]

        # An upstream of the set removed by hand comes back: DNS is the source of truth.
        removed = proxy_app.control.call(lambda: next(u.id for u in proxy_app.proxy.upstreams if u.host == "127.0.0.3"))
        answer.value = ["127.0.0.2", "127.0.0.3"]
        proxy_app.control.call(proxy_app.proxy.upstreams.remove, removed)
        wait_for(lambda: states(proxy_app) == {"127.0.0.2": "ready", "127.0.0.3": "ready"}, WITHIN,
                 message="the removed member added again")
        client.close()
    finally:
        proxy_app.control.call(discovery.close)


def _can_unshare():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root) for a private /etc/hosts")
def test_a_real_pplex_follows_a_hosts_file_in_a_private_mount_namespace(tmp_path, workers):
    port, _ = workers
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 workers.test\n")
    config = tmp_path / "pplex.json"
    config.write_text(json.dumps({"upstream": [{"dns": "workers.test", "port": port, "refresh": REFRESH}]}))
    log_path = tmp_path / "pplex.log"
    command = (f"mount --bind {hosts} /etc/hosts && exec {sys.executable} -m pplex --config {config} "
               "--listen 127.0.0.1:0 --admin 127.0.0.1:0")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", command], stdout=subprocess.PIPE, stderr=log,
                                cwd=ROOT, start_new_session=True)
    try:
        line = proc.stdout.readline().decode()
        match = STARTUP_LINE.search(line)
        assert match, f"{line!r} {log_path.read_text()}"
        admin = f"http://127.0.0.1:{match.group(4)}"

        def addresses():
            import urllib.request
            with urllib.request.urlopen(f"{admin}/upstreams", timeout=5) as response:
                return {u["host"]: u["state"] for u in json.loads(response.read())["upstreams"]}

        wait_for(lambda: addresses() == {"127.0.0.1": "ready"}, 10, message="the first address")
        # Rewrite the file in place (the bind mount holds its inode): .1 goes, .2 and .3 come.
        with open(hosts, "r+") as handle:
            handle.truncate(0)
            handle.write("127.0.0.1 localhost\n127.0.0.2 workers.test\n127.0.0.3 workers.test\n")
        wait_for(lambda: addresses() == {"127.0.0.2": "ready", "127.0.0.3": "ready"}, WITHIN,
                 message="the hosts file's new set")
        with open(hosts, "r+") as handle:  # the name vanishes: the lookup fails, the pool stays
            handle.truncate(0)
            handle.write("127.0.0.1 localhost\n")
        wait_for(lambda: "keeping the last good set" in log_path.read_text(), 5, message="the failure logged")
        assert addresses() == {"127.0.0.2": "ready", "127.0.0.3": "ready"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
        proc.stdout.close()
