"""The session extension in the proxy core: lifecycle events to workers, workers' actions on clients.

README "Sessions" is the contract and `pplex.sessions` holds its names and
the group registry; this module applies them, on the reactor thread, as a
part of `pplex.proxy.Proxy`:

- **CONNECTED** once a client passed the accept and auth plugins, queued in
  the batch of the worker the routing chain picks among the ready workers
  that announced "lifecycle" (or of every one of them with
  `server.lifecycle: "all"`), like a message, so it precedes the client's
  messages on that stream. The pick becomes the client's `last_upstream`, so
  `route_sticky` (and `hash`, over the same workers) keeps its messages there.
  While no lifecycle worker is ready it waits at the head of the client's
  held messages (bounded like them, `server.max_pending_bytes`), and the
  messages wait behind it.
- **DISCONNECTED** once the client is gone (`Proxy.close`), with its reason
  code, to the worker that got the CONNECTED, or routed again when that one
  left rotation; at most once. While no lifecycle worker is ready it waits in
  a bounded queue (`limits.MAX_PENDING_EVENTS`). A client whose CONNECTED
  never left gets none, except `auth_failed`: a client refused by an auth
  plugin gets that DISCONNECTED alone (it never had a CONNECTED).
- **Actions** from any worker: CLOSE, JOIN, LEAVE on a client, a broadcast
  set or a group, and SEND to a group (encoded once for all its members).
  Group limits refuse an action (counted, logged), never fail it. With a
  cluster, an action on a set or group is applied here then relayed once; one
  on another node's client goes to its owner (`pplex.cluster`).

Events are sent only while some registered worker announced "lifecycle" (or
no worker is ready at all, when nothing is known yet); with only
base-contract workers a client costs nothing here.
"""
import collections
import logging

from pplex import limits, node, reasons, sessions
from pplex.logs import FAULTS, RateLimited
from pplex.transport import Event

log = logging.getLogger("pplex.lifecycle")
_limited = RateLimited()

CONNECTED, DISCONNECTED = Event.CONNECTED, Event.DISCONNECTED
SEND, CLOSE, JOIN, LEAVE = 0, 1, 2, 3   # OutputStreamRequest.Action
ACTION_NAMES = {SEND: "send", CLOSE: "close", JOIN: "join", LEAVE: "leave"}

# conn.session beyond None (no events for it) and the Upstream its CONNECTED went to:
ALL = "all"     # its CONNECTED went to every ready lifecycle worker (server.lifecycle "all")
HELD = "held"   # its CONNECTED waits for a lifecycle worker, at the head of conn.waiting


class Lifecycle:
    """Lifecycle events and worker actions for one proxy (see the module docstring)."""

    def __init__(self, proxy, server):
        self.proxy = proxy
        self.upstreams = proxy.upstreams
        self.targets = proxy.upstreams.lifecycle_ready   # changed in place by the registry
        self.to_all = server["lifecycle"] == "all"
        self.groups = sessions.Groups(server["max_groups_per_client"], server["max_group_name_bytes"],
                                      server["max_groups"])
        self.pending = collections.deque()   # DISCONNECTED waiting for a lifecycle worker
        self.stats = proxy.stats

    def wanted(self):
        """Does a client get events? Some worker asked for them, or none is ready yet (so none said no)."""
        return self.upstreams.lifecycle_known or not self.proxy.ready

    # -- events --------------------------------------------------------------------
    def connected(self, conn):
        """`conn` passed the accept and auth plugins: its CONNECTED goes out, or waits before its messages."""
        if not self.wanted():
            return
        event = Event(CONNECTED, self._metadata(conn), conn)
        if conn.waiting is None and self._route(event):
            return
        self._hold(conn, event)

    def _hold(self, conn, event):
        conn.session = HELD
        if conn.waiting is None:
            self.proxy._hold(conn, event)
        else:
            conn.waiting.appendleft(event)  # before the messages that came after it

    def _metadata(self, conn):
        try:
            local = conn.sock.getsockname()
        except (OSError, AttributeError):
            local = None
        if not isinstance(local, tuple):  # not an IP socket (tests give socketpairs), or gone already
            local = ("", 0)
        return sessions.connected_metadata(conn.peer, local, node.current.id, conn.proxy_facts, conn.tls_facts)

    def disconnected(self, conn, reason):
        """`conn` is gone (called once, by `Proxy.close`): its DISCONNECTED, if it had a CONNECTED."""
        session = conn.session
        if session is None:
            if reason != reasons.AUTH_FAILED or not self.wanted():
                return
        elif session is HELD:
            return  # its CONNECTED never left: the worker never knew it
        self._send_disconnected(Event(DISCONNECTED, {"reason": reason}, conn))

    def _send_disconnected(self, event):
        session = event.conn.session
        if session is HELD:
            return
        if session.__class__ is not str and session in self.targets:  # its CONNECTED's worker, still there
            self._batch(session, event)
        elif not self._route(event):
            self._pend(event)

    def _route(self, event):
        """Queue `event` for the worker(s) it goes to; False when no lifecycle worker is ready."""
        targets = self.targets
        if not targets:
            return False
        conn = event.conn
        if self.to_all:
            for upstream in targets:
                self._batch(upstream, event)
            chosen = ALL
        else:
            proxy = self.proxy
            # Events carry no payload to route on: a chain that offers no candidate leaves the choice to
            # the balancer among every lifecycle worker, rather than holding the client.
            candidates = proxy.route(conn, b"", targets) or targets
            chosen = proxy.balance(conn, b"", candidates)
            if chosen not in targets:  # a plugin that answered outside the lifecycle workers
                chosen = targets[0]
            self._batch(chosen, event)
        if event.kind == CONNECTED:
            conn.session = chosen
            if chosen is not ALL:
                conn.last_upstream = chosen  # where route_sticky keeps its messages
        return True

    def _batch(self, upstream, event):
        proxy = self.proxy
        batch = upstream.batch
        batch.append(event.conn.uuid)
        batch.append(event)
        batch.append(proxy._stamp or proxy._new_stamp())
        if not upstream.queued:
            upstream.queued = True
            proxy.dirty_upstreams.append(upstream)
        self.stats.events[event.kind] += 1

    def _pend(self, event):
        self.pending.append(event)
        if len(self.pending) > limits.MAX_PENDING_EVENTS:
            self.pending.popleft()
            self.stats.drop("lifecycle_event_overflow")
            _limited.warning(log, "pending events", "more than %d DISCONNECTED wait for a lifecycle worker: "
                             "the oldest are dropped", limits.MAX_PENDING_EVENTS)

    def release_pending(self):
        """A worker entered rotation: the DISCONNECTED that waited go out, in order, to a lifecycle
        one; when no registered worker wants events any more, they are let go."""
        if not self.targets and not self.wanted():
            self.pending.clear()
            return
        pending, self.pending = self.pending, collections.deque()
        while pending:
            event = pending.popleft()
            try:
                if not self._route(event):
                    pending.appendleft(event)
                    pending.extend(self.pending)
                    self.pending = pending
                    return
            except Exception:
                FAULTS.report("lifecycle event", "routing a waiting DISCONNECTED of client %s; dropped",
                              event.conn.uuid, logger=log)

    def release_held(self, event):
        """A CONNECTED held at the head of its client's messages, offered again: True when it is gone
        (sent, or no worker wants events any more), False when it must keep waiting."""
        if self._route(event):
            return True
        if self.wanted():
            return False
        event.conn.session = None  # only base-contract workers are left: no events for this client
        return True

    def reroute(self, event):
        """An event a worker that left rotation was given and never wrote: to another lifecycle worker.

        With `lifecycle: "all"` every other worker had its own copy: nothing to do.
        """
        if self.to_all:
            return
        if event.kind == DISCONNECTED:
            self._send_disconnected(event)
            return
        if self._route(event):
            return
        conn = event.conn
        if conn.closed:
            conn.session = HELD  # gone before its CONNECTED was written: neither event goes
        else:
            self._hold(conn, event)

    # -- actions from workers ----------------------------------------------------------
    def on_action(self, link, action, which, target, payload, groups):
        """A CLOSE, JOIN or LEAVE (any target), or a SEND to a group (see `LinkEvents.on_action`)."""
        proxy = self.proxy
        name = ACTION_NAMES.get(action)
        if name is None:
            proxy.on_bad_message(link, f"unknown action {action}")
            return
        if which == "client_uuid":
            conn = proxy.conns.get(target)
            if conn is None:
                cluster = proxy.cluster
                if cluster is not None and cluster.relay_action(link, action, which, target, payload, groups):
                    return  # another node's client: sent to its owner
                self.stats.drop("unknown_uuid")
                self.stats.note_unknown(target, log)
                return
            clients = (conn,)
        elif which == "group":
            clients = self.groups.members(target)
        else:
            clients = proxy.broadcast(target, proxy.conns.values(), proxy.reactor.clock())
            if clients is None:
                proxy.on_bad_message(link, f"unknown broadcast value {target}")
                return
            clients = tuple(clients)  # a CLOSE changes the table the plugin may be iterating
        self.stats.actions[name] = self.stats.actions.get(name, 0) + 1
        try:
            self._apply(link, action, name, clients, payload, groups)
        except Exception:
            self.stats.drop("action_failed")
            FAULTS.report("worker action", "applying a %s to %d client(s); the rest of it is dropped", name,
                          len(clients), logger=log)
        if which != "client_uuid" and proxy.cluster is not None:
            proxy.cluster.relay_action(link, action, which, target, payload, groups)

    def _apply(self, link, action, name, clients, payload, groups):
        proxy = self.proxy
        if action == SEND or action == CLOSE:
            data = None
            if payload or action == SEND:
                try:
                    data = proxy.encode(payload)  # once for every client it goes to
                except Exception:
                    self.stats.drop("reply_not_encodable")
                    FAULTS.report("plugin framing encode", "encoding a %d-byte %s payload; dropped",
                                  len(payload), name, logger=log)
                    if action == SEND:
                        return
            for conn in clients:
                if data is not None:
                    conn.send(data)
                if action == CLOSE:
                    proxy.close_when_flushed(conn, reasons.CLOSED_BY_WORKER)
            return
        if not groups:
            self._refused(link, name, None, f"a {name.upper()} names no group")
            return
        apply = self.groups.join if action == JOIN else self.groups.leave
        for conn in clients:
            if not conn.closed:
                refused = apply(conn, groups)
                if refused is not None:
                    self._refused(link, name, conn, refused)

    def _refused(self, link, name, conn, why):
        self.stats.drop("action_refused")
        upstream = self.upstreams.by_link.get(link)
        _limited.warning(log, ("refused", name, why), "%s from upstream %s refused%s: %s", name.upper(),
                         upstream.address if upstream is not None else getattr(link, "address", "?"),
                         f" for client {conn.uuid}" if conn is not None else "", why)

    # -- views -------------------------------------------------------------------------
    def groups_of(self, conn):
        return self.groups.groups_of(conn)
