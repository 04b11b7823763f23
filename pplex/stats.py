"""Counters of what the proxy did, kept as plain integers on the reactor thread.

Cheap to bump on the per-message path (an attribute add), read by the admin
API and the metrics exporter. Drops are counted by reason and closes by their
code (`pplex.reasons`), never silent.
"""
import time

UNKNOWN_LOG_INTERVAL = 1.0  # seconds between log lines about replies to unknown clients


class Stats:
    def __init__(self):
        self.started = time.time()
        self.opened = 0
        self.closed = 0
        self.refused = 0
        # Totals of closed connections; open ones are summed when asked.
        self.bytes_in = self.bytes_out = 0
        self.messages_in = self.messages_out = 0
        self.batches = 0
        self.broadcasts = 0
        self.rerouted = 0
        self.redelivered = 0
        self.unconfirmed = 0
        self.backpressure_episodes = 0
        self.drops = {}
        self.closes = {}   # reason code -> connections closed for it
        self.front_door = {}   # kind (pplex.frontdoor) -> clients closed before they were open
        self.events = [0, 0, 0]   # lifecycle events queued for workers, by kind (1 CONNECTED, 2 DISCONNECTED)
        self.actions = {}  # worker actions applied, by name (send to a group, close, join, leave)
        self._unknown_logged_at = 0.0
        self._unknown_since_log = 0

    def drop(self, reason, count=1):
        self.drops[reason] = self.drops.get(reason, 0) + count

    def note_unknown(self, client_uuid, log):
        """Log replies to unknown clients at most once a second, with how many there were."""
        self._unknown_since_log += 1
        now = time.monotonic()
        if now - self._unknown_logged_at >= UNKNOWN_LOG_INTERVAL:
            log.info("reply for unknown client %s (%d such replies since the last line)",
                     client_uuid, self._unknown_since_log, extra={"uuid": client_uuid})
            self._unknown_logged_at = now
            self._unknown_since_log = 0

    def add_closed(self, conn, reason):
        self.closed += 1
        self.closes[reason] = self.closes.get(reason, 0) + 1
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        self.messages_in += conn.messages_in
        self.messages_out += conn.messages_out

    def snapshot(self, conns, extra=None):
        """Every counter, open connections included (`conns`: the open ones)."""
        conns = list(conns)
        snap = {
            "connections_open": len(conns), "connections_opened": self.opened,
            "connections_closed": self.closed, "connections_refused": self.refused,
            "messages_in": self.messages_in + sum(c.messages_in for c in conns),
            "messages_out": self.messages_out + sum(c.messages_out for c in conns),
            "bytes_in": self.bytes_in + sum(c.bytes_in for c in conns),
            "bytes_out": self.bytes_out + sum(c.bytes_out for c in conns),
            "batches": self.batches, "broadcasts": self.broadcasts, "rerouted": self.rerouted,
            "redelivered": self.redelivered, "unconfirmed": self.unconfirmed,
            "backpressure_episodes": self.backpressure_episodes,
            "drops": dict(self.drops), "closes": dict(self.closes), "front_door": dict(self.front_door),
            "lifecycle_events": {"connected": self.events[1], "disconnected": self.events[2]},
            "actions": dict(self.actions),
            "uptime_seconds": round(time.time() - self.started, 3),
        }
        if extra:
            snap.update(extra)
        return snap
