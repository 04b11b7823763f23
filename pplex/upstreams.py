"""The upstream workers: registry, rotation, and the health cycle of each.

Owns which workers exist, which are in rotation (`Upstreams.ready`, the list
routing plugins choose from), and each worker's cycle, run on the reactor
thread with the reactor's timers:

    connecting --ready=true--> ready --stream broke / live failed--> unready
        ^   \\--no/error/deadline--> unready (retry with capped, jittered backoff)
        |                              |
        +------------------------------+
    ready --drain--> draining (no new clients; removed once it has nothing in flight)

Messages a worker was given but never wrote are re-routed to the others, in
order; messages written to a stream that then broke cannot be known delivered
and are counted as unconfirmed (at-most-once).
"""
import logging
import random

from pplex.errors import DuplicateUpstream

log = logging.getLogger("pplex.upstreams")

RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
# A heartbeat answer may be late by half an interval before the worker is ejected.
LIVE_GRACE = 1.5
DRAIN_CHECK_SECONDS = 0.05
# A draining worker that never answers its last messages is removed after this long.
DRAIN_MAX_SECONDS = 30.0


class Upstream:
    __slots__ = (
        "id", "host", "port", "alive_timeout", "ready_timeout", "state", "link",
        "batch", "batch_bytes", "blocked", "queued", "routed", "in_flight_batches",
        "last_error", "failures", "retry_timer", "live_timer", "ever_ready", "removed",
        "drain_deadline", "tls",
        "__weakref__",
    )

    def __init__(self, upstream_id, host, port, alive_timeout, ready_timeout, tls=None):
        self.id = upstream_id
        self.host = host
        self.port = port
        self.tls = tls            # None (plaintext), True or the validated dict (pplex.tls)
        self.alive_timeout = alive_timeout
        self.ready_timeout = ready_timeout
        self.state = "connecting"
        self.link = None
        self.batch = []           # messages routed here in this pass (flat: uuid, payload, time)
        self.batch_bytes = 0
        self.blocked = False      # the link refused a batch; waiting for on_drained
        self.queued = False       # in the proxy's list of upstreams to flush this pass
        self.routed = 0
        self.in_flight_batches = 0
        self.last_error = None
        self.failures = 0
        self.retry_timer = None
        self.live_timer = None
        self.ever_ready = False
        self.removed = False
        self.drain_deadline = None

    @property
    def address(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self):
        return f"<Upstream {self.id} {self.address} {self.state}>"

    def as_dict(self):
        return {
            "id": self.id, "host": self.host, "port": self.port, "address": self.address,
            "state": self.state, "alive_timeout": self.alive_timeout,
            "ready_timeout": self.ready_timeout, "messages_routed": self.routed,
            "last_error": self.last_error, "tls": self.tls,
            "live_rtt_seconds": getattr(self.link, "live_seconds", None),
            "ready_probe_seconds": getattr(self.link, "ready_seconds", None),
        }


class Upstreams:
    """Every registered worker; reacts to link health events on the reactor thread."""

    def __init__(self, reactor, transport, proxy, notify_added=None, notify_ready=None, notify_lost=None):
        self.reactor = reactor
        self.transport = transport
        self.proxy = proxy
        self.by_id = {}
        self.by_link = {}
        # The routing candidates, changed in place so plugins may hold a reference.
        self.ready = []
        self._next_id = 1
        self._notify_added = notify_added
        self._notify_ready = notify_ready
        self._notify_lost = notify_lost

    def __iter__(self):
        return iter(list(self.by_id.values()))

    def __len__(self):
        return len(self.by_id)

    def get(self, upstream_id):
        return self.by_id.get(upstream_id)

    # -- registration --------------------------------------------------------
    def add(self, host, port, alive_timeout=30, ready_timeout=5, tls=None):
        for existing in self.by_id.values():
            if existing.host == host and existing.port == port:
                raise DuplicateUpstream(f"upstream {existing.address} is already registered as {existing.id}")
        upstream = Upstream(f"u{self._next_id}", host, port, alive_timeout, ready_timeout, tls)
        self._next_id += 1
        self.by_id[upstream.id] = upstream
        upstream.link = self.transport.connect(upstream, self.proxy)
        self.by_link[upstream.link] = upstream
        log.info("upstream %s %s added (alive_timeout %ss, ready_timeout %ss%s)",
                 upstream.id, upstream.address, alive_timeout, ready_timeout, ", TLS" if tls else "")
        if self._notify_added:
            self._notify_added(upstream)
        self._probe(upstream)
        return upstream

    def remove(self, upstream_id, reason="removed"):
        upstream = self.by_id.pop(upstream_id, None)
        if upstream is None:
            return None
        self._leave_rotation(upstream, reason, reroute=True)
        upstream.removed = True
        upstream.state = "removed"
        self._cancel_timers(upstream)
        self.by_link.pop(upstream.link, None)
        upstream.link.close()
        log.info("upstream %s %s removed (%s)", upstream.id, upstream.address, reason)
        return upstream

    def drain(self, upstream_id):
        """Stop routing to it, let it answer what it was given, then remove it."""
        upstream = self.by_id.get(upstream_id)
        if upstream is None:
            return None
        if upstream.state != "ready":
            if upstream.state != "draining":
                self.remove(upstream_id, "drained (it was not in rotation)")
            return upstream.as_dict()
        self.ready.remove(upstream)
        upstream.state = "draining"
        upstream.drain_deadline = self.reactor.clock() + DRAIN_MAX_SECONDS
        log.info("upstream %s %s draining", upstream.id, upstream.address)
        self.reactor.call_later(DRAIN_CHECK_SECONDS, self._drain_check, upstream)
        return upstream.as_dict()

    def _drain_check(self, upstream):
        if upstream.removed or upstream.state != "draining":
            return
        if not upstream.batch and upstream.link.unanswered() == 0:
            self.remove(upstream.id, "drained")
        elif self.reactor.clock() >= upstream.drain_deadline:
            self.remove(upstream.id, f"drain timed out after {DRAIN_MAX_SECONDS:g} s")
        else:
            self.reactor.call_later(DRAIN_CHECK_SECONDS, self._drain_check, upstream)

    def close(self):
        for upstream in list(self.by_id.values()):
            self.by_id.pop(upstream.id, None)
            self._cancel_timers(upstream)
            upstream.link.close()
        self.ready.clear()

    # -- the health cycle ----------------------------------------------------
    def _probe(self, upstream):
        upstream.retry_timer = None
        if not upstream.removed:
            upstream.link.probe_ready(upstream.ready_timeout)

    def _retry_later(self, upstream):
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** upstream.failures)
        delay *= random.uniform(0.5, 1.0)  # jitter: workers that fell together do not retry together
        upstream.failures = min(upstream.failures + 1, 16)
        upstream.retry_timer = self.reactor.call_later(delay, self._probe, upstream)

    def on_ready(self, link, ok, detail):
        upstream = self.by_link.get(link)
        if upstream is None or upstream.state in ("ready", "draining"):
            return
        if not ok:
            if upstream.last_error != detail or upstream.state == "connecting":
                log.warning("upstream %s %s not ready: %s", upstream.id, upstream.address, detail)
            upstream.last_error = detail
            if upstream.state != "connecting" or upstream.failures > 2:
                upstream.state = "unready"
            self._retry_later(upstream)
            return
        upstream.failures = 0
        upstream.link.open_stream()
        upstream.link.start_live(upstream.alive_timeout)
        self._arm_live(upstream)
        upstream.state = "ready"
        upstream.ever_ready = True
        upstream.blocked = False
        self.ready.append(upstream)
        log.info("upstream %s %s ready", upstream.id, upstream.address)
        if self._notify_ready:
            self._notify_ready(upstream)
        self.proxy.upstream_ready(upstream)

    def _arm_live(self, upstream):
        if upstream.live_timer is not None:
            upstream.live_timer.cancel()
        upstream.live_timer = self.reactor.call_later(
            upstream.alive_timeout * LIVE_GRACE, self._live_deadline, upstream)

    def _live_deadline(self, upstream):
        upstream.live_timer = None
        self._lost(upstream, f"no live answer within {upstream.alive_timeout * LIVE_GRACE:g} s")

    def on_live(self, link, ok, detail):
        upstream = self.by_link.get(link)
        if upstream is None or upstream.state not in ("ready", "draining"):
            return
        if ok:
            self._arm_live(upstream)
        else:
            self._lost(upstream, f"live check failed: {detail}")

    def on_stream_closed(self, link, detail):
        upstream = self.by_link.get(link)
        if upstream is None or upstream.state not in ("ready", "draining"):
            return
        self._lost(upstream, f"data stream closed: {detail}")

    def _lost(self, upstream, reason):
        if upstream.state == "draining":
            self.remove(upstream.id, f"lost while draining: {reason}")
            return
        upstream.last_error = reason
        log.warning("upstream %s %s left rotation: %s", upstream.id, upstream.address, reason)
        self._leave_rotation(upstream, reason, reroute=True)
        upstream.state = "unready"
        self._retry_later(upstream)

    def _leave_rotation(self, upstream, reason, reroute):
        was_in = upstream in self.ready
        if was_in:
            self.ready.remove(upstream)
        if upstream.live_timer is not None:
            upstream.live_timer.cancel()
            upstream.live_timer = None
        if upstream.state not in ("ready", "draining"):
            return
        upstream.link.stop_live()
        unsent, unconfirmed = upstream.link.stop_stream()
        unsent += upstream.batch
        upstream.batch = []
        upstream.batch_bytes = 0
        upstream.blocked = False
        if self._notify_lost:
            self._notify_lost(upstream, reason)
        self.proxy.upstream_lost(upstream, unsent if reroute else [], unconfirmed)

    def _cancel_timers(self, upstream):
        for name in ("retry_timer", "live_timer"):
            timer = getattr(upstream, name)
            if timer is not None:
                timer.cancel()
                setattr(upstream, name, None)
