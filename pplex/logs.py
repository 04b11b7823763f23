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

It also owns how lines are written (`configure`): `text` (the default, for a
person) or `json` (`JsonFormatter`: one object per line, for a log system).
"""
import json
import logging
import sys
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

    def log(self, logger, level, key, message, *args, exc_info=False, extra=None):
        """Write `message % args` at `level` unless a line of `key` went out within the interval.

        `extra` is passed to the logger: `{"uuid": ..., "upstream": ..., "reason": ...}` become
        fields of a JSON line (see `JsonFormatter`)."""
        ok, suppressed = self.allow(key)
        if not ok:
            return False
        if suppressed:
            message += " (%d similar line(s) suppressed in the last %.0f s)"
            args = (*args, suppressed, self.interval)
        logger.log(level, message, *args, exc_info=exc_info, extra=extra)
        return True

    def warning(self, logger, key, message, *args, extra=None):
        return self.log(logger, logging.WARNING, key, message, *args, extra=extra)


class Faults:
    """Errors caught at a fault boundary: a count per place, a rate-limited log line with the traceback."""

    def __init__(self, interval=REPEAT_INTERVAL_SECONDS, clock=time.monotonic):
        self.counts = {}   # where -> errors caught there
        self._limiter = RateLimited(interval, clock)
        self._lock = threading.Lock()

    def report(self, where, context, *args, logger=None, extra=None):
        """Call from an `except` block: count the error under `where`, log it (rate limited per `where`).

        `context % args` says what was being done, for whom (uuid, upstream,
        plugin); the traceback of the exception being handled is appended.
        """
        with self._lock:
            self.counts[where] = self.counts.get(where, 0) + 1
        self._limiter.log(logger or _log, logging.ERROR, where, "contained error in %s: " + context,
                          where, *args, exc_info=True, extra=extra)

    def snapshot(self):
        with self._lock:
            return dict(self.counts)


_log = logging.getLogger("pplex.faults")
# The process's one set of fault counters: pplex runs one proxy per process.
FAULTS = Faults()


# -- how lines are written ----------------------------------------------------------------------
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(node)s %(levelname)s %(name)s: %(message)s"
# Fields a log call may pass with `extra=` (and `node`, set on every record by pplex.node's
# filter); a JSON line carries each one the record has.
CONTEXT_FIELDS = ("node", "uuid", "upstream", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log systems.

    Always: `ts` (RFC 3339 UTC, microseconds), `level` (`DEBUG` .. `CRITICAL`),
    `logger` (e.g. `pplex.upstreams`), `msg` (the formatted message). When the
    call passed them with `extra=`: `uuid` (a client), `upstream` (a worker's
    address), `reason`. With a traceback: `exc` (its text, newlines escaped, so
    the record stays on one line).
    """

    def format(self, record):
        line = {"ts": _rfc3339(record.created), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        fields = record.__dict__
        for name in CONTEXT_FIELDS:
            value = fields.get(name)
            if value is not None:
                line[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _rfc3339(created):
    seconds = int(created)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + ".%06dZ" % int((created - seconds) * 1e6))


def configure(level="info", fmt="text", stream=None):
    """Set up the root logger once, for the `pplex` command: `fmt` is `text` or `json`.

    With `json`, what Python would otherwise print by itself on stderr (an
    uncaught exception in any thread, a `warnings` message) goes through the
    logger too, so every line of stderr is one JSON object.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, defaults={"node": "-"}))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback,
                                                          getattr(args.thread, "name", None))


def _log_uncaught(exc_type, value, traceback, thread=None):
    if issubclass(exc_type, KeyboardInterrupt):
        return
    where = f" in thread {thread}" if thread else ""
    logging.getLogger("pplex").critical("uncaught %s%s: %s", exc_type.__name__, where, value,
                                        exc_info=(exc_type, value, traceback))
