"""The per-message path: client bytes to worker batches, worker messages to clients.

Owns the listening socket, the table of open connections, and the flow of a
message through the resolved plugin chain (framing, auth, routing, balancing)
into the batch of the chosen upstream; and back: replies by UUID, broadcasts
through the broadcast plugin. At the end of each reactor pass it offers each
upstream its batch (one hand-off per upstream per pass) and gives each client
one write. Everything here runs on the reactor thread.
"""
import collections
import logging
import socket

from pplex import node
from pplex.connection import Connection, format_peer
from pplex.errors import FrameError
from pplex.reactor import READ
from pplex.stats import Stats
from pplex.timestamps import rfc3339_now
from pplex.upstreams import Upstreams

log = logging.getLogger("pplex.proxy")

ACCEPT_PER_EVENT = 64          # accepts per readiness event: new clients cannot starve old ones
ACCEPT_RETRY_SECONDS = 0.1     # after EMFILE and friends, try accepting again this much later
MERGE_LIMIT_BYTES = 256 * 1024  # raw bytes merge into one waiting message up to this size
# An upstream batch above this stops reading its clients until the stream takes it.
HIGH_WATER_BYTES = 8 * 1024 * 1024
# After a client's EOF, replies to what it sent last still reach it for this long.
EOF_LINGER_SECONDS = 0.5
EOF_WRITE_GRACE_SECONDS = 5.0
BROADCAST_NAMES = {0: "ALL", 1: "ACTIVE", 2: "NOT_ACTIVE"}


class Proxy:
    """Client connections and message flow; the `LinkEvents` every link reports to."""

    def __init__(self, reactor, config, plugins, transport):
        server = config["server"]
        self.reactor = reactor
        self.config = config
        self.plugins = plugins
        self.stats = Stats()
        self.conns = {}
        self.dirty_clients = []
        self.dirty_upstreams = []
        self.waiting_clients = {}  # an ordered set: clients with messages held for want of a worker
        self.paused_clients = []
        self.idle_timeout = server["idle_timeout"]
        self.active_window = server["active_window"]
        self.max_pending_bytes = server["max_pending_bytes"]
        self.max_connections = server["max_connections"]
        self.listener = None
        self.accepting = False
        self._accept_retry = None
        self._stamp = None
        self._verbose = log.isEnabledFor(logging.INFO)
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
            reactor, transport, self,
            notify_added=plugins.notifier("pplex_upstream_added"),
            notify_ready=plugins.notifier("pplex_upstream_ready"),
            notify_lost=plugins.notifier("pplex_upstream_lost"))
        self.ready = self.upstreams.ready
        reactor.add_pass_end(self._end_of_pass)

    # -- listening -----------------------------------------------------------
    def listen(self, host, port, backlog=1024, reuse_port=False):
        """Bind and listen; return the bound (host, port). `reuse_port`: share the port (--processes)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family == socket.AF_INET and not host.replace(".", "").isdigit():
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"cannot listen on {format_peer((host, port))}: {error.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
        self.listener = sock
        self._start_accepting()
        return sock.getsockname()[:2]

    def _start_accepting(self):
        if not self.accepting and self.listener is not None:
            self.accepting = True
            self.reactor.register(self.listener, READ, _Listener(self))

    def _stop_accepting(self):
        if self.accepting:
            self.accepting = False
            self.reactor.unregister(self.listener)

    def accept_ready(self):
        for _ in range(ACCEPT_PER_EVENT):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of file descriptors: the listener stays readable, so pause
                # instead of spinning, and say so once per pause.
                log.warning("accept failed: %s; pausing accepts for %.1f s", error, ACCEPT_RETRY_SECONDS)
                self._stop_accepting()
                self._accept_retry = self.reactor.call_later(ACCEPT_RETRY_SECONDS, self._resume_after_error)
                return
            self._open(sock, peer)
            if len(self.conns) >= self.max_connections:
                log.warning("max_connections (%d) reached: not accepting until a client leaves",
                            self.max_connections)
                self._stop_accepting()
                return

    def _resume_after_error(self):
        self._accept_retry = None
        if len(self.conns) < self.max_connections:
            self._start_accepting()

    def _open(self, sock, peer):
        if self.accept_hook is not None and self.accept_hook(peer[:2]) is False:
            self.stats.refused += 1
            log.info("refused %s: not allowed by the accept rules", format_peer(peer))
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = self.reactor.clock()
        conn = Connection(self, sock, self.new_uuid(), peer, now)
        self.conns[conn.uuid] = conn
        self.reactor.register(sock, READ, conn)
        self.stats.opened += 1
        if self.authenticate is not None:
            conn.authenticated = False
        if self.idle_timeout:
            conn.idle_timer = self.reactor.call_at(now + self.idle_timeout, self._idle_check, conn)
        if self._verbose:
            log.info("open %s from %s", conn.uuid, format_peer(peer))
        if self.notify_opened is not None:
            self.notify_opened(conn)

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
                if len(payload) + len(data) <= MERGE_LIMIT_BYTES:
                    if payload.__class__ is bytes:
                        payload = batch[index] = bytearray(payload)
                    payload += data
                    up.batch_bytes += len(data)
                    return
        try:
            messages = self.decode(conn, data)
        except FrameError as error:
            self.close(conn, f"bad input: {error}")
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
        if up.batch_bytes > HIGH_WATER_BYTES:
            conn.pause_reading()
            self.paused_clients.append(conn)

    def _new_stamp(self):
        self._stamp = rfc3339_now()
        return self._stamp

    def _authenticate(self, conn, payload):
        verdict = self.authenticate(conn, payload)
        if verdict is True:
            conn.authenticated = True
            if self._verbose:
                log.info("authenticated %s", conn.uuid)
            if self.notify_authenticated is not None:
                self.notify_authenticated(conn)
        elif verdict is False:
            self.stats.drop("auth_rejected")
            self.close(conn, "authentication failed")

    def _hold(self, conn, payload):
        if conn.waiting is None:
            conn.waiting = collections.deque()
            self.waiting_clients[conn] = None
        conn.waiting.append(payload)
        conn.waiting_bytes += len(payload)
        if conn.waiting_bytes > self.max_pending_bytes:
            self.stats.drop("max_pending_bytes", len(conn.waiting))
            self.close(conn, f"more than max_pending_bytes ({self.max_pending_bytes}) waiting "
                             "while no worker was ready")

    def release_waiting(self):
        """Route messages held for want of a worker, each client's in its order."""
        for conn in list(self.waiting_clients):
            self.waiting_clients.pop(conn, None)
            held, conn.waiting, conn.waiting_bytes = conn.waiting, None, 0
            while held and not conn.closed:
                self.submit(conn, held.popleft())
                conn.messages_in -= 1  # counted when it first arrived
                if conn.waiting is not None:  # held again (no candidate): keep the rest behind it
                    conn.waiting.extend(held)
                    conn.waiting_bytes += sum(len(p) for p in held)
                    break

    def _end_of_pass(self):
        self._stamp = None
        if self.dirty_upstreams:
            upstreams, self.dirty_upstreams = self.dirty_upstreams, []
            for up in upstreams:
                up.queued = False
                if up.batch and not up.blocked and up.state in ("ready", "draining"):
                    if up.link.offer(up.batch):
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
                conn.flush()

    def _resume_paused(self):
        still = []
        for conn in self.paused_clients:
            up = conn.last_upstream
            if up is not None and up.batch_bytes > HIGH_WATER_BYTES // 2:
                still.append(conn)
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
        conn.send(self.encode(payload))

    def on_broadcast(self, link, kind, payload):
        targets = self.broadcast(kind, self.conns.values(), self.reactor.clock())
        if targets is None:
            self.on_bad_message(link, f"unknown broadcast value {kind}")
            return
        self.stats.broadcasts += 1
        data = self.encode(payload)
        for conn in targets:
            conn.send(data)
        if self.cluster is not None:
            self.cluster.relay_broadcast(link, kind, payload)

    def on_bad_message(self, link, reason):
        up = self.upstreams.by_link.get(link)
        self.stats.drop("bad_worker_message")
        log.warning("upstream %s sent a message pplex cannot deliver: %s", up.address if up else "?", reason)

    def on_drained(self, link):
        up = self.upstreams.by_link.get(link)
        if up is None:
            return
        up.blocked = False
        if up.batch and not up.queued:
            up.queued = True
            self.dirty_upstreams.append(up)

    def on_ready(self, link, ok, detail):
        self.upstreams.on_ready(link, ok, detail)

    def on_live(self, link, ok, detail):
        self.upstreams.on_live(link, ok, detail)

    def on_stream_closed(self, link, detail):
        self.upstreams.on_stream_closed(link, detail)

    # -- upstream changes ------------------------------------------------------
    def upstream_ready(self, upstream):
        if self.waiting_clients:
            self.release_waiting()

    def upstream_lost(self, upstream, unsent, unconfirmed):
        """Route again what the lost worker never wrote; count what it may not have read."""
        if unconfirmed:
            self.stats.unconfirmed += unconfirmed
            log.warning("upstream %s: %d message(s) written to its stream before it broke are "
                        "unconfirmed (at-most-once)", upstream.address, unconfirmed)
        if not unsent:
            return
        rerouted = lost = 0
        for i in range(0, len(unsent), 3):
            conn = self.conns.get(unsent[i])
            if conn is None:
                lost += 1
                continue
            conn.messages_in -= 1
            self.submit(conn, bytes(unsent[i + 1]))
            rerouted += 1
        self.stats.rerouted += rerouted
        if lost:
            self.stats.drop("client_gone", lost)
        log.info("upstream %s: re-routed %d unsent message(s)%s", upstream.address, rerouted,
                 f", {lost} for clients already gone" if lost else "")

    # -- closing -------------------------------------------------------------
    def failed(self, conn, doing):
        """The pipeline edge: an unexpected error while serving one client closes that client."""
        log.exception("internal error %s of client %s (plugins: %s); closing it", doing, conn.uuid,
                      ", ".join(f"{slot}={name}" for slot, name in sorted(self.plugins.slot_owner.items())))
        self.stats.drop("internal_error")
        self.close(conn, f"internal error {doing}")

    # conn.eof: 0 open; LINGERING replies to its last messages may still come;
    # FLUSHING the linger is over and it closes once its writes are out.
    LINGERING, FLUSHING = 1, 2

    def client_eof(self, conn):
        """The client half-closed: stop reading; replies still come for a moment, then close."""
        conn.pause_reading()
        conn.eof = self.LINGERING
        conn.linger_timer = self.reactor.call_later(EOF_LINGER_SECONDS, self._eof_linger_over, conn)

    def _eof_linger_over(self, conn):
        conn.linger_timer = None
        if conn.out:
            conn.flush()
        if conn.closed:
            return
        if conn.wbuf:
            conn.eof = self.FLUSHING
            conn.linger_timer = self.reactor.call_later(
                EOF_WRITE_GRACE_SECONDS, self.close, conn, "client closed; it read no more replies")
        else:
            self.close(conn, "client closed")

    def flushed_after_eof(self, conn):
        if conn.eof == self.FLUSHING:
            self.close(conn, "client closed")

    def _idle_check(self, conn):
        conn.idle_timer = None
        if conn.closed:
            return
        last = conn.last_read if conn.last_read is not None else conn.opened
        due = last + self.idle_timeout
        if self.reactor.clock() >= due:
            self.close(conn, f"idle for {self.idle_timeout:g} s")
        else:
            conn.idle_timer = self.reactor.call_at(due, self._idle_check, conn)

    def close(self, conn, reason):
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        if conn.events:
            self.reactor.unregister(conn.sock)
        try:
            conn.sock.close()
        except OSError:
            pass
        self.conns.pop(conn.uuid, None)
        self.waiting_clients.pop(conn, None)
        for timer in (conn.idle_timer, conn.linger_timer):
            if timer is not None:
                timer.cancel()
        conn.idle_timer = conn.linger_timer = None
        conn.last_upstream = conn.merge_batch = None
        self.stats.add_closed(conn)
        if self._verbose:
            log.info("close %s (%s) after %.1f s, %d B in, %d B out", conn.uuid, reason,
                     self.reactor.clock() - conn.opened, conn.bytes_in, conn.bytes_out)
        if self.notify_closed is not None:
            self.notify_closed(conn, reason)
        if not self.accepting and self._accept_retry is None and len(self.conns) < self.max_connections:
            self._start_accepting()

    def shutdown(self):
        self._stop_accepting()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in list(self.conns.values()):
            if conn.out:
                conn.flush()
            self.close(conn, "pplex shutting down")
        self.upstreams.close()

    # -- views for the admin API and plugins -----------------------------------
    def connection_info(self, conn, now):
        return {
            "uuid": conn.uuid, "remote": format_peer(conn.peer), "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out, "messages_in": conn.messages_in,
            "messages_out": conn.messages_out,
            "worker": conn.last_upstream.id if conn.last_upstream is not None else None,
            "age": round(now - conn.opened, 3),
            "active": conn.is_active(now, self.active_window),
        }


class _Listener:
    __slots__ = ("proxy",)

    def __init__(self, proxy):
        self.proxy = proxy

    def on_readable(self):
        self.proxy.accept_ready()
