"""`pplex --processes N`: N reactor processes sharing the client port, each a node of the cluster.

One Python process runs one reactor thread, so one pplex process uses about
one core. With `server.processes` (or `--processes`) N > 1, this parent
process starts N children (`python -m pplex`, the validated config handed
over on the child's stdin, never in its environment or arguments) and supervises them:

- **Client port.** Every child opens its own listening socket on the same
  address with `SO_REUSEPORT`; the kernel spreads new connections over them
  (by a hash of the connection's addresses). The parent holds a bound, never
  listening socket on the port for its whole life, so a port 0 is chosen once
  and a restarted child always gets the same port back.
- **Admin API: each child has its own.** Child i serves the admin API on
  `management_server.port + i` (each on a free port when the port is 0), and
  is a full node of the cluster: `/cluster`, `/stats?scope=cluster`,
  `/connections?scope=cluster` and `GET`/`DELETE /connections/<uuid>` answer
  for every process from any one of them, through the broker. The parent
  serves nothing; it prints each child's node id and admin address.
- **Node ids.** `cluster.node` (or a random id) with `-<index>` appended.
- **Faults.** A child that exits unexpectedly is started again with backoff
  (1 s doubling to 30 s; reset after a minute of running), its clients lost,
  the others untouched. A child that cannot start (exit 1: a port cannot be
  bound, exit 2: bad config) stops them all with its exit code. Each child
  reads its stdin, a pipe from the parent: if the parent dies, the children
  see end of file and stop.
- **Stop.** SIGTERM or SIGINT: every child gets SIGTERM and stops gracefully (shutdown_spread, then
  shutdown_grace); a second signal stops them at once; SIGKILL 10 s after their own deadline.
  SIGHUP is passed on to every child (each reloads its TLS certificate).
"""
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from pplex import node
from pplex.connection import format_peer

log = logging.getLogger("pplex.supervisor")

CHILD_ENV = "PPLEX_CHILD"
START_TIMEOUT_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
# A child that ran this long before exiting is restarted after the first backoff again.
STABLE_SECONDS = 60.0


def child_settings():
    """In a child (`PPLEX_CHILD=1`): {"index", "node", "config", "source"}, the first line of stdin; else None."""
    if os.environ.pop(CHILD_ENV, None) != "1":
        return None
    raw = b""
    while not raw.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit("pplex: the parent process went away before handing over the config")
        raw += chunk
    return json.loads(raw)


def watch_parent(stop):
    """In a child: call `stop()` when stdin (a pipe from the parent) reaches end of file."""
    def watch():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop()
    threading.Thread(target=watch, name="pplex-parent-watch", daemon=True).start()


class _Child:
    def __init__(self, index):
        self.index = index
        self.proc = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = None
        self.node = None
        self.admin = None


class Supervisor:
    def __init__(self, config, log_level="info", on_started=None, source="config"):
        self.config = config
        self.source = source  # the config file's name, for the one line a child's config error gives
        self.log_level = log_level
        self.on_started = on_started  # fn(host, port) once every child serves
        self.count = config["server"]["processes"]
        self.base = config["cluster"].get("node") or node.current.id
        self.children = [_Child(i) for i in range(self.count)]
        self.stopping = False
        self.reservation = None
        self.port = None

    # -- set-up ----------------------------------------------------------------
    def reserve_port(self):
        """Bind (never listen) a SO_REUSEPORT socket on the client address: fixes the port for every child."""
        server = self.config["server"]
        host = server["host"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, server["port"]))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"cannot listen on {format_peer((host, server['port']))}: "
                                       f"{error.strerror}") from None
        self.reservation = sock
        self.port = sock.getsockname()[1]
        return host, self.port

    def child_config(self, index):
        config = json.loads(json.dumps(self.config))
        config["server"]["port"] = self.port
        config["server"]["processes"] = 1
        admin_port = config["management_server"]["port"]
        config["management_server"]["port"] = admin_port + index if admin_port else 0
        config["cluster"]["node"] = self.base
        return config

    def spawn(self, child):
        child.proc = subprocess.Popen([sys.executable, "-m", "pplex", "--log-level", self.log_level],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env={**os.environ, CHILD_ENV: "1"})
        # The config (a token may be in it) goes through the pipe; the pipe then stays open:
        # its end of file tells the child that the parent is gone.
        settings = {"index": child.index, "node": self.base, "config": self.child_config(child.index),
                    "source": self.source}
        child.proc.stdin.write(json.dumps(settings).encode() + b"\n")
        child.proc.stdin.flush()
        child.started = time.monotonic()
        child.restart_at = None

    def wait_started(self, child):
        """Read the child's startup line; returns None, or its exit code when it could not start."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        out = child.proc.stdout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 0.2)
            if ready:
                line = out.readline().decode("utf-8", "replace")
                if not line:
                    return child.proc.wait()
                if line.startswith("pplex listening on "):
                    child.admin = line.split("admin API on ", 1)[1].split(",", 1)[0].strip()
                    child.node = line.rsplit("node ", 1)[1].strip()
                    threading.Thread(target=_forward, args=(out,), daemon=True).start()
                    return None
                sys.stdout.write(line)
            elif child.proc.poll() is not None:
                return child.proc.returncode
        log.error("process %d did not start within %.0f s", child.index, START_TIMEOUT_SECONDS)
        return 1

    # -- running ---------------------------------------------------------------
    def run(self):
        """Start every child, supervise them until SIGTERM/SIGINT; the process exit code."""
        host, port = self.reserve_port()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._forward_hup)
        try:
            for child in self.children:
                self.spawn(child)
                code = self.wait_started(child)
                if code is not None:
                    log.error("process %d could not start (exit %d); stopping", child.index, code)
                    return code or 1
                print(f"process {child.index} (pid {child.proc.pid}): node {child.node}, "
                      f"admin API on {child.admin}", flush=True)
            first = self.children[0]
            print(f"pplex listening on {format_peer((host, port))}, admin API on {first.admin}, "
                  f"node {first.node} ({self.count} processes, SO_REUSEPORT)", flush=True)
            if self.on_started is not None:
                self.on_started(host, port)
            self._supervise()
            return 0
        finally:
            self._stop_all()
            self.reservation.close()

    def _on_signal(self, *_):
        if self.stopping:  # a second signal: the children stop at once too
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    try:
                        child.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        self.stopping = True

    def _forward_hup(self, *_):
        """SIGHUP: each child reloads its TLS certificate."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _supervise(self):
        while not self.stopping:
            time.sleep(0.1)  # a supervision tick: polls the children's exit, no client traffic here
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at and not self.stopping:
                        self._restart(child)
                    continue
                code = child.proc.poll()
                if code is None or self.stopping:
                    continue
                if now - child.started >= STABLE_SECONDS:
                    child.failures = 0
                delay = min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2 ** child.failures)
                child.failures = min(child.failures + 1, 16)
                child.restart_at = now + delay
                log.error("process %d (node %s, pid %d) exited with %s; starting it again in %.0f s",
                          child.index, child.node, child.proc.pid, code, delay)

    def _restart(self, child):
        self.spawn(child)
        code = self.wait_started(child)
        if code is not None:
            child.restart_at = time.monotonic() + RESTART_MAX_SECONDS
            log.error("process %d could not start again (exit %d)", child.index, code)
            return
        log.warning("process %d started again: pid %d, node %s, admin API on %s",
                    child.index, child.proc.pid, child.node, child.admin)

    def _stop_all(self):
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        # Each child closes its clients gracefully (shutdown_spread, then shutdown_grace at most).
        server = self.config["server"]
        allowed = server["shutdown_spread"] + server["shutdown_grace"] + STOP_GRACE_SECONDS
        deadline = time.monotonic() + allowed
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process pid %d did not stop within %.0f s; killing it", proc.pid, allowed)
                proc.kill()
                proc.wait(5)
        for child in self.children:
            if child.proc is not None and child.proc.stdin is not None:
                child.proc.stdin.close()


def _forward(out):
    """Copy a child's further stdout lines to ours (they are rare: demo hints)."""
    for line in out:
        sys.stdout.write(line.decode("utf-8", "replace"))
        sys.stdout.flush()
