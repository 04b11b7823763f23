"""Child processes, ports and /proc readings for the benchmark harness.

Every child runs in its own process group (start_new_session) so that stop()
also reaches whatever it forked; the harness only ever signals groups it
started itself. Readiness is always polled against a deadline, never slept on.
"""
import collections
import os
import queue
import resource
import signal
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    """A target could not be started or never became ready."""


def raise_nofile(want=65536):
    """Raise RLIMIT_NOFILE for this process and its children.

    soft -> hard always; as root, also try to lift hard to `want` (10,000 idle
    connections through HAProxy need two descriptors each). Returns the soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):
        pass
    return soft


def free_port():
    """A currently free TCP port on 127.0.0.1 (the usual bind-port-0 trick)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class Proc:
    """A child process with its stdout drained into a queue of lines.

    stderr goes to a log file in the run's temp dir, shown on failure.
    """

    def __init__(self, name, argv, logdir, cwd=None, env=None):
        self.name = name
        self.argv = list(argv)
        self.log_path = os.path.join(logdir, "%s.%d.log" % (name, int(time.monotonic() * 1000)))
        self._log = open(self.log_path, "wb")
        self.lines = queue.Queue()
        self.tail = collections.deque(maxlen=50)
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=self._log, cwd=cwd, env=env, start_new_session=True)
        except OSError as exc:
            self._log.close()
            raise StartError("%s: cannot start %s: %s" % (name, self.argv[0], exc))
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def alive(self):
        return self.popen.poll() is None

    def readline(self, deadline):
        """Next stdout line, None at EOF; raises TimeoutError past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            return self.lines.get(timeout=left)
        except queue.Empty:
            raise TimeoutError

    def wait_line(self, predicate, timeout):
        """Return the first stdout line satisfying predicate, or raise StartError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.readline(deadline)
            except TimeoutError:
                raise StartError("%s: no expected output within %.0fs%s" % (
                    self.name, timeout, self.diagnostics()))
            if line is None:
                self.popen.wait(timeout=5)
                raise StartError("%s exited with status %s: %s%s" % (
                    self.name, self.popen.returncode, self.last_error_line(), self.diagnostics()))
            if predicate(line):
                return line

    def stderr_tail(self, n=12):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 4000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-n:])

    def last_error_line(self):
        """The last non-empty stderr line, for one-line failure summaries."""
        lines = [l for l in self.stderr_tail(5).splitlines() if l.strip()]
        return lines[-1].strip() if lines else ""

    def diagnostics(self):
        parts = []
        if self.popen.poll() is not None:
            parts.append("exit status %s" % self.popen.returncode)
        err = self.stderr_tail()
        if err:
            parts.append("stderr:\n    " + err.replace("\n", "\n    "))
        out = "\n".join(list(self.tail)[-5:])
        if out:
            parts.append("stdout:\n    " + out.replace("\n", "\n    "))
        return ("\n  " + "\n  ".join(parts)) if parts else ""

    def stop(self, grace=3.0):
        """SIGTERM this child's process group, then SIGKILL it if still there."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while others in its group linger.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.popen.stdout.close()
        except OSError:
            pass
        self._log.close()


class ProcSet:
    """Every child of one run, stopped in reverse order at the end, even on error."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, **kw):
        p = Proc(name, argv, self.logdir, **kw)
        self.procs.append(p)
        return p

    def stop(self, proc):
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        while self.procs:
            self.procs.pop().stop()


# ---------------------------------------------------------------------------
# /proc readings

def _children_map():
    kids = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids[ppid].append(int(entry))
    return kids


def process_tree(pid):
    """pid and all its descendants (a proxy or worker may fork helpers)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids):
    """utime+stime (all threads) of the given processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def machine_cpu():
    """(busy, total) jiffies from /proc/stat, summed over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def rss_bytes(pid):
    """VmRSS of pid from /proc/PID/status, in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for pid %d" % pid)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def thread_cpu(pid):
    """{tid: (label, cpu seconds)} for the threads of pid.

    The main thread is labelled "main"; the others by their kernel name
    (comm), so gRPC's C-core threads ("event_engine", "grpc_global_tim") stand
    apart from Python threads, which inherit the process name.
    """
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        label = "main" if int(tid) == pid else comm
        out[int(tid)] = (label, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class CpuWindow:
    """CPU used by named process trees between start() and stop().

    For the names in `thread_detail`, the leader process's CPU is also split
    by thread label (see thread_cpu) into result["threads"][name].
    """

    def __init__(self, named_pids, thread_detail=()):
        self.trees = {name: process_tree(pid) for name, pid in named_pids.items() if pid}
        self.detail = {n: named_pids[n] for n in thread_detail if named_pids.get(n)}
        self.t0 = self.c0 = self.m0 = None
        self.th0 = {}
        self.result = {}

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {n: cpu_seconds(p) for n, p in self.trees.items()}
        self.th0 = {n: thread_cpu(pid) for n, pid in self.detail.items()}
        self.m0 = machine_cpu()

    def _threads(self, wall):
        out = {}
        for name, pid in self.detail.items():
            before = self.th0.get(name, {})
            per = {}
            for tid, (label, secs) in thread_cpu(pid).items():
                used = secs - before.get(tid, (label, 0.0))[1]
                per[label] = per.get(label, 0.0) + used
            out[name] = {k: round(100.0 * v / wall, 1)
                         for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0}
        return out

    def stop(self):
        if self.t0 is None:
            return {}
        wall = time.monotonic() - self.t0
        c1 = {n: cpu_seconds(p) for n, p in self.trees.items()}
        threads = self._threads(wall) if self.detail else None
        m1 = machine_cpu()
        busy = m1[0] - self.m0[0]
        total = m1[1] - self.m0[1]
        self.result = {n: round(100.0 * (c1[n] - self.c0[n]) / wall, 1) for n in self.trees}
        # Whole machine, 100% = one core, so 2 cores saturated reads 200%.
        ncpu = os.cpu_count() or 1
        self.result["machine"] = round(100.0 * ncpu * busy / total, 1) if total else 0.0
        # Busy time not charged to any watched process: other load on the box
        # (another engineer's tests, the harness) or kernel work done outside
        # the watched processes' context.
        watched = sum(v for n, v in self.result.items() if n != "machine")
        self.result["other"] = round(max(0.0, self.result["machine"] - watched), 1)
        if threads:
            self.result["threads"] = threads
        return self.result
