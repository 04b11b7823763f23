"""Many pplex nodes acting as one: what is relayed over the broker, and how a relay is applied.

Runs on the reactor thread; the broker connection itself runs on its own
thread (`pplex.broker`). With `cluster.broker` set, each node subscribes to two
subjects (NATS subjects or Redis channels):

    <name>.all          broadcasts, heartbeats, LEAVE, admin questions for every node
    <name>.node.<tag>   replies for this node's clients, admin questions and answers for it

and relays, in frames of `pplex.relaywire` (one frame per subject per reactor
pass, so a burst costs one publish):

- **broadcasts**: a worker's BROADCAST_* is applied to this node's clients
  first (`Proxy.on_broadcast`), then published once on `<name>.all`; every
  other node applies it to its own clients, ACTIVE / NOT_ACTIVE judged by its
  own clock and `server.active_window`. A node drops its own frames (origin
  tag and instance in the frame header).
- **session actions** (`relaywire.ACTION`): a SEND to a group, and a CLOSE,
  JOIN or LEAVE on a broadcast set or a group, are applied to this node's
  clients first (`Lifecycle.on_action`), then published once on
  `<name>.all`; one on another node's client UUID goes to its owner, like a
  reply. Groups live in each node: every node applies a group action to the
  members it has.
- **replies by UUID** for a client of another node: the first 8 hex digits
  of a client UUID are its node's tag (`pplex.node`), so the reply goes straight
  to `<name>.node.<tag>`, published only when that node is alive in the
  live-node table (else it is an unknown UUID, as on one node).
- **heartbeats** every `cluster.heartbeat` seconds on `<name>.all`: node id,
  connections, upstreams, admin address. A node not heard from for
  `cluster.dead_after` seconds leaves the table; a stopping node says LEAVE.
  A node that (re)connects says hello and every other node answers with a
  heartbeat at once, so tables fill in one round trip, not one interval.
- **admin questions** (`ask`): an operation run on one node (by UUID tag) or
  on every node, answers gathered until all expected nodes answered or the
  deadline (`cluster.admin_timeout`) passed.

**At most once.** Relays are never acknowledged, stored or retried; while the
broker is down, or its queue is full, relays are counted as unrelayed by
reason (`pplex_cluster_unrelayed_total{reason}`), and local traffic is
untouched. Frames from the broker are input from outside: a frame that cannot
be read is dropped and counted, a record of an unknown kind is skipped and
counted (a newer node's), an error while applying one is contained.
"""
import json
import logging
import os
import random
import socket
import struct
import time

from pplex import __version__, limits, relaywire
from pplex.broker import Broker
from pplex.config import loads_json
from pplex.logs import FAULTS, RateLimited
from pplex.node import ID_PATTERN, uuid_tag

log = logging.getLogger("pplex.cluster")


class _RelayLink:
    """The `link` of worker messages that arrived from another node: they are never relayed again."""

    address = "relay"

    def __repr__(self):
        return "<relay>"


RELAY = _RelayLink()


class _Pending:
    """Records waiting for the end of the pass, for one subject."""

    __slots__ = ("records", "size", "count")

    def __init__(self):
        self.records = []
        self.size = 0
        self.count = 0


class _Peer:
    """Another node, as its heartbeats describe it."""

    __slots__ = ("id", "tag", "instance", "info", "last_seen", "joined")

    def __init__(self, node_id, tag, instance, info, now):
        self.id = node_id
        self.tag = tag
        self.instance = instance
        self.info = info
        self.last_seen = now
        self.joined = now


class _Ask:
    __slots__ = ("id", "op", "on_done", "expected", "answers", "timer")

    def __init__(self, request_id, op, on_done, expected):
        self.id = request_id
        self.op = op
        self.on_done = on_done
        self.expected = expected
        self.answers = {}
        self.timer = None


class Cluster:
    """This node's part in the cluster. Every method runs on the reactor thread.

    `settings` is the validated `cluster` config section; `describe()` returns
    this node's heartbeat fields (connections, upstreams, addresses); `ops`
    maps an admin operation name to `fn(args) -> JSON-able answer`, run here
    for questions from other nodes (and for this node's own part of a
    cluster-wide question).
    """

    def __init__(self, reactor, proxy, node, settings, describe=None, ops=None, make_client=None):
        self.reactor = reactor
        self.proxy = proxy
        self.node = node
        self.name = settings["name"]
        self.heartbeat = settings["heartbeat"]
        self.dead_after = settings["dead_after"]
        self.admin_timeout = settings["admin_timeout"]
        self.describe = describe or (lambda: {})
        self.ops = ops or {}
        self.subject_all = f"{self.name}.all"
        self.subject_self = self.subject_for(node.tag)
        self.origin = (bytes.fromhex(node.tag), node.instance)
        self.frame_header = relaywire.header(*self.origin)
        self.broker = Broker(settings["broker"], reactor, (self.subject_all, self.subject_self),
                             self.on_frames, self.on_broker_state, make_client)
        self.up = False
        self.broker_detail = "connecting"
        self.peers = {}        # node id -> _Peer
        self.tags = {}         # tag -> node id, live peers only
        self._pending = {}     # subject -> _Pending
        self._asks = {}        # request id -> _Ask
        self._next_request = random.getrandbits(32)
        self._hello = True     # the next heartbeat asks every node to answer at once
        self._timer = None
        self._started = time.time()
        self._host = socket.gethostname()
        self._limiter = RateLimited()
        self.relayed_out = {}  # kind name -> relays published
        self.relayed_in = {}   # kind name -> relays applied
        self.unrelayed = {}    # reason -> relays not published
        self.dropped = {}      # reason -> frames or records from the broker dropped
        self._handlers = {
            relaywire.BROADCAST: self._apply_broadcast, relaywire.REPLY: self._apply_reply,
            relaywire.HEARTBEAT: self._apply_heartbeat, relaywire.LEAVE: self._apply_leave,
            relaywire.ADMIN_ASK: self._apply_ask, relaywire.ADMIN_ANSWER: self._apply_answer,
            relaywire.ACTION: self._apply_action,
        }
        reactor.add_pass_end(self._end_of_pass)

    def subject_for(self, tag):
        return f"{self.name}.node.{tag}"

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        self.broker.start()
        self._timer = self.reactor.call_later(self.heartbeat, self._tick)

    def close(self):
        """Say LEAVE (when connected), then stop the broker thread."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.up:
            self._end_of_pass()
            self._send(self.subject_all, relaywire.record(relaywire.LEAVE))
        for ask in list(self._asks.values()):
            self._finish_ask(ask)
        self.broker.close()

    def on_broker_state(self, up, detail):
        was_up, self.up = self.up, up
        self.broker_detail = detail
        if up and not was_up:
            self._hello = True
            self._send_heartbeat()

    # -- relaying (called by the proxy) ------------------------------------------
    def relay_broadcast(self, link, kind, payload):
        """A worker's broadcast, already applied here: publish it for every other node."""
        if link is RELAY:
            return
        self._queue(self.subject_all, relaywire.broadcast(kind, payload))

    def relay_reply(self, link, client_uuid, payload):
        """A reply for a client that is not here: True when it belongs to another node (relayed or counted).

        False (the proxy counts an unknown UUID) when the UUID is this node's,
        is not one pplex makes, or names no live node.
        """
        if link is RELAY:
            return False
        tag = uuid_tag(client_uuid)
        if tag is None or tag == self.node.tag:
            return False
        if not self.up:
            self._count(self.unrelayed, "broker_down")
            return True
        if tag not in self.tags:
            return False
        self._queue(self.subject_for(tag), relaywire.reply(client_uuid, payload))
        return True

    def relay_action(self, link, action, which, target, payload, groups):
        """A worker's session action. On a broadcast set or a group (already applied here): published
        for every other node; returns True. On a client UUID that is not here: True when it belongs to
        another node (sent to it, or counted), False (the proxy counts an unknown UUID) as for
        `relay_reply`."""
        if link is RELAY:
            return False
        if which == "client_uuid":
            tag = uuid_tag(target)
            if tag is None or tag == self.node.tag:
                return False
            if not self.up:
                self._count(self.unrelayed, "broker_down")
                return True
            if tag not in self.tags:
                return False
            subject = self.subject_for(tag)
        else:
            subject = self.subject_all
        try:
            record = relaywire.action(action, which, target, payload, groups)
        except (ValueError, KeyError, IndexError, struct.error):  # a name or count too long for the format
            self._count(self.unrelayed, "too_large")
            return True
        self._queue(subject, record)
        return True

    def _queue(self, subject, record):
        if not self.up:
            self._count(self.unrelayed, "broker_down")
            return
        pending = self._pending.get(subject)
        if pending is None:
            pending = self._pending[subject] = _Pending()
        elif pending.size + len(record) > limits.RELAY_FRAME_BYTES:
            self._flush(subject, pending)
        pending.records.append(record)
        pending.size += len(record)
        pending.count += 1

    def _end_of_pass(self):
        if self._pending:
            pending, self._pending = self._pending, {}
            for subject, waiting in pending.items():
                self._flush(subject, waiting)

    def _flush(self, subject, pending):
        if not pending.records:
            return
        frame = b"".join((self.frame_header, *pending.records))
        count = pending.count
        pending.records = []
        pending.size = pending.count = 0
        refused = self.broker.publish(subject, frame, count)
        if refused is None:
            self._count(self.relayed_out, "relays", count)
        else:
            self._count(self.unrelayed, refused, count)
            self._limiter.warning(log, f"unrelayed {refused}", "%d relay(s) not published: %s",
                                  count, refused)

    def _send(self, subject, record):
        """A control frame (heartbeat, admin), published at once; None or why it was refused."""
        return self.broker.publish(subject, self.frame_header + record, 0)

    # -- frames from the broker ------------------------------------------------
    def on_frames(self, frames):
        handlers = self._handlers
        for frame in frames:
            try:
                tag, instance = relaywire.read_header(frame)
            except relaywire.BadFrame as error:
                self._bad(f"unreadable frame: {error}")
                continue
            if tag == self.origin[0] and instance == self.origin[1]:
                self._count(self.dropped, "own")
                continue
            origin_tag = tag.hex()
            try:
                for kind, body in relaywire.records(frame):
                    handler = handlers.get(kind)
                    if handler is None:
                        self._count(self.dropped, "unknown_kind")
                        continue
                    try:
                        handler(origin_tag, instance, body)
                    except relaywire.BadFrame as error:
                        self._bad(f"bad {relaywire.KIND_NAMES[kind]} record from node tag {origin_tag}: {error}")
                    except Exception:
                        FAULTS.report("cluster relay", "applying a %s record from node tag %s",
                                      relaywire.KIND_NAMES[kind], origin_tag, logger=log)
            except relaywire.BadFrame as error:
                self._bad(f"torn frame from node tag {origin_tag}: {error}")

    def _bad(self, reason):
        self._count(self.dropped, "bad_frame")
        self._limiter.warning(log, "bad frame", "dropped a frame from the broker: %s", reason)

    def _apply_broadcast(self, origin_tag, instance, body):
        selector, payload = relaywire.split_broadcast(body)
        self._count(self.relayed_in, "broadcast")
        self.proxy.on_broadcast(RELAY, selector, payload)

    def _apply_action(self, origin_tag, instance, body):
        action, which, target, payload, groups = relaywire.split_action(body)
        self._count(self.relayed_in, "action")
        self.proxy.on_action(RELAY, action, which, target, payload, groups)

    def _apply_reply(self, origin_tag, instance, body):
        client_uuid, payload = relaywire.split_reply(body)
        self._count(self.relayed_in, "reply")
        self.proxy.on_reply(RELAY, client_uuid, payload)

    # -- heartbeats and the live-node table ---------------------------------------
    def _tick(self):
        self._timer = self.reactor.call_later(self.heartbeat, self._tick)
        if self.up:
            self._send_heartbeat()
        self._expire()

    def _heartbeat_fields(self):
        fields = {
            "node": self.node.id, "tag": self.node.tag, "host": self._host, "pid": os.getpid(),
            "started": round(self._started, 3), "version": __version__,
            "heartbeat": self.heartbeat, "dead_after": self.dead_after,
        }
        try:
            fields.update(self.describe())
        except Exception:  # a heartbeat without details beats no heartbeat
            FAULTS.report("cluster heartbeat", "describing this node", logger=log)
        return fields

    def _send_heartbeat(self, subject=None):
        fields = self._heartbeat_fields()
        if subject is None and self._hello:
            fields["hello"] = True
        body = json.dumps(fields, separators=(",", ":")).encode()
        if self._send(subject or self.subject_all, relaywire.record(relaywire.HEARTBEAT, body)) is None \
                and subject is None:
            self._hello = False

    def _apply_heartbeat(self, origin_tag, instance, body):
        if len(body) > limits.HEARTBEAT_MAX_BYTES:  # kept per peer: a bounded size each
            raise relaywire.BadFrame(f"heartbeat of {len(body)} bytes (at most {limits.HEARTBEAT_MAX_BYTES})")
        try:
            info = loads_json(bytes(body))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deeply
            raise relaywire.BadFrame(f"heartbeat is not JSON: {error}") from None
        node_id = info.get("node") if isinstance(info, dict) else None
        if not isinstance(node_id, str) or not ID_PATTERN.match(node_id) or info.get("tag") != origin_tag:
            raise relaywire.BadFrame("heartbeat without a valid node id and tag")
        now = self.reactor.clock()
        if node_id == self.node.id:
            self._limiter.warning(log, f"same id {node_id}", "another node uses this node's id %s: "
                                  "give each node its own cluster.node", node_id)
            return
        if origin_tag == self.node.tag:
            self._limiter.warning(log, f"same tag {node_id}", "node %s has this node's tag %s: replies "
                                  "to its clients cannot be told from this node's", node_id, origin_tag)
        peer = self.peers.get(node_id)
        if peer is None:
            if len(self.peers) >= limits.MAX_NODES:
                self._limiter.warning(log, "max nodes", "more than %d nodes: ignoring node %s",
                                      limits.MAX_NODES, node_id)
                return
            peer = self.peers[node_id] = _Peer(node_id, origin_tag, instance, info, now)
            log.info("node %s (tag %s) joined", node_id, origin_tag)
        elif peer.instance != instance:
            log.info("node %s (tag %s) restarted", node_id, origin_tag)
            peer.instance = instance
        if peer.tag != origin_tag:
            self.tags.pop(peer.tag, None)
            peer.tag = origin_tag
        peer.info = info
        peer.last_seen = now
        self.tags[origin_tag] = node_id
        if info.get("hello") is True and self.up:
            self._send_heartbeat(self.subject_for(origin_tag))

    def _apply_leave(self, origin_tag, instance, body):
        node_id = self.tags.get(origin_tag)
        peer = self.peers.get(node_id) if node_id is not None else None
        if peer is not None and peer.instance == instance:
            self._drop(peer, "it is stopping")

    def _expire(self):
        now = self.reactor.clock()
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.dead_after:
                self._drop(peer, f"no heartbeat for {now - peer.last_seen:.1f} s")

    def _drop(self, peer, why):
        self.peers.pop(peer.id, None)
        if self.tags.get(peer.tag) == peer.id:
            del self.tags[peer.tag]
        log.warning("node %s (tag %s) left the cluster: %s", peer.id, peer.tag, why)
        for ask in list(self._asks.values()):
            if peer.id in ask.expected:
                ask.expected.discard(peer.id)
                if not ask.expected:
                    self._finish_ask(ask)

    def live_nodes(self):
        """This node and every live peer: a list of dicts for `GET /cluster`, sorted by node id."""
        now = self.reactor.clock()
        me = self._heartbeat_fields()
        me.update({"self": True, "last_seen_seconds": 0.0})
        nodes = [me]
        for peer in self.peers.values():
            entry = {k: v for k, v in peer.info.items() if k != "hello"}
            entry.update({"node": peer.id, "tag": peer.tag, "self": False,
                          "last_seen_seconds": round(now - peer.last_seen, 3)})
            nodes.append(entry)
        nodes.sort(key=lambda n: n["node"])
        return nodes

    # -- admin questions ---------------------------------------------------------
    def ask(self, op, args, on_done, tag=None):
        """Run `op(args)` on the node of `tag`, or on every node when tag is None.

        `on_done(answers, missing, error)` is called once on the reactor thread:
        `answers` maps node id -> answer (this node's own included when tag is
        None), `missing` lists the nodes that did not answer in time, `error`
        says why nothing could be asked (broker down, no such node), else None.
        """
        if tag is None:
            expected = set(self.peers)
            answers = {self.node.id: self.run_op(op, args)}
        else:
            node_id = self.tags.get(tag)
            if node_id is None:
                on_done({}, [], f"no live node has tag {tag}")
                return
            expected, answers = {node_id}, {}
        if not expected:
            on_done(answers, [], None)
            return
        if not self.up:
            on_done(answers, sorted(expected), f"the broker is down ({self.broker_detail})")
            return
        if len(self._asks) >= limits.MAX_PENDING_ASKS:
            on_done(answers, sorted(expected), "too many admin requests waiting for other nodes")
            return
        self._next_request = (self._next_request + 1) & 0xFFFFFFFF
        request = _Ask(self._next_request, op, on_done, expected)
        request.answers = answers
        body = json.dumps({"op": op, "args": args}, separators=(",", ":")).encode()
        refused = self._send(self.subject_all if tag is None else self.subject_for(tag),
                             relaywire.with_request_id(relaywire.ADMIN_ASK, request.id, body))
        if refused is not None:
            on_done(answers, sorted(expected), f"cannot publish the request: {refused}")
            return
        self._asks[request.id] = request
        request.timer = self.reactor.call_later(self.admin_timeout, self._finish_ask, request)

    def _finish_ask(self, request):
        if self._asks.pop(request.id, None) is None:
            return
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        request.on_done(request.answers, sorted(request.expected), None)

    def run_op(self, op, args):
        fn = self.ops.get(op)
        if fn is None:
            return {"error": f"unknown operation {op!r}"}
        try:
            return fn(args if isinstance(args, dict) else {})
        except Exception:
            FAULTS.report("cluster admin", "running %s for the cluster", op, logger=log)
            return {"error": f"{op} failed on node {self.node.id}; see its log"}

    def _apply_ask(self, origin_tag, instance, body):
        request_id, raw = relaywire.split_request(body)
        try:
            question = loads_json(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deeply
            raise relaywire.BadFrame(f"admin question is not JSON: {error}") from None
        if not isinstance(question, dict) or not isinstance(question.get("op"), str):
            raise relaywire.BadFrame("admin question without an op")
        answer = {"node": self.node.id, "result": self.run_op(question["op"], question.get("args") or {})}
        data = json.dumps(answer, separators=(",", ":")).encode()
        self._send(self.subject_for(origin_tag), relaywire.with_request_id(relaywire.ADMIN_ANSWER, request_id, data))

    def _apply_answer(self, origin_tag, instance, body):
        request_id, raw = relaywire.split_request(body)
        request = self._asks.get(request_id)
        if request is None:
            return  # late: the deadline passed
        try:
            answer = loads_json(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deeply
            raise relaywire.BadFrame(f"admin answer is not JSON: {error}") from None
        node_id = answer.get("node") if isinstance(answer, dict) else None
        if node_id not in request.expected:
            return
        request.expected.discard(node_id)
        request.answers[node_id] = answer.get("result")
        if not request.expected:
            self._finish_ask(request)

    # -- views -------------------------------------------------------------------
    @staticmethod
    def _count(table, key, n=1):
        table[key] = table.get(key, 0) + n

    def snapshot(self):
        """Counters and state for /stats and /metrics."""
        broker = self.broker
        unrelayed = dict(self.unrelayed)
        if broker.lost_relays:
            unrelayed["lost_in_flight"] = unrelayed.get("lost_in_flight", 0) + broker.lost_relays
        dropped = dict(self.dropped)
        if broker.inbound_dropped:
            dropped["inbound_overflow"] = broker.inbound_dropped
        slow = getattr(broker.client, "slow_consumer_drops", 0)
        if slow:  # the NATS server dropped messages for this node (it read too slowly)
            dropped["slow_consumer"] = slow
        return {
            "broker": broker.shown_url, "broker_up": self.up, "broker_detail": self.broker_detail,
            "nodes": 1 + len(self.peers), "relayed_out": self.relayed_out.get("relays", 0),
            "relayed_in": dict(self.relayed_in), "unrelayed": unrelayed, "dropped": dropped,
            "frames_published": broker.published_frames, "broker_connects": broker.connects,
        }
