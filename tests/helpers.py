"""Test tools: a real pplex process, real TCP clients, real gRPC workers, and polling.

Everything runs on 127.0.0.1 with ports chosen by the kernel (port 0); no
test sleeps to synchronise: `wait_for` polls a condition until a deadline.
"""
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from pplex.worker import Worker

# pplex --transport values; tests that run on both take them from here
TRANSPORTS = ("grpcio", "h2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_LINE = re.compile(r"pplex listening on (\S+):(\d+), admin API on http://(\S+):(\d+)")


def wait_for(condition, timeout=5.0, interval=0.01, message="condition"):
    """Poll `condition()` until it returns a truthy value; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def run_until(reactor, predicate, timeout=5.0):
    """Run a real Reactor on this thread until `predicate()` holds or `timeout` passes; assert it held."""
    deadline = time.monotonic() + timeout

    def check():
        if predicate() or time.monotonic() > deadline:
            reactor.stop()
        else:
            reactor.call_later(0.002, check)

    reactor.call_soon(check)
    reactor.run()
    assert predicate(), "timed out"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """A blocking TCP client with line and exact-size reads."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, size):
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(self.buffer)} of {size} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def recv_line(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed with {self.buffer!r} unread")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def is_closed_by_peer(self, timeout=5.0):
        """True once the server closed the connection (EOF or reset), within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


class PplexProcess:
    """pplex as a real process on free loopback ports; its log goes to a file."""

    def __init__(self, tmp_path, *args, config=None, env=None, prefix=(), config_path=None):
        """`prefix`: a command that runs pplex (e.g. in a namespace: tests/netutil.py);
        `config`: a dict written as its pplex.json; `config_path`: a config file as it is."""
        self.log_path = tmp_path / f"pplex-{id(self)}.log"
        command = [*prefix, sys.executable, "-m", "pplex", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                   "--log-level", "info", *args]
        if config is not None:
            config_path = tmp_path / f"pplex-{id(self)}.json"
            config_path.write_text(json.dumps(config))
        if config_path is not None:
            command += ["--config", str(config_path)]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log_file, cwd=ROOT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        line = self._read_startup_line()
        match = STARTUP_LINE.search(line)
        self.port = int(match.group(2))
        self.admin_port = int(match.group(4))

    def _read_startup_line(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline().decode()
                if STARTUP_LINE.search(line):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"pplex exited with {self.proc.returncode}: {self.log()}")
        self.stop()
        raise AssertionError(f"pplex did not start within {timeout} s: {self.log()}")

    def log(self):
        self.log_file.flush()
        return self.log_path.read_text()

    def client(self):
        return Client(self.port)

    def admin(self, method, path, body=None, token=None, raw=None):
        """(status, parsed JSON or text) of an admin request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text, ctype = response.status, response.read().decode(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, text, ctype = error.code, error.read().decode(), error.headers.get("Content-Type", "")
        return status, (json.loads(text) if "json" in ctype else text)

    def stats(self):
        return self.admin("GET", "/stats")[1]

    def upstreams(self):
        return self.admin("GET", "/upstreams")[1]["upstreams"]

    def wait_ready_upstreams(self, count, timeout=10.0):
        return wait_for(lambda: len([u for u in self.upstreams() if u["state"] == "ready"]) >= count,
                        timeout, message=f"{count} ready upstream(s); log:\n{self.log()[-3000:]}")

    def stop(self):
        """SIGTERM (a graceful stop), then a second one (stop at once) if it is still closing clients."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(0.3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        self.proc.stdout.close()
        self.log_file.close()


GO_WORKER = os.path.join(ROOT, "conformance", "go-upstream", "bin", "go-upstream")


class GoWorker:
    """The Go reference worker (conformance/go-upstream) as a real process in one of its modes."""

    def __init__(self, tmp_path, mode, port=None):
        assert os.access(GO_WORKER, os.X_OK), f"{GO_WORKER} is missing: run bash conformance/go-upstream/build.sh"
        self.port = port or free_port()
        self.log_path = tmp_path / f"go-{mode}-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([GO_WORKER, "--port", str(self.port), "--mode", mode], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: b"listening on" in self.log_path.read_bytes(), message="the Go worker listening")

    def output(self):
        return self.log_path.read_text()

    def freeze(self):
        """SIGSTOP: a hung worker (its kernel still accepts bytes until the buffers fill)."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        self.proc.kill()
        self.proc.wait(5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class RecordingWorker(Worker):
    """Echoes, counts what it received, and obeys a few command payloads for tests.

    Commands (a whole payload): `broadcast:<kind>:<text>` broadcasts text then
    a `MARK` to ALL on the same stream; `unknown` replies to a made-up UUID;
    `notarget` sends a message with no target.
    """

    def __init__(self, name="w"):
        super().__init__()
        self.name = name
        self.received = []
        self.lock = threading.Lock()
        self.ready = True

    def is_ready(self):
        return self.ready

    def count(self):
        with self.lock:
            return len(self.received)

    def on_message(self, stream, client_uuid, payload):
        with self.lock:
            self.received.append((client_uuid, payload))
        if payload.startswith(b"broadcast:"):
            _, kind, text = payload.rstrip(b"\n").split(b":", 2)
            stream.broadcast(text + b"\n", int(kind))
            stream.broadcast(b"MARK\n", 0)
        elif payload == b"unknown\n":
            stream.reply("00000000-0000-4000-8000-000000000000", b"lost\n")
            stream.reply(client_uuid, b"done\n")
        elif payload == b"notarget\n":
            from pplex._proto import upstream_pb2
            stream.send_raw(upstream_pb2.OutputStreamRequest(payload=b"nowhere"))
            stream.reply(client_uuid, b"done\n")
        else:
            stream.reply(client_uuid, payload)
