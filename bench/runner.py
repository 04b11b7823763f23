"""Run one load measurement (Go loadgen or gRPC-direct) and the idle-memory test."""
import json
import os
import selectors
import socket
import sys
import time

from . import procs
from .targets import BENCH, REPO, python_env


class RowError(RuntimeError):
    pass


def _run_client(ps, name, argv, watch, budget, cwd=None, env=None):
    """Start a load client, sample CPU of `watch` + itself over its measurement
    window (between its measure_start / measure_end event lines) and return its
    JSON result with a "cpu" dict added (percent of one core per process)."""
    p = ps.start(name, argv, cwd=cwd, env=env)
    try:
        named = dict(watch)
        named["generator"] = p.pid
        window = procs.CpuWindow(named, thread_detail=("pplex",))
        deadline = time.monotonic() + budget
        result = None
        while True:
            try:
                line = p.readline(deadline)
            except TimeoutError:
                raise RowError("%s did not finish within %.0fs%s" % (name, budget, p.diagnostics()))
            if line is None:
                break
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            ev = obj.get("event")
            if ev == "measure_start":
                window.start()
            elif ev == "measure_end":
                window.stop()
            elif "rt_per_s" in obj:
                result = obj
        try:
            p.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            pass
        rc = p.popen.returncode
        if result is None or rc not in (0, None):
            msg = p.stderr_tail(6) or "exit status %s" % rc
            if result is not None and result.get("messages"):
                result["warning"] = msg
            else:
                raise RowError("%s failed (exit %s): %s" % (name, rc, msg))
        result["cpu"] = window.result
        return result
    finally:
        ps.stop(p)


def run_loadgen(ps, addr, clients, seconds, warmup, size, pipeline, watch, extra=()):
    exe = os.path.join(BENCH, "bin", "loadgen")
    argv = [exe, "-addr", "%s:%d" % addr, "-clients", str(clients), "-seconds", str(seconds),
            "-warmup", str(warmup), "-size", str(size), "-pipeline", str(pipeline), "-events", *extra]
    # connect phase (<= 60 s, usually < 1 s) + warm-up + window + io timeout + slack
    budget = 60 + warmup + seconds + 15
    return _run_client(ps, "loadgen", argv, watch, budget)


def run_grpc_direct(ps, target, clients, seconds, warmup, size, watch):
    argv = [sys.executable, "-m", "bench.grpc_direct", "--target", target,
            "--clients", str(clients), "--seconds", str(seconds), "--warmup", str(warmup),
            "--size", str(size), "--events"]
    budget = 15 + warmup + seconds + 20
    return _run_client(ps, "grpc_direct", argv, watch, budget, cwd=REPO, env=python_env())


# ---------------------------------------------------------------------------
# Idle memory per connection

def _wait_stable_rss(pid, timeout, interval=0.25, need=4, tolerance=64 * 1024):
    """Poll VmRSS until `need` consecutive samples lie within `tolerance` bytes."""
    deadline = time.monotonic() + timeout
    samples = [procs.rss_bytes(pid)]
    while time.monotonic() < deadline:
        time.sleep(interval)
        samples.append(procs.rss_bytes(pid))
        recent = samples[-need:]
        if len(recent) == need and max(recent) - min(recent) <= tolerance:
            return recent[-1], True
    return samples[-1], False


def _wait_fds(pid, target, timeout):
    """Poll /proc/PID/fd until it holds `target` descriptors, or it stops growing."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        n = procs.fd_count(pid)
        if n >= target:
            return n
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        elif now - last_change > 2.0 or now >= deadline:
            return n
        time.sleep(0.02)


def _open_batch(addr, count, timeout):
    """Open `count` TCP connections to addr concurrently; return the connected ones."""
    sel = selectors.DefaultSelector()
    pending = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(addr)
        sel.register(s, selectors.EVENT_WRITE)
        pending.append(s)
    ok, deadline = [], time.monotonic() + timeout
    left = len(pending)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            sel.unregister(s)
            left -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok.append(s)
            else:
                s.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return ok


def idle_memory(pid, addr, conns, batch=200, fds_per_conn=1, progress=None):
    """Open `conns` idle connections to the server `pid` listens for on `addr`.

    Connections go in batches; after each batch the server's descriptor count
    (/proc/PID/fd) is polled until it has accepted them, so the listen backlog
    never overflows and "accepted" is known without any server cooperation
    (`fds_per_conn` is 2 for HAProxy, which also opens one to its backend).
    Returns before/after VmRSS and the per-connection difference.
    """
    rss_before, stable_before = _wait_stable_rss(pid, timeout=10)
    fds_before = procs.fd_count(pid)
    socks = []
    t0 = time.monotonic()
    try:
        while len(socks) < conns:
            n = min(batch, conns - len(socks))
            got = _open_batch(addr, n, timeout=10)
            socks.extend(got)
            _wait_fds(pid, fds_before + fds_per_conn * len(socks), timeout=10)
            if not got:
                break
            if progress and len(socks) % 2000 < batch:
                progress("  %d/%d idle connections open" % (len(socks), conns))
        accepted = (_wait_fds(pid, fds_before + fds_per_conn * len(socks), timeout=15)
                    - fds_before) // fds_per_conn
        rss_after, stable_after = _wait_stable_rss(pid, timeout=15)
        open_s = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    per_conn = (rss_after - rss_before) / len(socks) if socks else 0.0
    return {
        "connections": conns,
        "opened": len(socks),
        "accepted": accepted,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "bytes_per_conn": round(per_conn),
        "rss_stable": stable_before and stable_after,
        "open_s": round(open_s, 2),
    }
