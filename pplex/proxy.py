"""The per-message path: client bytes to worker batches, worker messages to clients.

Owns the table of open connections and the flow of a message through the
resolved plugin chain (framing, auth, routing, balancing) into the batch of
the chosen upstream; and back: replies by UUID, broadcasts through the
broadcast plugin. At the end of each reactor pass it offers each upstream
its batch (one hand-off per upstream per pass) and gives each client one
write. It also owns how clients end: half-close, slow consumers, idle
deadlines, a worker's CLOSE, shutdown. Accepting is `pplex.listener`'s; the
session extension (lifecycle events, worker actions, groups) is
`pplex.lifecycle`'s, called from here; everything runs on the reactor thread.

Memory is bounded everywhere on this path:
- what a client may have waiting while no worker is ready (`max_pending_bytes`);
- what an upstream batch may hold before its clients stop being read
  (`limits.UPSTREAM_BATCH_HIGH`, merged raw bytes included);
- what a client has not read (`client_buffer_high` starts its slow-consumer
  clock, `client_buffer_limit` closes it at once);
- what all clients together have not read (`output_budget`): above it pplex
  stops taking replies from workers, so a worker that produces faster than
  clients read is slowed by HTTP/2 flow control instead of filling memory.
"""
import collections
import logging
import random

from pplex import limits, node, reasons
from pplex.connection import Connection, format_peer
from pplex.errors import FrameError
from pplex.frontdoor import FrontDoor
from pplex.lifecycle import HELD, Lifecycle
from pplex.listener import Listener
from pplex.reactor import READ
from pplex.logs import FAULTS, RateLimited
from pplex.stats import Stats
from pplex.timestamps import rfc3339_now
from pplex.transport import Event
from pplex.upstreams import Upstreams

log = logging.getLogger("pplex.proxy")

BROADCAST_NAMES = {0: "ALL", 1: "ACTIVE", 2: "NOT_ACTIVE"}
_limited = RateLimited()


class Proxy:
    """Client connections and message flow; the `LinkEvents` every link reports to."""

    # conn.eof: 0 open; LINGERING replies to its last messages may still come;
    # FLUSHING the linger is over and it closes once its writes are out.
    LINGERING, FLUSHING = 1, 2

    def __init__(self, reactor, config, plugins, transport):
        server = config["server"]
        self.reactor = reactor
        self.config = config
        self.plugins = plugins
        self.stats = Stats()
        self.conns = {}
        self.dirty_clients = []
        self.dirty_upstreams = []
        self.waiting_clients = {}  # ordered sets: clients with messages held for want of a worker,
        self.paused_clients = {}   # and clients not read because their upstream's batch is full
        self.idle_timeout = server["idle_timeout"]
        self.active_window = server["active_window"]
        self.max_pending_bytes = server["max_pending_bytes"]
        self.slow_consumer_timeout = server["slow_consumer_timeout"]
        self.output_budget = server["output_budget"]
        self.eof_linger = server["eof_linger"]
        self.eof_stall_timeout = server["eof_stall_timeout"]
        self.shutdown_grace = server["shutdown_grace"]
        self.shutdown_spread = server["shutdown_spread"]
        self.client_output_bytes = 0   # unread bytes of all clients (kept by their buffers)
        self.replies_paused = False
        self.shutting_down = False
        self._on_shutdown_done = None
        self._stamp = None
        self._verbose = log.isEnabledFor(logging.INFO)
        # The client class of this proxy: the buffer marks are class attributes, not per connection.
        self.client_class = type("Client", (Connection,), {
            "__slots__": (), "write_high": server["client_buffer_high"],
            "write_low": min(server["client_buffer_low"], server["client_buffer_high"]),
            "write_limit": server["client_buffer_limit"]})
        # Between accept and open: PROXY header, TLS handshake (nothing when neither is set).
        self.front_door = FrontDoor(reactor, server, self.client_class, self._open, self.stats)
        self.listener = Listener(
            reactor, self.front_door.on_accept, server["max_connections"], self.front_door.counter(self.conns),
            keepalive=(server["tcp_keepalive_idle"], server["tcp_keepalive_interval"],
                       server["tcp_keepalive_count"]))
        self.front_door.listener = self.listener
        self.new_uuid = node.current.uuid_maker()  # UUIDv4 whose first 8 hex digits name this node
        self.cluster = None  # pplex.cluster.Cluster when cluster.broker is set (App sets it)

        framing = plugins.framing()
        self.decode = framing.decode
        self.encode = framing.encode
        self.merges = bool(framing.merges)
        self.route = plugins.resolve("pplex_route")
        self.balance = plugins.resolve("pplex_balance")
        self.broadcast = plugins.resolve("pplex_broadcast")
        self.accept_hook = plugins.resolve("pplex_accept")
        self.authenticate = plugins.resolve("pplex_authenticate")
        self.notify_opened = plugins.notifier("pplex_connection_opened")
        self.notify_authenticated = plugins.notifier("pplex_connection_authenticated")
        self.notify_closed = plugins.notifier("pplex_connection_closed")

        self.upstreams = Upstreams(
            reactor, transport, self, redeliver=server["redeliver_unconfirmed"],
            notify_added=plugins.notifier("pplex_upstream_added"),
            notify_ready=plugins.notifier("pplex_upstream_ready"),
            notify_lost=plugins.notifier("pplex_upstream_lost"))
        self.ready = self.upstreams.ready
        self.lifecycle = Lifecycle(self, server)
        self.groups = self.lifecycle.groups
        reactor.add_pass_end(self._end_of_pass)

    # -- accepting -----------------------------------------------------------
    def listen(self, host, port, backlog=1024, reuse_port=False):
        """Bind and listen; return the bound (host, port). `reuse_port`: share the port (--processes)."""
        return self.listener.listen(host, port, backlog, reuse_port)

    @property
    def accepting(self):
        return self.listener.accepting

    def _open(self, sock, peer, arrival=None):
        """Open a client; `arrival`: what the front door learnt of it (PROXY header, TLS), or None.
        Returns the connection, or None when the accept rules refused it."""
        if self.accept_hook is not None:
            try:
                allowed = self.accept_hook(peer[:2])
            except Exception:
                FAULTS.report("plugin pplex_accept", "deciding on %s; refusing it", format_peer(peer), logger=log)
                allowed = False
            if allowed is False:
                self.stats.refused += 1
                if self._verbose:
                    log.info("refused %s: not allowed by the accept rules", format_peer(peer))
                sock.close()
                return None
        sock.setblocking(False)
        now = self.reactor.clock()
        if arrival is None:
            conn = self.client_class(self, sock, self.new_uuid(), peer, now)
            conn.set_events(READ)
        else:
            conn = arrival.client_class(self, sock, self.new_uuid(), peer, now)
            arrival.hand_over(conn)   # its TLS engine and facts, its PROXY header; registers the socket
        self.conns[conn.uuid] = conn
        self.stats.opened += 1
        if self.authenticate is not None:
            conn.authenticated = False
        if self.idle_timeout:
            conn.idle_timer = self.reactor.call_at(now + self.idle_timeout, self._idle_check, conn)
        if self._verbose:
            log.info("open %s from %s", conn.uuid, format_peer(peer), extra={"uuid": conn.uuid})
        if self.notify_opened is not None:
            self.notify_opened(conn)
        if self.authenticate is None:
            self._admitted(conn)
        if arrival is not None:
            arrival.deliver(conn)     # what the client sent with its last bytes at the front door
        return conn

    def _admitted(self, conn):
        """`conn` passed the accept and auth plugins: lifecycle workers hear of it (CONNECTED)."""
        if conn.closed:
            return
        try:
            self.lifecycle.connected(conn)
        except Exception:
            self.failed(conn, "sending its CONNECTED")

    # -- client to worker ----------------------------------------------------
    def received(self, conn, data):
        """Bytes read from a client."""
        conn.last_read = self.reactor.clock()
        if self.merges:
            up = conn.last_upstream
            if up is not None and up.batch is conn.merge_batch and conn.waiting is None:
                # Its previous message still waits for the stream: join it.
                batch = up.batch
                index = conn.merge_index
                payload = batch[index]
                if len(payload) + len(data) <= up.merge_limit:
                    if payload.__class__ is bytes:
                        payload = batch[index] = bytearray(payload)
                    payload += data
                    up.batch_bytes += len(data)
                    if up.batch_bytes > limits.UPSTREAM_BATCH_HIGH:
                        self._pause_reading(conn)
                    return
        try:
            messages = self.decode(conn, data)
        except FrameError as error:
            self.close(conn, reasons.PROTOCOL_ERROR, f"bad input: {error}")
            return
        for payload in messages:
            if conn.closed:
                return
            self.submit(conn, payload)

    def submit(self, conn, payload):
        """One message from a client: authenticate, route, balance, batch."""
        conn.messages_in += 1
        if not conn.authenticated:
            self._authenticate(conn, payload)
            return
        if conn.waiting is not None:
            self._hold(conn, payload)
            return
        candidates = self.route(conn, payload, self.ready)
        if not candidates:
            self._hold(conn, payload)
            return
        up = self.balance(conn, payload, candidates)
        if len(payload) > up.max_message_bytes:
            self.close(conn, reasons.PROTOCOL_ERROR,
                       f"a message of {len(payload)} bytes is above max_message_bytes "
                       f"({up.max_message_bytes}) of upstream {up.id}")
            return
        batch = up.batch
        conn.last_upstream = up
        if self.merges:
            conn.merge_batch = batch
            conn.merge_index = len(batch) + 1
        batch.append(conn.uuid)
        batch.append(payload)
        batch.append(self._stamp or self._new_stamp())
        up.batch_bytes += len(payload)
        up.routed += 1
        if not up.queued:
            up.queued = True
            self.dirty_upstreams.append(up)
        if up.batch_bytes > limits.UPSTREAM_BATCH_HIGH:
            self._pause_reading(conn)

    def _new_stamp(self):
        self._stamp = rfc3339_now()
        return self._stamp

    def _pause_reading(self, conn):
        conn.pause_reading()
        self.paused_clients[conn] = None

    def _authenticate(self, conn, payload):
        verdict = self.authenticate(conn, payload)
        if verdict is True:
            conn.authenticated = True
            if self._verbose:
                log.info("authenticated %s", conn.uuid, extra={"uuid": conn.uuid})
            if self.notify_authenticated is not None:
                self.notify_authenticated(conn)
            self._admitted(conn)
        elif verdict is False:
            self.stats.drop("auth_rejected")
            self.close(conn, reasons.AUTH_FAILED, "authentication failed")

    def _hold(self, conn, payload):
        if conn.waiting is None:
            conn.waiting = collections.deque()
            self.waiting_clients[conn] = None
        conn.waiting.append(payload)
        conn.waiting_bytes += len(payload)
        if conn.waiting_bytes > self.max_pending_bytes:
            self.stats.drop("max_pending_bytes", len(conn.waiting) - (conn.session is HELD))
            conn.waiting = None  # counted here, not again as gone with the client
            self.close(conn, reasons.NO_UPSTREAM, f"more than max_pending_bytes ({self.max_pending_bytes}) "
                                                  "waiting while no worker was ready")

    def release_waiting(self):
        """Route messages held for want of a worker, each client's in its order."""
        for conn in list(self.waiting_clients):
            self.waiting_clients.pop(conn, None)
            held, conn.waiting, conn.waiting_bytes = conn.waiting, None, 0
            try:
                while held and not conn.closed:
                    payload = held.popleft()
                    if payload.__class__ is Event:  # its CONNECTED, held before its messages
                        if not self.lifecycle.release_held(payload):
                            held.appendleft(payload)  # still no lifecycle worker: all of it waits on
                            conn.waiting, conn.waiting_bytes = held, sum(map(len, held))
                            self.waiting_clients[conn] = None
                            break
                        continue
                    self.submit(conn, payload)
                    conn.messages_in -= 1  # counted when it first arrived
                    if conn.waiting is not None:  # held again (no candidate): keep the rest behind it
                        conn.waiting.extend(held)
                        conn.waiting_bytes += sum(len(p) for p in held)
                        break
            except Exception:
                self.failed(conn, "routing its held messages")

    def reroute(self, batch, events=True):
        """Route again the messages of a flat batch (a worker that left never took them); returns (routed, lost).

        Lifecycle events in it go to another lifecycle worker, unless `events` is False (a batch that
        may have been read: events are sent at most once)."""
        routed = lost = 0
        conns = self.conns
        for i in range(0, len(batch), 3):
            if batch[i + 1].__class__ is Event:
                if events:
                    try:
                        self.lifecycle.reroute(batch[i + 1])
                    except Exception:
                        FAULTS.report("lifecycle event", "routing again an event of client %s; dropped",
                                      batch[i], logger=log)
                continue
            conn = conns.get(batch[i])
            if conn is None or conn.closed:
                lost += 1
                continue
            conn.messages_in -= 1
            try:
                self.submit(conn, bytes(batch[i + 1]))
            except Exception:
                self.failed(conn, "re-routing its message")
                continue
            routed += 1
        return routed, lost

    # -- the end of a reactor pass: one offer per upstream, one write per client --------
    def _end_of_pass(self):
        self._stamp = None
        if self.dirty_upstreams:
            upstreams, self.dirty_upstreams = self.dirty_upstreams, []
            for up in upstreams:
                up.queued = False
                if up.batch and not up.blocked and up.streaming:
                    try:
                        taken = up.link.offer(up.batch)
                    except Exception:
                        FAULTS.report("upstream offer", "offering a batch to upstream %s %s",
                                      up.id, up.address, logger=log)
                        self.upstreams.link_failed(up, "internal error while writing to its stream")
                        continue
                    if taken:
                        self.stats.batches += 1
                        up.batch = []
                        up.batch_bytes = 0
                    else:
                        up.blocked = True
        if self.paused_clients:
            self._resume_paused()
        if self.dirty_clients:
            clients, self.dirty_clients = self.dirty_clients, []
            for conn in clients:
                try:
                    conn.flush()
                except Exception:
                    FAULTS.report("client flush", "writing to client %s", conn.uuid, logger=log)
                    self._close_quietly(conn, reasons.INTERNAL_ERROR, "internal error while writing to it")
        if self.client_output_bytes > self.output_budget:
            if not self.replies_paused:
                self.replies_paused = True
                _limited.warning(log, "output_budget",
                                 "clients have %d unread bytes, above output_budget (%d): taking no more "
                                 "replies from workers until half of it is written",
                                 self.client_output_bytes, self.output_budget)
                self.stats.backpressure_episodes += 1
                self.upstreams.pause_replies()
        elif self.replies_paused and self.client_output_bytes <= self.output_budget // 2:
            self.replies_paused = False
            self.upstreams.resume_replies()

    def _resume_paused(self):
        still = {}
        for conn in self.paused_clients:
            up = conn.last_upstream
            if conn.closed:
                continue
            if up is not None and up.streaming and up.batch_bytes > limits.UPSTREAM_BATCH_HIGH // 2:
                still[conn] = None
            else:
                conn.resume_reading()
        self.paused_clients = still

    # -- worker to client (LinkEvents) ----------------------------------------
    def on_reply(self, link, client_uuid, payload):
        conn = self.conns.get(client_uuid)
        if conn is None:
            if self.cluster is not None and self.cluster.relay_reply(link, client_uuid, payload):
                return  # another node's client: relayed to it
            self.stats.drop("unknown_uuid")
            self.stats.note_unknown(client_uuid, log)
            return
        try:
            data = self.encode(payload)
        except Exception:
            # The framing plugin cannot encode it (e.g. too long for its length prefix):
            # this reply is dropped and counted; the client and every other reply go on.
            self.stats.drop("reply_not_encodable")
            FAULTS.report("plugin framing encode", "encoding a %d-byte reply for client %s; dropped",
                          len(payload), client_uuid, logger=log)
            return
        conn.send(data)

    def on_broadcast(self, link, kind, payload):
        try:
            targets = self.broadcast(kind, self.conns.values(), self.reactor.clock())
            if targets is None:
                self.on_bad_message(link, f"unknown broadcast value {kind}")
                return
            data = self.encode(payload)
            self.stats.broadcasts += 1
            for conn in targets:
                conn.send(data)
        except Exception:
            self.stats.drop("broadcast_failed")
            FAULTS.report("plugin broadcast", "delivering a %d-byte %s broadcast; dropped", len(payload),
                          BROADCAST_NAMES.get(kind, kind), logger=log)
        if self.cluster is not None:
            self.cluster.relay_broadcast(link, kind, payload)

    def on_bad_message(self, link, reason):
        up = self.upstreams.by_link.get(link)
        self.stats.drop("bad_worker_message")
        _limited.warning(log, ("bad_message", link), "upstream %s sent a message pplex cannot deliver: %s",
                         up.address if up else "?", reason)

    def on_drained(self, link):
        up = self.upstreams.by_link.get(link)
        if up is None:
            return
        up.blocked = False
        if up.batch and not up.queued:
            up.queued = True
            self.dirty_upstreams.append(up)

    def on_action(self, link, action, which, target, payload, groups):
        self.lifecycle.on_action(link, action, which, target, payload, groups)

    def on_ready(self, link, ok, detail, features=()):
        self.upstreams.on_ready(link, ok, detail, features)

    def on_live(self, link, ok, detail):
        self.upstreams.on_live(link, ok, detail)

    def on_stream_closed(self, link, detail):
        self.upstreams.on_stream_closed(link, detail)

    def on_goaway(self, link, detail):
        self.upstreams.on_goaway(link, detail)

    # -- upstream changes ------------------------------------------------------
    def upstream_ready(self, upstream):
        if self.lifecycle.pending:
            self.lifecycle.release_pending()
        if self.waiting_clients:
            self.release_waiting()

    def upstream_lost(self, upstream, unsent, unconfirmed, resend=()):
        """Route again what the lost worker never wrote (and, with redeliver_unconfirmed, what it
        may not have read: `resend`); count what is left unconfirmed."""
        if unconfirmed:
            self.stats.unconfirmed += unconfirmed
            log.warning("upstream %s: %d message(s) written to its stream before it broke are "
                        "unconfirmed (at-most-once)", upstream.address, unconfirmed,
                        extra={"upstream": upstream.address})
        if resend:
            routed = self._route_again(resend, events=False)
            self.stats.redelivered += routed
            log.warning("upstream %s: sent again %d message(s) it may not have read "
                        "(redeliver_unconfirmed: at-least-once)", upstream.address, routed,
                        extra={"upstream": upstream.address})
        if unsent:
            routed = self._route_again(unsent)
            self.stats.rerouted += routed
            log.info("upstream %s: re-routed %d unsent message(s)", upstream.address, routed,
                     extra={"upstream": upstream.address})
        if self.paused_clients:
            self._resume_paused()

    def _route_again(self, batch, events=True):
        """`reroute`, counting the messages of clients already gone as dropped; returns how many went."""
        routed, lost = self.reroute(batch, events)
        if lost:
            self.stats.drop("client_gone", lost)
        return routed

    # -- slow consumers (the client buffer's watermarks) ------------------------
    def client_behind(self, conn):
        """Its unread bytes passed client_buffer_high: it has slow_consumer_timeout to catch up."""
        if conn.behind_timer is None and not conn.closed:
            conn.behind_timer = self.reactor.call_later(self.slow_consumer_timeout, self._still_behind, conn)

    def client_caught_up(self, conn):
        if conn.behind_timer is not None:
            conn.behind_timer.cancel()
            conn.behind_timer = None

    def _still_behind(self, conn):
        conn.behind_timer = None
        if not conn.closed:
            self.close(conn, reasons.SLOW_CONSUMER,
                       f"{conn.buffered()} bytes unread for {self.slow_consumer_timeout:g} s "
                       f"(above client_buffer_high, {conn.write_high})", reset=True)

    def client_overflow(self, conn):
        self.close(conn, reasons.SLOW_CONSUMER,
                   f"{conn.buffered()} bytes unread, above client_buffer_limit ({conn.write_limit})", reset=True)

    # -- ending --------------------------------------------------------------
    def failed(self, conn, doing):
        """The pipeline edge: an unexpected error while serving one client closes that client."""
        FAULTS.report("client pipeline", "%s of client %s (plugins: %s); closing it", doing, conn.uuid,
                      ", ".join(f"{slot}={name}" for slot, name in sorted(self.plugins.slot_owner.items())),
                      logger=log)
        self.stats.drop("internal_error")
        self._close_quietly(conn, reasons.INTERNAL_ERROR, f"internal error {doing}")

    def _close_quietly(self, conn, reason, detail):
        try:
            self.close(conn, reason, detail, reset=True)
        except Exception:
            FAULTS.report("client close", "closing client %s", conn.uuid, logger=log)

    def client_eof(self, conn):
        """The client half-closed: stop reading; replies still come for a moment, then close."""
        self._finish(conn, reasons.CLIENT_CLOSED)

    def _finish(self, conn, reason):
        """Close `conn` without losing what is owed to it: stop reading it, let replies to what it
        sent last arrive (eof_linger), write them while it reads, then close; give up with a reset
        after eof_stall_timeout without progress."""
        if conn.closed or conn.eof:
            return
        conn.pause_reading()
        self.paused_clients.pop(conn, None)
        conn.eof = self.LINGERING
        conn.close_reason = reason
        conn.linger_timer = self.reactor.call_later(self.eof_linger, self._linger_over, conn)

    def _linger_over(self, conn):
        conn.linger_timer = None
        if conn.out:
            conn.flush()
        if conn.closed:
            return
        if conn.wbuf:
            conn.eof = self.FLUSHING
            conn.linger_timer = self.reactor.call_later(self.eof_stall_timeout, self._flush_progress,
                                                        conn, conn.buffered())
        else:
            self.close(conn, conn.close_reason)

    def _flush_progress(self, conn, unread_before, stall_reason=reasons.SLOW_CONSUMER):
        conn.linger_timer = None
        if conn.closed:
            return
        unread = conn.buffered()
        if unread and unread >= unread_before:
            self.close(conn, stall_reason,
                       f"it stopped reading {'after its half-close' if conn.close_reason == reasons.CLIENT_CLOSED else 'while being closed'} "
                       f"with {unread} bytes unread for {self.eof_stall_timeout:g} s", reset=True)
        else:
            conn.linger_timer = self.reactor.call_later(self.eof_stall_timeout, self._flush_progress, conn, unread,
                                                        stall_reason)

    def close_when_flushed(self, conn, reason):
        """Stop reading `conn` and close it cleanly (FIN) once what it was sent is written (a worker's
        CLOSE); if its unread output makes no progress for eof_stall_timeout, reset it (same reason).
        A client already closing keeps its first cause."""
        if conn.closed or conn.eof:
            return
        conn.pause_reading()
        self.paused_clients.pop(conn, None)
        conn.eof = self.FLUSHING
        conn.close_reason = reason
        if conn.out is None and conn.wbuf is None:
            self.close(conn, reason)
        else:  # written at the end of this pass; closed by flushed_after_eof once all of it is out
            conn.linger_timer = self.reactor.call_later(self.eof_stall_timeout, self._flush_progress, conn,
                                                        conn.buffered(), reason)

    def flushed_after_eof(self, conn):
        if conn.eof == self.FLUSHING:
            self.close(conn, conn.close_reason)

    def _idle_check(self, conn):
        conn.idle_timer = None
        if conn.closed:
            return
        last = conn.last_read if conn.last_read is not None else conn.opened
        due = last + self.idle_timeout
        if self.reactor.clock() >= due:
            self.close(conn, reasons.IDLE_TIMEOUT, f"idle for {self.idle_timeout:g} s")
        else:
            conn.idle_timer = self.reactor.call_at(due, self._idle_check, conn)

    def close(self, conn, reason, detail=None, reset=False):
        """Close a client now. `reason`: a code of `pplex.reasons`; `detail`: words for the log.

        Bytes it has not read yet are dropped, so the close is then a reset (RST),
        never a clean FIN: the client can tell it lost data.
        """
        if conn.closed:
            return
        if reason not in reasons.REASONS:  # a plugin's own words (the hook API predates the codes)
            reason, detail = reasons.CLOSED_BY_PLUGIN, reason
        unread = conn.buffered() + (sum(map(len, conn.out)) if conn.out else 0)
        conn.close_reason = reason
        conn.out = None
        conn.close_socket(reset=reset or unread > 0)
        self.conns.pop(conn.uuid, None)
        self.waiting_clients.pop(conn, None)
        self.paused_clients.pop(conn, None)
        for timer in (conn.idle_timer, conn.linger_timer, conn.behind_timer):
            if timer is not None:
                timer.cancel()
        conn.idle_timer = conn.linger_timer = conn.behind_timer = None
        conn.last_upstream = conn.merge_batch = None
        if conn.waiting:
            held = len(conn.waiting) - (conn.session is HELD)  # a held CONNECTED is not a message
            if held:
                self.stats.drop(reason if reason == reasons.SHUTDOWN else "client_gone", held)
        conn.waiting = None
        self.stats.add_closed(conn, reason)
        if conn.session is not None or reason == reasons.AUTH_FAILED:
            try:
                self.lifecycle.disconnected(conn, reason)
            except Exception:
                FAULTS.report("lifecycle event", "the DISCONNECTED of client %s; dropped", conn.uuid, logger=log)
        self.groups.drop(conn)
        if self._verbose or reason == reasons.SLOW_CONSUMER:
            log.log(logging.WARNING if reason == reasons.SLOW_CONSUMER else logging.INFO,
                    "close %s (%s%s) after %.1f s, %d B in, %d B out%s", conn.uuid, reason,
                    f": {detail}" if detail else "", self.reactor.clock() - conn.opened, conn.bytes_in,
                    conn.bytes_out, f", {unread} B unread dropped (reset)" if unread else "",
                    extra={"uuid": conn.uuid, "reason": reason})
        if self.notify_closed is not None:
            self.notify_closed(conn, f"{reason}: {detail}" if detail else reason)
        self.listener.client_left()
        if self.shutting_down and not self.conns:
            self._shutdown_finished()

    # -- shutdown --------------------------------------------------------------
    def begin_shutdown(self, on_done):
        """Stop accepting, then close every client spread over shutdown_spread seconds, each
        without losing what is in flight to it (see `_finish`); once all are gone (at the latest
        shutdown_spread + shutdown_grace seconds from now) and lifecycle workers took their
        DISCONNECTED (`Upstreams.finish_streams`), call `on_done()`. Returns how many clients it
        closes, or None when a shutdown had already begun."""
        if self.shutting_down:
            return None
        self.shutting_down = True
        self._on_shutdown_done = on_done
        self.listener.close()
        self.front_door.close_all()
        conns = list(self.conns.values())
        log.info("shutting down: not accepting; closing %d client(s) over %g s (then at most %g s "
                 "more for what is in flight)", len(conns), self.shutdown_spread, self.shutdown_grace)
        if not conns:
            self.reactor.call_soon(self._shutdown_finished)
            return 0
        random.shuffle(conns)
        count = len(conns)
        step = self.shutdown_spread / count
        for index, conn in enumerate(conns):
            # Evenly spread, each with a jitter inside its own slot.
            self.reactor.call_later(step * (index + random.random()), self._shutdown_client, conn)
        self.reactor.call_later(self.shutdown_spread + self.shutdown_grace, self._shutdown_deadline)
        return count

    def _shutdown_client(self, conn):
        if not conn.closed:
            self._finish(conn, reasons.SHUTDOWN)

    def _shutdown_deadline(self):
        for conn in list(self.conns.values()):
            self.close(conn, reasons.SHUTDOWN, f"shutdown_grace ({self.shutdown_grace:g} s) is over")

    def _shutdown_finished(self):
        done, self._on_shutdown_done = self._on_shutdown_done, None
        if done is not None:
            self.upstreams.finish_streams(done)

    def shutdown(self):
        """Close everything now (the second SIGTERM, or after a graceful shutdown)."""
        self.listener.close()
        self.front_door.close_all()
        self._on_shutdown_done = None
        for conn in list(self.conns.values()):
            if conn.out:
                conn.flush()
            self.close(conn, reasons.SHUTDOWN)
        self.upstreams.close()

    # -- views for the admin API and plugins -----------------------------------
    def connection_info(self, conn, now):
        return {
            "uuid": conn.uuid, "remote": format_peer(conn.peer), "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out, "messages_in": conn.messages_in,
            "messages_out": conn.messages_out, "unread_bytes": conn.buffered(),
            "worker": conn.last_upstream.id if conn.last_upstream is not None else None,
            "age": round(now - conn.opened, 3),
            "active": conn.is_active(now, self.active_window),
            "tls_version": conn.tls_facts["tls_version"] if conn.tls_facts else None,
            "groups": self.groups.groups_of(conn),
        }
