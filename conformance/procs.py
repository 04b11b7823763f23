"""Every process the suite starts (pplex, worker instances), their logs, and their cleanup.

Each process runs in its own session (process group), with stdout and stderr
in one log file, so the suite can kill it and anything it spawned, read what
it said, and never block on a full pipe. Every process started is killed at
the latest when the interpreter exits (atexit), and `kill_everything` is what
the runner calls on errors and Ctrl-C.

Waiting is polling with deadlines: a worker is up when its port accepts a TCP
connection, pplex when its startup line is in its log; nothing here sleeps to
synchronise.
"""
import atexit
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
POLL_SECONDS = 0.01
STARTUP_LINE = re.compile(r"pplex listening on (\S+):(\d+), admin API on http://(\S+):(\d+)")
# pplex's health-cycle log lines (pplex/upstreams.py), at level info and warning; the node id
# before the level is optional (pplex writes it since it has one).
UPSTREAM_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (?:\S+ )?\S+ \S+: upstream (u\d+) (\S+) "
    r"(ready|left rotation: .*|not ready: .*)$")

_running = []


class StartError(Exception):
    """A process could not be started, or did not come up in time."""


def kill_everything():
    """Kill every process the suite started and has not stopped yet (idempotent)."""
    for proc in list(_running):
        proc.kill()


atexit.register(kill_everything)


def free_port():
    """A port the kernel says is free on 127.0.0.1 now (bind to 0, read it, release it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def deadline_after(seconds):
    return time.monotonic() + seconds


class Proc:
    """One child process in its own process group; output (stdout and stderr) to `log_path`."""

    def __init__(self, argv, log_path, cwd=None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        except OSError as error:
            self._log.close()
            raise StartError(f"cannot run {self.argv[0]!r}: {error.strerror or error}") from None
        _running.append(self)

    @property
    def pid(self):
        return self.popen.pid

    def running(self):
        return self.popen.poll() is None

    def returncode(self):
        return self.popen.poll()

    def _signal_group(self, sig):
        # The leader is not reaped before this (we wait after), so its pid,
        # and so the group id, cannot have been reused by another process.
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self):
        """SIGTERM the whole group, and return at once (the caller waits for the exit it expects)."""
        self._signal_group(signal.SIGTERM)

    def wait_exit(self, timeout):
        """The exit status within `timeout` seconds, or None if it still runs."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL the whole group at once (what a crash looks like to pplex)."""
        self._signal_group(signal.SIGKILL)
        self._reap(5.0)

    def stop(self, grace=2.0):
        """SIGTERM, then SIGKILL after `grace` seconds; the group is killed either way."""
        if self.running():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self._reap(5.0)

    def _reap(self, timeout):
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()
        if self in _running:
            _running.remove(self)

    def output(self, last_chars=None):
        try:
            with open(self.log_path, "rb") as f:
                if last_chars:
                    f.seek(max(0, os.path.getsize(self.log_path) - last_chars))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class WorkerCommand:
    """The worker command template: `{port}` (required) and `{ready_sleep}` (optional, ms)."""

    def __init__(self, template, slow_ready_template=None):
        self.template = template
        self.argv_template = shlex.split(template)
        if not self.argv_template or not any("{port}" in arg for arg in self.argv_template):
            raise ValueError(f"the worker command must contain {{port}} (got {template!r})")
        self.slow_template = shlex.split(slow_ready_template) if slow_ready_template else None
        if self.slow_template and not any("{port}" in arg for arg in self.slow_template):
            raise ValueError(f"the slow-ready command must contain {{port}} (got {slow_ready_template!r})")

    @property
    def has_ready_sleep(self):
        return any("{ready_sleep}" in arg for arg in self.argv_template)

    @property
    def can_slow_ready(self):
        return self.has_ready_sleep or self.slow_template is not None

    @staticmethod
    def _fill(argv, port, ready_sleep_ms):
        return [arg.replace("{port}", str(port)).replace("{ready_sleep}", str(int(ready_sleep_ms)))
                for arg in argv]

    def argv(self, port, ready_sleep_ms=0):
        return self._fill(self.argv_template, port, ready_sleep_ms)

    def slow_argv(self, port, ready_sleep_ms):
        """The command for a worker whose ready answers after `ready_sleep_ms`, or None."""
        if self.has_ready_sleep:
            return self._fill(self.argv_template, port, ready_sleep_ms)
        if self.slow_template:
            return self._fill(self.slow_template, port, ready_sleep_ms)
        return None


class WorkerInstance:
    """One instance of the worker under test, on a fixed loopback port (kept across restarts)."""

    def __init__(self, argv_for_port, workdir, name, port=None):
        self.argv_for_port = argv_for_port
        self.workdir = workdir
        self.name = name
        self.port = port or free_port()
        self.proc = None
        self.starts = 0

    def start(self, timeout=15.0):
        """Start it and wait until its port accepts connections; raise StartError naming the cause."""
        self.starts += 1
        log_path = os.path.join(self.workdir, f"{self.name}-{self.starts}.log")
        argv = self.argv_for_port(self.port)
        self.proc = Proc(argv, log_path)
        deadline = deadline_after(timeout)
        while True:
            if not self.proc.running():
                code = self.proc.returncode()
                self.proc.stop()
                raise StartError(
                    f"your worker exited with status {code} before listening on {HOST}:{self.port} "
                    f"(command: {shlex.join(argv)}); its output: {_last_lines(self.proc.output(4000))}")
            if port_accepts(self.port):
                return self
            if time.monotonic() >= deadline:
                self.proc.stop()
                raise StartError(
                    f"your worker did not listen on {HOST}:{self.port} within {timeout:g} s "
                    f"(command: {shlex.join(argv)}): it must listen on the port given as {{port}}; "
                    f"its output: {_last_lines(self.proc.output(4000))}")
            time.sleep(POLL_SECONDS)

    def running(self):
        return self.proc is not None and self.proc.running()

    def kill(self):
        if self.proc is not None:
            self.proc.kill()

    def stop(self):
        if self.proc is not None:
            self.proc.stop()


def port_accepts(port, host=HOST):
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _last_lines(text, count=5):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(nothing)"


class UpstreamEvent:
    __slots__ = ("kind", "upstream", "address", "detail", "wall")

    def __init__(self, kind, upstream, address, detail, wall):
        self.kind = kind          # "ready", "left" (left rotation) or "not_ready"
        self.upstream = upstream  # pplex's id: u1, u2, ...
        self.address = address
        self.detail = detail
        self.wall = wall          # time.time() of the log line (millisecond resolution)

    def __repr__(self):
        return f"<{self.kind} {self.upstream} {self.detail!r}>"


class Pplex:
    """pplex as a subprocess on free loopback ports, with its admin API and its log's health events."""

    def __init__(self, workdir, name, upstreams, active_window=1.0, framing=None, transport="h2", timeout=15.0,
                 server=None, plugins=None):
        self.name = name
        config = {
            "server": {"active_window": active_window, **(server or {})},
            "upstream": [dict(u) for u in upstreams],
            "plugins": {"framing_len": dict(framing or {}), **(plugins or {})},
            "transport": transport,
        }
        self.config = config
        config_path = os.path.join(workdir, f"{name}.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        argv = [sys.executable, "-m", "pplex", "--listen", f"{HOST}:0", "--admin", f"{HOST}:0",
                "--config", config_path, "--log-level", "info"]
        self.proc = Proc(argv, os.path.join(workdir, f"{name}.log"), cwd=ROOT)
        self.events = []
        self._offset = 0
        self._partial = b""
        self.port = self.admin_port = None
        deadline = deadline_after(timeout)
        while self.port is None:
            self._read_log()
            if self.port is not None:
                break
            if not self.proc.running():
                code = self.proc.returncode()
                self.proc.stop()
                raise StartError(f"pplex exited with status {code} at startup: "
                                 f"{_last_lines(self.proc.output(4000))}")
            if time.monotonic() >= deadline:
                self.proc.stop()
                raise StartError(f"pplex did not start within {timeout:g} s: "
                                 f"{_last_lines(self.proc.output(4000))}")
            time.sleep(POLL_SECONDS)

    # -- log -------------------------------------------------------------------
    def _read_log(self):
        try:
            with open(self.proc.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if self.port is None:
                match = STARTUP_LINE.search(line)
                if match:
                    self.port, self.admin_port = int(match.group(2)), int(match.group(4))
                    continue
            match = UPSTREAM_EVENT.match(line)
            if match:
                stamp, millis, upstream, address, what = match.groups()
                wall = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000
                if what == "ready":
                    kind, detail = "ready", ""
                elif what.startswith("left rotation: "):
                    kind, detail = "left", what[len("left rotation: "):]
                else:
                    kind, detail = "not_ready", what[len("not ready: "):]
                self.events.append(UpstreamEvent(kind, upstream, address, detail, wall))

    def poll_events(self):
        """Read new log lines; return every health event so far (a list that only grows)."""
        self._read_log()
        return self.events

    def events_of(self, upstream, kind=None, since=0):
        return [e for e in self.poll_events()[since:]
                if e.upstream == upstream and (kind is None or e.kind == kind)]

    def mark(self):
        """An index into the events list: 'from now on'."""
        return len(self.poll_events())

    def wait_event(self, upstream, kind, since=0, timeout=5.0, count=1):
        """Poll the log until `count` events of `kind` for `upstream` appeared after `since`; or None."""
        deadline = deadline_after(timeout)
        while True:
            found = self.events_of(upstream, kind, since)
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() >= deadline or not self.proc.running():
                return None
            time.sleep(POLL_SECONDS)

    def output(self, last_chars=4000):
        return self.proc.output(last_chars)

    # -- admin API ---------------------------------------------------------------
    def admin(self, method, path, body=None, timeout=10.0):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{HOST}:{self.admin_port}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stats(self):
        return self.admin("GET", "/stats")[1]

    def upstreams(self):
        return self.admin("GET", "/upstreams")[1]["upstreams"]

    def upstream(self, upstream_id):
        for upstream in self.upstreams():
            if upstream["id"] == upstream_id:
                return upstream
        return None

    def connections(self):
        return self.admin("GET", "/connections?limit=1000")[1]["connections"]

    def alive(self):
        """pplex still runs and its admin API answers /healthz."""
        if not self.proc.running():
            return False
        try:
            return self.admin("GET", "/healthz", timeout=3.0)[0] == 200
        except OSError:
            return False

    def stop(self):
        self.proc.stop()
