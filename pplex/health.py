"""Each worker's health: its state, rise/fall counting, and how long an ejection lasts.

Pure decisions with a clock passed in: no I/O, no timers (`pplex.upstreams`
owns those and asks this module what to do). The model follows HAProxy's
`rise`/`fall` and Envoy's outlier detection:

- a worker enters rotation after `rise` consecutive ready=true answers;
- in rotation, `fall` consecutive failed heartbeats eject it; a broken or
  stalled data stream ejects it at once;
- its n-th ejection in a row keeps it out for at least
  `ejection_time * 2**(n-1)`, capped at `max_ejection_time`, so a worker that
  flaps (ready says yes, its stream fails at once) is let back less and less
  often instead of a dozen times a second;
- each `EJECTION_DECAY_SECONDS` it then spends in rotation without an
  ejection takes one off n: good behaviour earns the short ejection back.
"""
import enum

from pplex import limits


class State(str, enum.Enum):
    """Where a worker is; a str, so it compares and serialises as its word."""

    CONNECTING = "connecting"   # added, never ready yet
    UNREADY = "unready"         # out of rotation: probing (after a failure, an ejection or a drain)
    READY = "ready"             # in rotation
    DRAINING = "draining"       # out of rotation, finishing what it was given
    REMOVED = "removed"         # gone from the registry

    def __str__(self):
        return self.value


class Health:
    """One worker's counts and ejection clock."""

    __slots__ = ("rise", "fall", "ejection_time", "max_ejection_time", "ok_in_row", "failed_beats",
                 "ejections", "ejections_total", "ejected_until", "decay_from")

    def __init__(self, rise=1, fall=1, ejection_time=0.5, max_ejection_time=60.0):
        self.rise = rise
        self.fall = fall
        self.ejection_time = ejection_time
        self.max_ejection_time = max_ejection_time
        self.ok_in_row = 0          # consecutive ready=true answers while out of rotation
        self.failed_beats = 0       # consecutive failed heartbeats while in rotation
        self.ejections = 0          # ejections in a row (decays while in rotation)
        self.ejections_total = 0
        self.ejected_until = 0.0    # monotonic time before which it may not re-enter rotation
        self.decay_from = None      # when the current decay period started (None: out of rotation)

    def ready_answer(self, ok):
        """A ready probe's outcome; True when it has now answered ready `rise` times in a row."""
        if not ok:
            self.ok_in_row = 0
            return False
        self.ok_in_row += 1
        return self.ok_in_row >= self.rise

    def wait(self, now):
        """Seconds before it may re-enter rotation (0 when it may now)."""
        return max(0.0, self.ejected_until - now)

    def entered(self, now):
        self.ok_in_row = 0
        self.failed_beats = 0
        self.decay_from = now

    def heartbeat(self, ok, now):
        """A heartbeat's outcome while in rotation; True when it must be ejected (`fall` reached)."""
        if ok:
            self.failed_beats = 0
            self._decay(now)
            return False
        self.failed_beats += 1
        return self.failed_beats >= self.fall

    def eject(self, now):
        """It left rotation on a failure: count it; return how long it stays out (seconds)."""
        self._decay(now)
        self.decay_from = None
        self.ejections += 1
        self.ejections_total += 1
        duration = min(self.ejection_time * 2 ** min(self.ejections - 1, 30), self.max_ejection_time)
        self.ejected_until = now + duration
        self.ok_in_row = 0
        return duration

    def left(self):
        """It left rotation without a failure (a drain): no ejection, no decay while out."""
        self.decay_from = None
        self.ok_in_row = 0

    def _decay(self, now):
        if self.decay_from is None or not self.ejections:
            return
        periods = int((now - self.decay_from) // limits.EJECTION_DECAY_SECONDS)
        if periods:
            self.ejections = max(0, self.ejections - periods)
            self.decay_from += periods * limits.EJECTION_DECAY_SECONDS
