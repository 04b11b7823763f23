"""The upstream workers: the registry, the rotation, and each worker's cycle on the reactor's timers.

Owns which workers exist (`by_id`, `by_link`), which are in rotation
(`Upstreams.ready`, the list routing plugins choose from), and drives each
worker through its cycle with the decisions of `pplex.health`:

    connecting --rise x ready=true--> ready --stream broke / stalled / fall x heartbeat failed--> unready
        ^   \\--no/error/deadline--> unready (probes again: capped, jittered backoff,
        |                              and not before its ejection time is over)
        +------------------------------+
    ready --drain (admin) or GOAWAY (worker stops gracefully)--> draining: no new messages, the data
        stream is half-closed; when the worker ends it (or drain_timeout passes) an admin drain
        removes the worker, a GOAWAY drain sends it back to probing (it may come back)

Messages a worker was given but never wrote are re-routed to the others, in
order; messages written to a stream that then broke cannot be known delivered:
they are counted as unconfirmed (at-most-once), or sent again with
`server.redeliver_unconfirmed` (at-least-once).

Every call into a link is a fault boundary: an exception there is counted,
logged and handled as that worker failing, never as the proxy failing.
"""
import logging
import random

from pplex import limits, sessions
from pplex.errors import DuplicateUpstream
from pplex.health import Health, State
from pplex.logs import FAULTS, RateLimited
from pplex.transport import CLEAN_END

log = logging.getLogger("pplex.upstreams")
_limited = RateLimited()
# How often, per stall_timeout, a streaming worker's progress is looked at.
STALL_CHECKS_PER_TIMEOUT = 4
# Settings every upstream has, from config or the admin API, with their defaults.
UPSTREAM_DEFAULTS = {s.key: s.default for s in limits.SETTINGS if s.section == "upstream"}


class Upstream:
    __slots__ = (
        "id", "host", "port", "spec", "tls", "alive_timeout", "ready_timeout", "max_message_bytes",
        "merge_limit", "stall_timeout", "drain_timeout", "state", "link", "health",
        "batch", "batch_bytes", "blocked", "queued", "streaming", "routed",
        "last_error", "failures", "retry_timer", "live_timer", "stall_timer", "drain_timer",
        "stall_progress", "stall_since", "drain_then", "ever_ready", "removed", "lifecycle",
        "__weakref__",
    )

    def __init__(self, upstream_id, spec):
        self.id = upstream_id
        self.spec = spec
        self.host = spec["host"]
        self.port = spec["port"]
        self.tls = spec.get("tls")  # None (plaintext), True or the validated dict (pplex.tls)
        self.alive_timeout = spec["alive_timeout"]
        self.ready_timeout = spec["ready_timeout"]
        self.max_message_bytes = spec["max_message_bytes"]
        # Raw bytes merge into one message up to this size (never above the gRPC message limit).
        self.merge_limit = min(limits.MERGE_LIMIT_BYTES, self.max_message_bytes)
        self.stall_timeout = spec["stall_timeout"]
        self.drain_timeout = spec["drain_timeout"]
        self.health = Health(spec["rise"], spec["fall"], spec["ejection_time"], spec["max_ejection_time"])
        self.state = State.CONNECTING
        self.link = None
        self.batch = []           # messages routed here in this pass (flat: uuid, payload, time)
        self.batch_bytes = 0
        self.blocked = False      # the link refused a batch; waiting for on_drained
        self.queued = False       # in the proxy's list of upstreams to flush this pass
        self.streaming = False    # its data stream is open and takes batches (ready, or draining)
        self.routed = 0
        self.last_error = None
        self.failures = 0
        self.retry_timer = None
        self.live_timer = None
        self.stall_timer = None
        self.drain_timer = None
        self.stall_progress = 0
        self.stall_since = 0.0
        self.drain_then = None    # after a drain: "remove" (admin) or "probe" (GOAWAY)
        self.ever_ready = False
        self.removed = False
        self.lifecycle = False    # its latest ready answer announced "lifecycle" (README, Sessions)

    @property
    def address(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self):
        return f"<Upstream {self.id} {self.address} {self.state}>"

    def as_dict(self, now=None):
        health = self.health
        info = {
            "id": self.id, "host": self.host, "port": self.port, "address": self.address,
            "state": str(self.state), "alive_timeout": self.alive_timeout,
            "ready_timeout": self.ready_timeout, "max_message_bytes": self.max_message_bytes,
            "messages_routed": self.routed, "last_error": self.last_error, "tls": self.tls,
            "lifecycle": self.lifecycle,
            "ejections": health.ejections_total, "ejections_in_a_row": health.ejections,
            "queued_bytes": self.batch_bytes,
            "backlog": self.link.backlog() if self.streaming else 0,   # offered, not yet written
            "live_rtt_seconds": getattr(self.link, "live_seconds", None),
            "ready_probe_seconds": getattr(self.link, "ready_seconds", None),
        }
        if now is not None:
            info["ejected_for_seconds"] = round(health.wait(now), 3)
        return info


class Upstreams:
    """Every registered worker; reacts to link health events on the reactor thread."""

    def __init__(self, reactor, transport, proxy, redeliver=False,
                 notify_added=None, notify_ready=None, notify_lost=None):
        self.reactor = reactor
        self.transport = transport
        self.proxy = proxy
        self.redeliver = redeliver
        self.by_id = {}
        self.by_link = {}
        # The routing candidates, changed in place so plugins may hold a reference.
        self.ready = []
        # Those of them that announced "lifecycle": where CONNECTED / DISCONNECTED may go.
        self.lifecycle_ready = []
        # Some registered worker announced "lifecycle" in its latest ready answer: clients get events
        # (waiting for such a worker when none is ready).
        self.lifecycle_known = False
        self.stopping = False     # pplex is stopping: streams that end are let go quietly
        self._finishing = None    # finish_streams' state while it waits
        self.replies_paused = False
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
    def add(self, spec):
        """Register a worker from a validated upstream spec (config or admin API); returns it."""
        spec = {**UPSTREAM_DEFAULTS, **spec}
        for existing in self.by_id.values():
            if existing.host == spec["host"] and existing.port == spec["port"]:
                raise DuplicateUpstream(f"upstream {existing.address} is already registered as {existing.id}")
        upstream = Upstream(f"u{self._next_id}", spec)
        self._next_id += 1
        upstream.link = self.transport.connect(upstream, self.proxy)
        upstream.link.keep_unconfirmed = self.redeliver
        self.by_id[upstream.id] = upstream
        self.by_link[upstream.link] = upstream
        log.info("upstream %s %s added (alive_timeout %ss, ready_timeout %ss%s)",
                 upstream.id, upstream.address, upstream.alive_timeout, upstream.ready_timeout,
                 ", TLS" if upstream.tls else "", extra={"upstream": upstream.address})
        if self._notify_added:
            self._notify_added(upstream)
        self._probe(upstream)
        return upstream

    def remove(self, upstream_id, reason="removed"):
        upstream = self.by_id.pop(upstream_id, None)
        if upstream is None:
            return None
        if upstream.state is State.DRAINING:
            upstream.state = State.UNREADY   # a drain cut short: what it holds is handled as a loss
        self._leave_rotation(upstream, reason)
        upstream.removed = True
        upstream.state = State.REMOVED
        self._cancel_timers(upstream)
        self.by_link.pop(upstream.link, None)
        self._link_call(upstream, "close", upstream.link.close)
        log.info("upstream %s %s removed (%s)", upstream.id, upstream.address, reason,
                 extra={"upstream": upstream.address})
        if upstream.lifecycle:
            self._lifecycle_changed()
        return upstream

    def drain(self, upstream_id):
        """Stop routing to it, let it finish what it was given, then remove it (admin API)."""
        upstream = self.by_id.get(upstream_id)
        if upstream is None:
            return None
        if upstream.state is not State.READY:
            if upstream.state is not State.DRAINING:
                self.remove(upstream_id, "drained (it was not in rotation)")
            return upstream.as_dict()
        self._start_drain(upstream, "remove", "drain requested")
        return upstream.as_dict()

    def close(self):
        for upstream in list(self.by_id.values()):
            self.by_id.pop(upstream.id, None)
            self._cancel_timers(upstream)
            self._link_call(upstream, "close", upstream.link.close)
        self.ready.clear()
        self.lifecycle_ready.clear()
        if self._finishing is not None:
            if self._finishing[4] is not None:
                self._finishing[4].cancel()
            self._finishing = None

    # -- calls into links: fault boundaries ------------------------------------
    def _link_call(self, upstream, what, fn, *args):
        """Call a link method; an exception is counted, logged, and returned as its text (else None)."""
        try:
            fn(*args)
        except Exception as error:
            FAULTS.report("link " + what, "upstream %s %s", upstream.id, upstream.address, logger=log)
            return f"internal error in the transport ({what}): {error!r}"
        return None

    def link_failed(self, upstream, reason):
        """The proxy could not hand it a batch (the transport raised): it leaves rotation."""
        if upstream.state in (State.READY, State.DRAINING):
            self._lost(upstream, reason)

    # -- the health cycle ----------------------------------------------------
    def _probe(self, upstream):
        upstream.retry_timer = None
        if upstream.removed:
            return
        error = self._link_call(upstream, "probe_ready", upstream.link.probe_ready, upstream.ready_timeout)
        if error is not None:
            # It may have failed for want of file descriptors: the cycle goes on regardless.
            self.reactor.call_soon(self.on_ready, upstream.link, False, error)

    def _retry_later(self, upstream, at_least=0.0):
        delay = min(limits.RETRY_MAX_SECONDS, limits.RETRY_FIRST_SECONDS * 2 ** upstream.failures)
        delay *= random.uniform(0.5, 1.0)  # jitter: workers that fell together do not retry together
        delay = max(delay, at_least * random.uniform(1.0, 1.1))
        upstream.failures = min(upstream.failures + 1, 16)
        if upstream.retry_timer is not None:
            upstream.retry_timer.cancel()
        upstream.retry_timer = self.reactor.call_later(delay, self._probe, upstream)

    def on_ready(self, link, ok, detail, features=()):
        upstream = self.by_link.get(link)
        if upstream is None or upstream.state in (State.READY, State.DRAINING) or upstream.removed:
            return
        if ok:
            lifecycle = sessions.LIFECYCLE in features  # other words are for other versions: ignored
            if lifecycle != upstream.lifecycle:
                upstream.lifecycle = lifecycle
                log.info("upstream %s %s %s lifecycle events", upstream.id, upstream.address,
                         "asks for" if lifecycle else "no longer asks for", extra={"upstream": upstream.address})
                self._lifecycle_changed()
        health = upstream.health
        if not health.ready_answer(ok):
            if upstream.state is State.CONNECTING:  # its first probes: each one is news
                log.warning("upstream %s %s not ready: %s", upstream.id, upstream.address, detail,
                            extra={"upstream": upstream.address})
            elif upstream.last_error != detail:     # a worker that stays down: only changes, rate limited
                _limited.warning(log, ("not ready", upstream.id), "upstream %s %s not ready: %s",
                                 upstream.id, upstream.address, detail)
            upstream.last_error = detail
            if upstream.state is not State.CONNECTING or upstream.failures > 2:
                upstream.state = State.UNREADY
            self._retry_later(upstream)
            return
        now = self.reactor.clock()
        wait = health.wait(now)
        if health.ok_in_row < health.rise or wait > 0:
            # Not yet: more ready answers needed, or still serving an ejection.
            upstream.retry_timer = self.reactor.call_later(
                max(wait, limits.RETRY_FIRST_SECONDS), self._probe, upstream)
            return
        self._enter_rotation(upstream, now)

    def _enter_rotation(self, upstream, now):
        upstream.failures = 0
        link = upstream.link
        error = (self._link_call(upstream, "open_stream", link.open_stream)
                 or self._link_call(upstream, "start_live", link.start_live, upstream.alive_timeout))
        if error is not None:
            upstream.last_error = error
            upstream.state = State.UNREADY
            self._retry_later(upstream, at_least=upstream.health.eject(now))
            return
        if self.replies_paused:
            self._link_call(upstream, "pause_replies", link.pause_replies)
        upstream.health.entered(now)
        upstream.state = State.READY
        upstream.streaming = True
        upstream.ever_ready = True
        upstream.blocked = False
        upstream.stall_progress = link.progress()
        upstream.stall_since = now
        self.ready.append(upstream)
        if upstream.lifecycle:
            self.lifecycle_ready.append(upstream)
        self._arm_live(upstream)
        self._arm_stall_check(upstream)
        log.info("upstream %s %s ready", upstream.id, upstream.address, extra={"upstream": upstream.address})
        if self._notify_ready:
            self._notify_ready(upstream)
        self.proxy.upstream_ready(upstream)

    # -- heartbeats ------------------------------------------------------------
    def _arm_live(self, upstream):
        if upstream.live_timer is not None:
            upstream.live_timer.cancel()
        upstream.live_timer = self.reactor.call_later(
            upstream.alive_timeout * limits.LIVE_GRACE, self._live_deadline, upstream)

    def _live_deadline(self, upstream):
        upstream.live_timer = None
        self._heartbeat(upstream, False,
                        f"no live answer within {upstream.alive_timeout * limits.LIVE_GRACE:g} s")

    def on_live(self, link, ok, detail):
        upstream = self.by_link.get(link)
        if upstream is not None:
            self._heartbeat(upstream, ok, f"live check failed: {detail}")

    def _heartbeat(self, upstream, ok, reason):
        if upstream.state is not State.READY:
            return
        if upstream.health.heartbeat(ok, self.reactor.clock()):
            self._lost(upstream, reason)
        else:
            self._arm_live(upstream)

    # -- the data stream ---------------------------------------------------------
    def _arm_stall_check(self, upstream):
        upstream.stall_timer = self.reactor.call_later(
            upstream.stall_timeout / STALL_CHECKS_PER_TIMEOUT, self._stall_check, upstream)

    def _stall_check(self, upstream):
        upstream.stall_timer = None
        if not upstream.streaming:
            return
        now = self.reactor.clock()
        link = upstream.link
        progress = link.progress()
        if progress != upstream.stall_progress or not (upstream.batch or link.backlog()):
            upstream.stall_progress = progress
            upstream.stall_since = now
        elif now - upstream.stall_since >= upstream.stall_timeout:
            waiting = len(upstream.batch) // 3 + link.backlog()
            self._lost(upstream, f"data stream stalled: it took nothing for {now - upstream.stall_since:.1f} s "
                                 f"while {waiting} message(s) waited (stall_timeout {upstream.stall_timeout:g} s)")
            return
        self._arm_stall_check(upstream)

    def on_stream_closed(self, link, detail):
        upstream = self.by_link.get(link)
        if upstream is None:
            return
        if self.stopping and upstream.state in (State.READY, State.DRAINING):
            upstream.state = State.UNREADY  # the end finish_streams waits for: no alarm, no retry
            self._leave_rotation(upstream, f"pplex is stopping ({detail})")
            self._finish_check()
            return
        if upstream.state is State.DRAINING:
            if detail == CLEAN_END:
                self._end_drain(upstream, "it ended its stream")
            else:
                self._end_drain(upstream, f"data stream closed while draining: {detail}", broke=True)
        elif upstream.state is State.READY:
            self._lost(upstream, f"data stream closed: {detail}")

    def on_goaway(self, link, detail):
        """The worker is stopping gracefully (HTTP/2 GOAWAY): drain it; it may come back later."""
        upstream = self.by_link.get(link)
        if upstream is not None and upstream.state is State.READY:
            self._start_drain(upstream, "probe", f"the worker is going away ({detail})")

    def pause_replies(self):
        """Clients are not reading fast enough (output_budget): take no more replies from any worker."""
        self.replies_paused = True
        for upstream in list(self.by_id.values()):
            if upstream.streaming:
                self._link_call(upstream, "pause_replies", upstream.link.pause_replies)

    def resume_replies(self):
        self.replies_paused = False
        for upstream in list(self.by_id.values()):
            if upstream.streaming:
                self._link_call(upstream, "resume_replies", upstream.link.resume_replies)

    # -- leaving rotation ----------------------------------------------------------
    def _lost(self, upstream, reason):
        """It failed while in rotation (or draining): eject it; what it held goes elsewhere."""
        if upstream.state is State.DRAINING:
            self._end_drain(upstream, f"lost while draining: {reason}", broke=True)
            return
        now = self.reactor.clock()
        upstream.last_error = reason
        out_for = upstream.health.eject(now)
        log.warning("upstream %s %s left rotation: %s (ejection %d in a row: out for at least %.1f s)",
                    upstream.id, upstream.address, reason, upstream.health.ejections, out_for,
                    extra={"upstream": upstream.address, "reason": reason})
        upstream.state = State.UNREADY
        self._leave_rotation(upstream, reason)
        self._retry_later(upstream, at_least=out_for)

    def _start_drain(self, upstream, then, why):
        self._out_of_ready(upstream)
        upstream.state = State.DRAINING
        upstream.drain_then = then
        upstream.health.left()
        self._cancel_timer(upstream, "live_timer")
        self._link_call(upstream, "stop_live", upstream.link.stop_live)
        # Routed to it this pass but not handed over yet: it gets nothing new, so they go elsewhere.
        batch, upstream.batch, upstream.batch_bytes = upstream.batch, [], 0
        self._link_call(upstream, "close_send", upstream.link.close_send)
        upstream.drain_timer = self.reactor.call_later(upstream.drain_timeout, self._drain_deadline, upstream)
        log.info("upstream %s %s draining: %s", upstream.id, upstream.address, why,
                 extra={"upstream": upstream.address})
        if self._notify_lost:
            self._notify_lost(upstream, f"draining: {why}")
        if batch:
            self.proxy.upstream_lost(upstream, batch, 0)

    def _drain_deadline(self, upstream):
        upstream.drain_timer = None
        if upstream.state is State.DRAINING:
            self._end_drain(upstream, f"drain_timeout ({upstream.drain_timeout:g} s) passed", broke=True)

    def _end_drain(self, upstream, how, broke=False):
        then = upstream.drain_then
        self._cancel_timer(upstream, "drain_timer")
        if broke:  # not the clean end a drain waits for: what it held may be lost
            upstream.last_error = how
            log.warning("upstream %s %s left rotation: %s", upstream.id, upstream.address, how,
                        extra={"upstream": upstream.address, "reason": how})
        upstream.state = State.UNREADY
        self._leave_rotation(upstream, how)
        if then == "remove":
            self.remove(upstream.id, f"drained: {how}")
        else:
            log.info("upstream %s %s drained (%s); probing it again", upstream.id, upstream.address, how,
                     extra={"upstream": upstream.address})
            upstream.failures = 0
            self._retry_later(upstream)

    def _leave_rotation(self, upstream, reason):
        """Out of rotation for good or for now: stop its streams and route again what it held.

        State is committed first, so a plugin or event that raises later leaves no half-made transition.
        """
        self._out_of_ready(upstream)
        self._cancel_timer(upstream, "live_timer")
        self._cancel_timer(upstream, "stall_timer")
        if not upstream.streaming:
            return
        upstream.streaming = False
        upstream.blocked = False
        link = upstream.link
        self._link_call(upstream, "stop_live", link.stop_live)
        unsent, unconfirmed, resend = [], 0, []
        try:
            unsent, unconfirmed, resend = link.stop_stream()
        except Exception:
            FAULTS.report("link stop_stream", "upstream %s %s", upstream.id, upstream.address, logger=log)
        unsent += upstream.batch
        upstream.batch = []
        upstream.batch_bytes = 0
        if self._notify_lost:
            self._notify_lost(upstream, reason)
        self.proxy.upstream_lost(upstream, unsent, unconfirmed, resend)

    def _out_of_ready(self, upstream):
        if upstream in self.ready:
            self.ready.remove(upstream)
        if upstream in self.lifecycle_ready:
            self.lifecycle_ready.remove(upstream)

    def _lifecycle_changed(self):
        self.lifecycle_known = any(u.lifecycle for u in self.by_id.values())

    # -- stopping: the last lifecycle events reach their workers ------------------------
    def finish_streams(self, on_done, timeout=limits.EVENTS_FLUSH_SECONDS):
        """pplex is stopping and its clients are gone: let each lifecycle worker's data stream take
        the events queued for it (their DISCONNECTED), half-close it once it took them all, and call
        `on_done()` when every such stream ended, or after `timeout` seconds. Other workers' streams
        are not waited for (they are cut when the links close)."""
        waiting = {u for u in self.by_id.values() if u.streaming and u.lifecycle}
        if not waiting:
            on_done()
            return
        self.stopping = True
        # [streams waiting, streams half-closed, on_done, deadline, check timer]
        self._finishing = [waiting, set(), on_done, self.reactor.clock() + timeout, None]
        log.info("waiting up to %g s for %d lifecycle worker(s) to take their last events", timeout, len(waiting))
        self._finish_check()

    def _finish_check(self):
        if self._finishing is None:
            return
        waiting, half_closed, on_done, deadline, timer = self._finishing
        if timer is not None:
            timer.cancel()
            self._finishing[4] = None
        for upstream in list(waiting):
            if not upstream.streaming:
                waiting.discard(upstream)
            elif upstream not in half_closed and not upstream.batch:
                # Every event is handed to the link: it writes them, then ends its side.
                half_closed.add(upstream)
                self._link_call(upstream, "close_send", upstream.link.close_send)
        if waiting and self.reactor.clock() < deadline:
            self._finishing[4] = self.reactor.call_later(limits.EVENTS_FLUSH_CHECK_SECONDS, self._finish_check)
            return
        self._finishing = None
        if waiting:
            log.warning("%d lifecycle worker(s) did not end their stream within %g s: their last events "
                        "may be lost", len(waiting), limits.EVENTS_FLUSH_SECONDS)
        on_done()

    def _cancel_timer(self, upstream, name):
        timer = getattr(upstream, name)
        if timer is not None:
            timer.cancel()
            setattr(upstream, name, None)

    def _cancel_timers(self, upstream):
        for name in ("retry_timer", "live_timer", "stall_timer", "drain_timer"):
            self._cancel_timer(upstream, name)
