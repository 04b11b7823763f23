"""What a scenario works with: the worker instances, fresh pplex processes, helper workers, clients.

A `Context` lives for one suite run. It starts the worker under test lazily
(instance 0, and more for round_robin_share) and keeps it across scenarios;
everything else a scenario starts (pplex, helper workers, client pools) is
registered in the current scope and stopped when the scenario ends, pass or
fail. `close` stops everything.

Also here: the traffic tools every scenario shares (`step`, `settle`) and the
verdict exceptions (`Fail`, `Skip`).
"""
import random
import time

from conformance.clients import ClientPool
from conformance.procs import HOST, Pplex, WorkerInstance, deadline_after, free_port
from conformance.workers import HelperWorker

READY_TIMEOUT = 1.0      # ready_timeout pplex gives the worker under test
ALIVE_TIMEOUT = 0.5      # alive_timeout in scenarios that do not study heartbeats
ROTATION_WAIT = 2.5      # seconds a started worker has to enter rotation
STEP_TIMEOUT = 2.0       # seconds one message has to produce its output(s)
STEP_SETTLE = 0.06       # no new output for this long: the step's output is complete


class Fail(Exception):
    """The scenario fails; `reason` says why, in words a worker author (or pplex developer) can act on."""

    def __init__(self, reason, figure="", subject=None, details=None):
        super().__init__(reason)
        self.reason = reason
        self.figure = figure
        self.subject = subject
        self.details = details or {}


class Skip(Exception):
    def __init__(self, reason, subject=None):
        super().__init__(reason)
        self.reason = reason
        self.subject = subject


class Passed:
    """What a passing scenario returns: its figure and what was checked (worker, pplex, or both)."""

    def __init__(self, figure, subject="worker", details=None, note=""):
        self.figure = figure
        self.subject = subject
        self.details = details or {}
        self.note = note


def token():
    return random.getrandbits(64).to_bytes(8, "big").hex().encode()


def describe_bytes(data, limit=32):
    """A short, readable description of a payload: its size and its first bytes."""
    if data is None:
        return "nothing"
    shown = data[:limit]
    try:
        text = shown.decode("utf-8")
        printable = all(ch.isprintable() for ch in text)
    except UnicodeDecodeError:
        printable = False
    if printable:
        body = repr(text) if len(data) <= limit else repr(text)[:-1] + "...'"
    else:
        body = data[:12].hex(" ") + (" ..." if len(data) > 12 else "")
    return f"{len(data)} B {body}"


class Context:
    def __init__(self, command, workdir, instances=2, echo="auto", transport="h2"):
        self.command = command
        self.transport = transport  # how pplex reaches workers: grpcio or h2
        self.workdir = workdir
        self.instances = instances
        self.echo_mode = echo
        self.workers = [WorkerInstance(command.argv, workdir, f"worker{i + 1}") for i in range(max(1, instances))]
        self.profile = None
        self.scenario = "setup"
        self._scope = []
        self._count = 0

    # -- worker under test --------------------------------------------------------
    def worker(self, index=0):
        """Instance `index` of the worker under test, started (again) if it is not running."""
        instance = self.workers[index]
        if not instance.running():
            if instance.proc is not None:
                instance.stop()
            instance.start()
        return instance

    def extra_worker(self, argv_for_port, name):
        """A one-off instance with another command line (e.g. slow ready); stopped with the scope."""
        instance = WorkerInstance(argv_for_port, self.workdir, name)
        self._scope.append(instance.stop)
        return instance.start()

    # -- per-scenario resources ------------------------------------------------------
    def _name(self, kind):
        self._count += 1
        return f"{self.scenario}-{kind}{self._count}"

    def serving(self):
        """The worker under test (instance 0) in rotation behind a fresh pplex: (pplex, pool, log mark)."""
        pplex = self.pplex([self.worker(0).port])
        wait_ready(pplex)
        return pplex, self.pool(pplex), pplex.mark()

    def pplex(self, ports, alive_timeout=ALIVE_TIMEOUT, ready_timeout=READY_TIMEOUT, active_window=1.0,
              framing=None, server=None, plugins=None):
        """A fresh pplex on these worker ports; `server` and `plugins` add to its config."""
        upstreams = [{"host": HOST, "port": port, "alive_timeout": alive_timeout, "ready_timeout": ready_timeout}
                     for port in ports]
        proc = Pplex(self.workdir, self._name("pplex"), upstreams, active_window=active_window, framing=framing,
                     transport=self.transport, server=server, plugins=plugins)
        self._scope.append(proc.stop)
        return proc

    def helper(self, cls=HelperWorker, **behaviour):
        worker = cls(**behaviour)
        self._scope.append(lambda: worker.stop(grace=0))
        worker.serve(port=free_port(), host=HOST)
        return worker

    def pool(self, pplex):
        pool = ClientPool(pplex.port)
        self._scope.append(pool.close)
        return pool

    def end_scope(self):
        errors = []
        while self._scope:
            stop = self._scope.pop()
            try:
                stop()
            except Exception as error:  # cleanup goes on
                errors.append(error)
        return errors

    def close(self):
        self.end_scope()
        for instance in self.workers:
            instance.stop()


# -- traffic tools ------------------------------------------------------------------

def wait_ready(pplex, upstream="u1", since=0, timeout=ROTATION_WAIT, who="your worker"):
    """The event of `upstream` entering rotation, or Fail with pplex's last word on why not."""
    event = pplex.wait_event(upstream, "ready", since=since, timeout=timeout)
    if event is None:
        info = pplex.upstream(upstream) if pplex.proc.running() else None
        why = (info or {}).get("last_error") or "no error reported"
        raise Fail(f"{who} did not enter rotation within {timeout:g} s (pplex: {why})")
    return event


def left_rotation(pplex, since, upstream=None):
    return [e for e in pplex.poll_events()[since:] if e.kind == "left" and (upstream is None or e.upstream == upstream)]


class Step:
    """One message sent, and every frame each client received because of it."""

    def __init__(self, sender, payload, frames, broadcasts, drops):
        self.sender = sender
        self.payload = payload
        self.frames = frames            # client -> list of new frames
        self.broadcasts = broadcasts    # broadcasts pplex delivered during the step
        self.drops = drops              # pplex drop counters that moved during the step

    def recipients(self):
        return {c for c, frames in self.frames.items() if frames}

    def output_count(self):
        return sum(len(f) for f in self.frames.values())

    def single(self):
        """The one payload every recipient got exactly once, or None (no output, or several)."""
        got = [f for f in self.frames.values() if f]
        if not got or any(len(f) != 1 for f in got) or len({f[0] for f in got}) != 1:
            return None
        return got[0][0]

    def classify(self, active, idle):
        """'none', 'direct', 'ALL', 'ACTIVE', 'NOT_ACTIVE', 'several' or 'misdelivered'.

        `active` and `idle` are the clients' activity when the output went out
        (the sender is active).
        """
        recipients = self.recipients()
        if not recipients:
            return "none"
        if self.single() is None:
            return "several"
        if self.broadcasts == 0:
            return "direct" if recipients == {self.sender} else "misdelivered"
        if self.broadcasts != 1:
            return "several"
        if recipients == set(active) | set(idle):
            return "ALL"
        if recipients == set(active):
            return "ACTIVE"
        if recipients == set(idle):
            return "NOT_ACTIVE"
        return "misdelivered"


def _drop_delta(before, after):
    old = before.get("drops", {})
    return {k: v - old.get(k, 0) for k, v in after.get("drops", {}).items() if v != old.get(k, 0)}


def step(pplex, pool, sender, payload, timeout=STEP_TIMEOUT, settle=STEP_SETTLE):
    """Send one message and collect what it caused, attributing every frame exactly.

    pplex's `messages_out` counts frames queued to clients, updated on its
    loop thread in whole replies and whole broadcasts; once it stopped moving
    for `settle` seconds and the clients have read that many frames, the
    step's output is complete. No output within `timeout`: an empty step.
    """
    before = pplex.stats()
    base = {c: len(c.frames) for c in pool.clients}
    base_total = sum(base.values())
    sender.send(payload)
    deadline = deadline_after(timeout)
    seen = before["messages_out"]
    changed = None
    stats = before
    while True:
        pool.pump(0.003)
        stats = pplex.stats()
        now = time.monotonic()
        if stats["messages_out"] != seen:
            seen, changed = stats["messages_out"], now
        wanted = seen - before["messages_out"]
        if changed is not None and now - changed >= settle and pool.total_frames() - base_total >= wanted:
            break
        if now >= deadline:
            pool.wait(lambda: pool.total_frames() - base_total >= wanted, 1.0)
            break
    frames = {c: c.frames[base.get(c, 0):] for c in pool.clients}
    return Step(sender, payload, frames, stats["broadcasts"] - before["broadcasts"], _drop_delta(before, stats))


def traffic_mark(pplex, pool):
    """(pplex stats, frames the clients have read) at one moment: the base for `settle`."""
    return pplex.stats(), pool.total_frames()


def settle(pplex, pool, mark, expect_in, quiet=0.3, timeout=15.0, done=None):
    """Wait until pplex read `expect_in` messages, its output stopped for `quiet` s, and the clients read it all.

    `mark` comes from `traffic_mark` before sending. `done()`, when given,
    ends the wait early once true (and everything pplex wrote is read).
    Returns (stats, timed_out).
    """
    before, base_frames = mark
    deadline = deadline_after(timeout)
    seen, changed = None, time.monotonic()
    while True:
        pool.pump(0.005)
        stats = pplex.stats()
        now = time.monotonic()
        if stats["messages_out"] != seen:
            seen, changed = stats["messages_out"], now
        read_all = pool.total_frames() - base_frames >= seen - before["messages_out"]
        got_in = stats["messages_in"] - before["messages_in"] >= expect_in
        if got_in and read_all and (now - changed >= quiet or (done is not None and done())):
            return stats, False
        if now >= deadline:
            return stats, True
