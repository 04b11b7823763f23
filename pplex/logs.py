"""Log lines that can repeat, and errors that were contained: counted, rate limited, never silent.

Two tools for every place where pplex must go on after something went wrong:

- `RateLimited`: a warning that can repeat (a worker that stays down, accept
  errors, replies to gone clients) is written at most once per interval per
  key; the next line that gets through says how many were suppressed.
- `Faults`: the fault boundary's bookkeeping. Where control leaves pplex's own
  code (a plugin hook, a link event, a client flush, an admin handler), an
  exception is caught by the caller, which calls `faults.report(where, ...)`:
  it is counted by `where` (`pplex_errors_total{where}` in /metrics), logged
  with its traceback and context, rate limited per `where`, and the caller
  goes on with the rest of its work.

Both are safe to call from any thread (the admin API reports from its own).
"""
import logging
import threading
import time

# A repeating line is written at most once per this many seconds per key.
REPEAT_INTERVAL_SECONDS = 10.0


class RateLimited:
    """At most one line per key per `interval` seconds; the next one carries the suppressed count."""

    def __init__(self, interval=REPEAT_INTERVAL_SECONDS, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = {}        # key -> time of the last line written
        self._suppressed = {}  # key -> lines swallowed since
        self._lock = threading.Lock()

    def allow(self, key):
        """(write it?, how many lines of this key were suppressed before it)."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            if len(self._last) > 10_000:  # keys from outside (addresses) must not grow without bound
                self._last = {key: now}
                self._suppressed = {}
            return True, self._suppressed.pop(key, 0)

    def log(self, logger, level, key, message, *args, exc_info=False):
        """Write `message % args` at `level` unless a line of `key` went out within the interval."""
        ok, suppressed = self.allow(key)
        if not ok:
            return False
        if suppressed:
            message += " (%d similar line(s) suppressed in the last %.0f s)"
            args = (*args, suppressed, self.interval)
        logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, logger, key, message, *args):
        return self.log(logger, logging.WARNING, key, message, *args)


class Faults:
    """Errors caught at a fault boundary: a count per place, a rate-limited log line with the traceback."""

    def __init__(self, interval=REPEAT_INTERVAL_SECONDS, clock=time.monotonic):
        self.counts = {}   # where -> errors caught there
        self._limiter = RateLimited(interval, clock)
        self._lock = threading.Lock()

    def report(self, where, context, *args, logger=None):
        """Call from an `except` block: count the error under `where`, log it (rate limited per `where`).

        `context % args` says what was being done, for whom (uuid, upstream,
        plugin); the traceback of the exception being handled is appended.
        """
        with self._lock:
            self.counts[where] = self.counts.get(where, 0) + 1
        self._limiter.log(logger or _log, logging.ERROR, where, "contained error in %s: " + context,
                          where, *args, exc_info=True)

    def snapshot(self):
        with self._lock:
            return dict(self.counts)


_log = logging.getLogger("pplex.faults")
# The process's one set of fault counters: pplex runs one proxy per process.
FAULTS = Faults()
