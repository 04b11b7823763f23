"""What the sections of the reliability benchmark share.

- `Section`: the result of one section: its title, figures (each with its goal
  and PASS/FAIL when it has one), notes and raw data, all JSON-ready.
- Starting pplex from a generated config file (upstreams with their settings,
  server settings, plugins) and the Go echo worker on a chosen port.
- The admin API (`admin_get`), pplex's memory (`RssSampler`) and its log
  (`log_faults`).
"""
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request

from bench import procs, targets
from bench.procs import StartError

MB = 1_000_000
GO_WORKER = targets.GO_WORKER


def fmt_mb(value):
    return "%.1f MB" % (value / MB)


def fmt_int(value):
    return "{:,}".format(int(value))


def fmt_ms(value):
    return "-" if value is None else ("%.1f ms" % value if value >= 10 else "%.2f ms" % value)


class Section:
    """One section's figures. A figure with a goal has `ok` True or False (PASS / FAIL)."""

    def __init__(self, name, title):
        self.name = name
        self.title = title
        self.figures = []
        self.notes = []
        self.tables = []   # preformatted lines, printed after the figures
        self.data = {}
        self.error = None

    def figure(self, label, text, value=None, goal=None, ok=None):
        self.figures.append({"label": label, "text": text, "value": value, "goal": goal,
                             "pass": None if goal is None else bool(ok)})

    def note(self, text):
        self.notes.append(text)

    def table(self, lines):
        self.tables.append(list(lines))

    def to_json(self):
        return {"section": self.name, "title": self.title, "figures": self.figures, "notes": self.notes,
                "tables": self.tables, "error": self.error, "data": self.data}


# ---------------------------------------------------------------------------
# processes

def start_go_echo(ps, port, name="worker", timeout=15):
    """The Go reference worker in echo mode on 127.0.0.1:port, once its `ready` answers."""
    if not os.access(GO_WORKER, os.X_OK):
        raise StartError("Go worker %s is missing: run bash conformance/go-upstream/build.sh"
                         % os.path.relpath(GO_WORKER, targets.REPO))
    p = ps.start(name, [GO_WORKER, "--port", str(port), "--mode", "echo"])
    p.wait_line(lambda line: line.startswith("listening on "), timeout=timeout)
    wait_worker_ready(p, "127.0.0.1:%d" % port, timeout)
    return p


def start_push_worker(ps, port, timeout=30):
    p = ps.start("pushworker", [sys.executable, "-m", "bench.reliability.pushworker", "--port", str(port)],
                 cwd=targets.REPO, env=targets.python_env())
    p.wait_line(lambda line: '"listening"' in line, timeout=timeout)
    wait_worker_ready(p, "127.0.0.1:%d" % port, timeout)
    return p


def wait_worker_ready(p, target, timeout):
    from bench.grpc_direct import wait_ready  # grpc is imported only when needed
    deadline = time.monotonic() + timeout
    while True:
        if not p.alive():
            raise StartError("%s exited: %s%s" % (p.name, p.last_error_line(), p.diagnostics()))
        try:
            wait_ready(target, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except TimeoutError as exc:
            if time.monotonic() >= deadline:
                raise StartError("%s: %s%s" % (p.name, exc, p.diagnostics()))


def wait_event(proc, name, timeout):
    """The next JSON line `{"event": name, ...}` on proc's stdout (earlier lines are skipped)."""
    line = proc.wait_line(lambda l: l.startswith("{") and json.loads(l).get("event") == name, timeout)
    return json.loads(line)


def last_json(proc, timeout):
    """proc's last JSON stdout line that is not an event, read until it exits; raises StartError."""
    deadline = time.monotonic() + timeout
    found = None
    while True:
        try:
            line = proc.readline(deadline)
        except TimeoutError:
            raise StartError("%s gave no result within %.0f s%s" % (proc.name, timeout, proc.diagnostics()))
        if line is None:
            break
        if line.startswith("{"):
            obj = json.loads(line)
            if "event" not in obj:
                found = obj
    if found is None:
        proc.popen.wait(timeout=5)
        raise StartError("%s ended without a result (exit %s): %s%s" % (
            proc.name, proc.popen.returncode, proc.last_error_line(), proc.diagnostics()))
    return found


class Pplex:
    """A running pplex: its process, client address, admin address and config."""

    def __init__(self, proc, addr, admin, config):
        self.proc = proc
        self.addr = addr
        self.admin = admin
        self.config = config

    @property
    def pid(self):
        return self.proc.pid

    def get(self, path, timeout=5.0):
        try:
            return admin_get(self.admin, path, timeout)[1]
        except OSError:
            if not self.proc.alive():
                self.proc.popen.wait(timeout=5)
                raise StartError("pplex exited (status %s): %s" % (self.proc.popen.returncode,
                                                                   self.proc.last_error_line()))
            raise

    def stats(self):
        return self.get("/stats")

    def errors_total(self):
        """Sum of pplex_errors_total{where} (errors contained at a fault boundary) from /metrics."""
        if not self.proc.alive():
            return 0
        text = admin_text(self.admin, "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("pplex_errors_total"):
                total += float(line.rsplit(None, 1)[1])
        return int(total)

    def upstream_states(self):
        return [u["state"] for u in self.get("/upstreams")["upstreams"]]

    def wait_no_clients(self, timeout=15):
        deadline = time.monotonic() + timeout
        while self.stats()["connections_open"]:
            if time.monotonic() >= deadline:
                raise StartError("pplex: the readiness probe's connection is still open after %.0f s" % timeout)
            time.sleep(0.05)

    def wait_upstreams_ready(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise StartError("pplex exited: %s%s" % (self.proc.last_error_line(), self.proc.diagnostics()))
            try:
                if self.upstream_states().count("ready") >= count:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise StartError("pplex: %d upstream(s) not ready within %.0f s" % (count, timeout))
            time.sleep(0.05)


def start_pplex(ps, tmpdir, transport, upstream_ports, server=None, upstream=None, plugins=None,
                probe=b"pplex-reliability-probe\n", name="pplex", timeout=30):
    """pplex --transport T with a generated pplex.json; ready once a client's `probe` comes back echoed.

    `server`, `upstream` (settings of every upstream entry) and `plugins` go
    into the config as given; everything else keeps pplex's defaults.
    """
    listen, admin = procs.free_port(), procs.free_port()
    config = {"server": dict(server or {}),
              "upstream": [{"host": "127.0.0.1", "port": port, **(upstream or {})} for port in upstream_ports]}
    if plugins:
        config["plugins"] = plugins
    path = os.path.join(tmpdir, "%s-%s-%d.json" % (name, transport, listen))
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    argv = targets.pplex_argv() + ["--config", path, "--listen", "127.0.0.1:%d" % listen,
                                   "--admin", "127.0.0.1:%d" % admin, "--transport", transport,
                                   "--log-level", "warning"]
    p = ps.start(name, argv, cwd=targets.REPO, env=targets.python_env())
    addr = ("127.0.0.1", listen)
    targets.probe_while_alive(p, addr, timeout, argv, payload=probe)
    pplex = Pplex(p, addr, ("127.0.0.1", admin), config)
    pplex.wait_no_clients()   # the probe's close (after eof_linger) must not count in a section's figures
    return pplex


# ---------------------------------------------------------------------------
# admin API, memory, log

def admin_request(admin, path, timeout=5.0):
    """(HTTP status, body bytes, seconds) of GET path; status 0 when no answer came."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (admin[0], admin[1], path), timeout=timeout) as resp:
            body = resp.read()
            return resp.status, body, time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - t0
    except (OSError, urllib.error.URLError):
        return 0, b"", time.monotonic() - t0


def admin_get(admin, path, timeout=5.0):
    status, body, seconds = admin_request(admin, path, timeout)
    if status != 200:
        raise OSError("GET %s answered %s" % (path, status or "nothing"))
    return seconds, json.loads(body)


def admin_text(admin, path, timeout=5.0):
    status, body, _ = admin_request(admin, path, timeout)
    if status != 200:
        raise OSError("GET %s answered %s" % (path, status or "nothing"))
    return body.decode("utf-8", "replace")


def dict_delta(before, after):
    """{key: after - before} of two dicts of counters, zeros left out."""
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) != before.get(k, 0)}


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds on a thread: peak and the (t, rss) series."""

    def __init__(self, pid, interval):
        self.pid = pid
        self.interval = interval
        self.samples = []   # (seconds since start, bytes)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = None

    def start(self):
        self.t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def _sample(self):
        try:
            rss = procs.rss_bytes(self.pid)
        except (OSError, RuntimeError):
            return
        self.samples.append((time.monotonic() - self.t0, rss))
        self.peak = max(self.peak, rss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        if not self.samples or time.monotonic() - self.t0 - self.samples[-1][0] > self.interval / 2:
            self._sample()
        return self


def thin(samples, most):
    """At most `most` samples, evenly spread, the first and the last always kept."""
    if len(samples) <= most:
        return samples
    step = (len(samples) - 1) / (most - 1)
    return [samples[round(i * step)] for i in range(most)]


FAULT_LINE = re.compile(r"Traceback \(most recent call last\)|contained error in |CRITICAL|uncaught")


def log_faults(proc):
    """Lines of pplex's log that show an exception (tracebacks, contained errors): (count, first line)."""
    try:
        with open(proc.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return 0, ""
    hits = [line for line in text.splitlines() if FAULT_LINE.search(line)]
    return len(hits), (hits[0].strip()[:200] if hits else "")


def log_lines(proc, needle):
    try:
        with open(proc.log_path, "rb") as f:
            return [line for line in f.read().decode("utf-8", "replace").splitlines() if needle in line]
    except OSError:
        return []
