"""Real brokers for tests: nats-server and redis-server on free loopback ports, stopped by pid.

Both come from Debian's packages (installed by `./dev test`). A broker can be
stopped and started again on the same port, for the tests of a lost broker.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

from tests.helpers import free_port, wait_for

KINDS = ("nats", "redis")
COMMANDS = {"nats": "nats-server", "redis": "redis-server"}


def available(kind):
    return shutil.which(COMMANDS[kind]) is not None or os.path.exists(f"/usr/sbin/{COMMANDS[kind]}")


class BrokerProcess:
    """One broker process; `url` stays the same across stop() and start()."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"{kind}://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = tmp_path / f"{kind}-{self.port}.log"
        self.start()

    def command(self):
        binary = shutil.which(COMMANDS[self.kind]) or f"/usr/sbin/{COMMANDS[self.kind]}"
        if self.kind == "nats":
            return [binary, "-a", "127.0.0.1", "-p", str(self.port)]
        return [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp_path), "--protected-mode", "no"]

    def start(self, timeout=10.0):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        wait_for(self._accepts, timeout, interval=0.02, message=f"{self.kind} on port {self.port}")

    def _accepts(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self):
        """SIGKILL, by pid: the broker vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        # The port must be free again before start() binds it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.02)
            except OSError:
                return
