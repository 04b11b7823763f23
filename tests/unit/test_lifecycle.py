"""The session extension in the core (pplex/lifecycle.py with pplex/proxy.py): lifecycle events in
batches, their waiting and re-routing, worker actions and groups. A real reactor, real plugins and
socketpairs for clients; the links are fakes that record what they are offered."""
import socket
import time

import pytest

from pplex import reasons
from pplex.config import validate
from pplex.lifecycle import ALL, HELD
from pplex.manager import Context, PluginSet
from pplex.proxy import Proxy
from pplex.reactor import Reactor
from pplex.transport import Event, Link, Transport

SEND, CLOSE, JOIN, LEAVE = 0, 1, 2, 3


class FakeLink(Link):
    """Answers ready with `features`; takes every batch; keeps what it took until `stop_stream`."""

    def __init__(self, reactor, events, features):
        self.reactor = reactor
        self.events = events
        self.features = features
        self.ready = True
        self.taken = []       # batches offered and taken, in order
        self.unsent = []      # what stop_stream hands back (a worker that never wrote them)
        self.half_closed = False

    def probe_ready(self, timeout):
        self.reactor.call_soon(self.events.on_ready, self, self.ready, "ready", self.features)

    def open_stream(self):
        pass

    def offer(self, batch):
        self.taken.append(batch)
        return True

    def start_live(self, interval):
        pass

    def stop_live(self):
        pass

    def progress(self):
        return 0

    def backlog(self):
        return 0

    def unanswered(self):
        return 0

    def close_send(self):
        self.half_closed = True

    def pause_replies(self):
        pass

    def resume_replies(self):
        pass

    def stop_stream(self):
        unsent, self.unsent = self.unsent, []
        return unsent, 0, []

    def close(self):
        pass

    def inputs(self):
        """Every input taken so far: (uuid, kind name or payload)."""
        flat = [item for batch in self.taken for item in batch]
        return [(flat[i], describe(flat[i + 1])) for i in range(0, len(flat), 3)]


def describe(payload):
    if payload.__class__ is Event:
        return ("CONNECTED", "DISCONNECTED")[payload.kind - 1] + (
            f" {payload.metadata['reason']}" if payload.kind == Event.DISCONNECTED else "")
    return bytes(payload)


class FakeTransport(Transport):
    def __init__(self, reactor):
        self.reactor = reactor
        self.features = {}   # port -> features its worker announces
        self.links = {}      # port -> FakeLink

    def connect(self, upstream, events):
        link = FakeLink(self.reactor, events, self.features.get(upstream.port, ()))
        self.links[upstream.port] = link
        return link


class Core:
    """A proxy on fakes: `add(port, lifecycle)` registers a worker, `client()` opens one, `run()` a pass."""

    def __init__(self, plugins=None, **server):
        """`plugins`: name -> settings."""
        self.reactor = Reactor()
        config = validate({"server": {"eof_linger": 0, **server}, "plugins": plugins or {}})
        self.plugins = PluginSet(enabled=list(config["plugins"]), settings=config["plugins"])
        context = Context(self.reactor, config, proxy=None)
        self.plugins.configure(context)
        self.transport = FakeTransport(self.reactor)
        self.proxy = context.proxy = Proxy(self.reactor, config, self.plugins, self.transport)
        self.peers = []

    def add(self, port, lifecycle=True):
        self.transport.features[port] = ("lifecycle", "a-word-from-the-future") if lifecycle else ()
        # No ejection time: a worker that left may come back at the next probe.
        upstream = self.proxy.upstreams.add({"host": "127.0.0.1", "port": port, "ejection_time": 0})
        self.run()
        return upstream

    def link(self, port):
        return self.transport.links[port]

    def client(self):
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        self.proxy._open(ours, ("192.0.2.7", 40000 + len(self.peers)))
        conn = list(self.proxy.conns.values())[-1]
        return conn, theirs

    def run(self, passes=1):
        for _ in range(passes):
            self.reactor.add_pass_end(self.reactor.stop)
            self.reactor.run()
            self.reactor._pass_end.remove(self.reactor.stop)

    def close(self):
        for peer in self.peers:
            peer.close()
        self.reactor.close()


@pytest.fixture
def core():
    made = []

    def make(plugins=None, **server):
        made.append(Core(plugins, **server))
        return made[-1]
    yield make
    for one in made:
        one.close()


def test_connected_precedes_the_first_message_in_the_batch_of_one_lifecycle_worker(core):
    c = core()
    c.add(1, lifecycle=True)
    c.add(2, lifecycle=False)
    conn, peer = c.client()
    peer.send(b"hello")
    c.run(2)
    lifecycle, base = c.link(1), c.link(2)
    assert base.inputs() == [] or all(kind.__class__ is bytes for _, kind in base.inputs())
    assert lifecycle.inputs()[0] == (conn.uuid, "CONNECTED")
    # The CONNECTED's worker is its last_upstream: with rr the message may go to either, but after it.
    assert conn.session is c.proxy.upstreams.get("u1")
    event = lifecycle.taken[0][1]
    assert event.metadata["remote_addr"] == "192.0.2.7" and event.metadata["remote_port"] == "40001"
    assert set(event.metadata) >= {"local_addr", "local_port", "node"}


def test_route_sticky_keeps_messages_on_the_connected_worker(core):
    c = core(plugins={"route_sticky": {}})
    c.add(1)
    c.add(2)
    conns = [c.client() for _ in range(4)]
    for conn, peer in conns:
        peer.send(b"m")
    c.run(2)
    for conn, _ in conns:
        link = c.link(conn.session.port)
        assert [kind for uuid, kind in link.inputs() if uuid == conn.uuid] == ["CONNECTED", b"m"]
    assert {conn.session.port for conn, _ in conns} == {1, 2}  # rr spread them


def test_base_contract_workers_only_cost_a_client_nothing(core):
    c = core()
    c.add(1, lifecycle=False)
    conn, peer = c.client()
    peer.send(b"x")
    c.run(2)
    c.proxy.close(conn, reasons.CLIENT_CLOSED)
    c.run()
    assert c.link(1).inputs() == [(conn.uuid, b"x")]
    assert conn.session is None and c.proxy.stats.events == [0, 0, 0]


def test_disconnected_goes_once_to_the_connected_worker_with_the_reason(core):
    c = core()
    c.add(1)
    c.add(2)
    conn, _ = c.client()
    c.run()
    worker = conn.session.port
    c.proxy.close(conn, reasons.CLOSED_BY_ADMIN)
    c.proxy.close(conn, reasons.CLIENT_RESET)  # already closed: nothing more
    c.run()
    assert c.link(worker).inputs() == [(conn.uuid, "CONNECTED"), (conn.uuid, "DISCONNECTED closed_by_admin")]
    assert c.link(3 - worker).inputs() == []


def test_connected_waits_before_messages_while_no_lifecycle_worker_is_ready(core):
    c = core()
    lifecycle = c.add(1)
    c.add(2, lifecycle=False)
    c.proxy.upstreams.on_stream_closed(c.link(1), "gone")  # out of rotation; still known to want events
    assert c.proxy.upstreams.lifecycle_known and not c.proxy.upstreams.lifecycle_ready
    conn, peer = c.client()
    peer.send(b"first")
    c.run(2)
    assert conn.session is HELD and list(conn.waiting) [1:] == [b"first"]
    assert c.link(2).inputs() == []  # its message waits behind its CONNECTED
    c.proxy.upstreams._probe(lifecycle)
    c.run(2)
    assert c.link(1).inputs()[0] == (conn.uuid, "CONNECTED")
    assert conn.session is lifecycle and conn.waiting is None
    everything = c.link(1).inputs() + c.link(2).inputs()
    assert (conn.uuid, b"first") in everything


def test_a_held_connected_is_dropped_when_only_base_workers_are_left(core):
    c = core()
    conn, peer = c.client()          # no worker at all yet: it might want events
    peer.send(b"early")
    c.run(2)
    assert conn.session is HELD
    c.add(2, lifecycle=False)
    c.run()
    assert conn.session is None and c.link(2).inputs() == [(conn.uuid, b"early")]
    c.proxy.close(conn, reasons.CLIENT_CLOSED)
    c.run()
    assert c.link(2).inputs() == [(conn.uuid, b"early")]


def test_a_client_closed_while_its_connected_waits_gets_no_event_and_no_message_drop_for_it(core):
    c = core()
    c.add(1)
    c.proxy.upstreams.on_stream_closed(c.link(1), "gone")
    conn, _ = c.client()
    c.run()
    c.proxy.close(conn, reasons.CLIENT_RESET)
    assert c.proxy.stats.drops == {} and c.proxy.stats.events == [0, 0, 0]
    assert not c.proxy.lifecycle.pending


def test_auth_failed_is_sent_alone(core):
    c = core(plugins={"auth_token": {"tokens": ["s3cret"]}})
    c.add(1)
    good, good_peer = c.client()
    bad, bad_peer = c.client()
    c.run()
    assert good.session is None and bad.session is None  # nothing before authentication
    bad_peer.send(b"nope")
    good_peer.send(b"s3cret")
    c.run(2)
    good_peer.send(b"after the token")
    c.run(2)
    assert c.link(1).inputs() == [(bad.uuid, "DISCONNECTED auth_failed"), (good.uuid, "CONNECTED"),
                                  (good.uuid, b"after the token")]


def test_disconnected_waits_while_no_lifecycle_worker_is_ready_and_follows_the_new_one(core):
    c = core()
    first = c.add(1)
    conn, _ = c.client()
    c.run()
    c.proxy.upstreams.remove(first.id)
    c.proxy.close(conn, reasons.NO_UPSTREAM)
    assert len(c.proxy.lifecycle.pending) == 1
    c.add(2)
    c.run()
    assert c.link(2).inputs() == [(conn.uuid, "DISCONNECTED no_upstream")]
    assert not c.proxy.lifecycle.pending


def test_events_a_lost_worker_never_wrote_are_routed_again_in_order(core):
    c = core()
    c.add(1)
    c.add(2)
    conn, peer = c.client()
    worker = conn.session
    link = c.link(worker.port)
    c.proxy.close(conn, reasons.CLIENT_CLOSED)  # CONNECTED and DISCONNECTED in one batch, not yet offered
    link.unsent = list(worker.batch)
    worker.batch.clear()
    c.proxy.upstreams.on_stream_closed(link, "broken")
    c.run()
    survivor = c.link(3 - worker.port)
    assert survivor.inputs() == [(conn.uuid, "CONNECTED"), (conn.uuid, "DISCONNECTED client_closed")]


def test_lifecycle_all_sends_each_event_to_every_ready_lifecycle_worker(core):
    c = core(lifecycle="all")
    c.add(1)
    c.add(2)
    c.add(3, lifecycle=False)
    conn, _ = c.client()
    c.run()
    assert conn.session is ALL
    c.proxy.close(conn, reasons.CLOSED_BY_WORKER)
    c.run()
    for port in (1, 2):
        assert c.link(port).inputs() == [(conn.uuid, "CONNECTED"), (conn.uuid, "DISCONNECTED closed_by_worker")]
    assert c.link(3).inputs() == []
    assert c.proxy.stats.events == [0, 2, 2]


def test_close_writes_the_payload_then_closes_cleanly(core):
    c = core()
    c.add(1)
    conn, peer = c.client()
    bystander, bystander_peer = c.client()
    c.run()
    c.proxy.on_action(c.link(1), CLOSE, "client_uuid", conn.uuid, b"goodbye", [])
    c.run(2)  # written and closed at the end of the first pass; its DISCONNECTED offered in the next
    assert conn.closed and conn.close_reason == reasons.CLOSED_BY_WORKER
    assert peer.recv(100) == b"goodbye" and peer.recv(100) == b""  # the payload, then a FIN
    assert not bystander.closed
    assert c.link(1).inputs()[-1] == (conn.uuid, "DISCONNECTED closed_by_worker")


def test_close_of_a_client_with_nothing_to_write_is_at_once(core):
    c = core()
    c.add(1)
    conn, peer = c.client()
    c.proxy.on_action(c.link(1), CLOSE, "client_uuid", conn.uuid, b"", [])
    assert conn.closed and peer.recv(10) == b""


def test_join_send_to_group_leave_and_a_member_that_goes(core):
    c = core()
    c.add(1)
    (a, pa), (b, pb), (x, px) = c.client(), c.client(), c.client()
    link = c.link(1)
    c.proxy.on_action(link, JOIN, "client_uuid", a.uuid, b"", ["room", "lobby"])
    c.proxy.on_action(link, JOIN, "client_uuid", b.uuid, b"", ["room"])
    c.proxy.on_action(link, SEND, "group", "room", b"hi room", [])
    c.run()
    assert pa.recv(100) == b"hi room" and pb.recv(100) == b"hi room"
    assert c.proxy.connection_info(a, 0)["groups"] == ["lobby", "room"]
    c.proxy.on_action(link, LEAVE, "client_uuid", b.uuid, b"", ["room"])
    c.proxy.close(a, reasons.CLIENT_RESET)
    assert c.proxy.groups.page() == (0, [])
    c.proxy.on_action(link, JOIN, "group", "nobody", b"", ["x"])  # an empty group: nothing happens
    assert c.proxy.stats.actions == {"join": 3, "send": 1, "leave": 1}


def test_group_limits_refuse_the_action_count_it_and_go_on(core):
    c = core(max_groups_per_client=2, max_group_name_bytes=8)
    c.add(1)
    conn, _ = c.client()
    link = c.link(1)
    c.proxy.on_action(link, JOIN, "client_uuid", conn.uuid, b"", ["a", "b", "c"])
    c.proxy.on_action(link, JOIN, "client_uuid", conn.uuid, b"", ["much-too-long"])
    c.proxy.on_action(link, JOIN, "client_uuid", conn.uuid, b"", [])
    c.proxy.on_action(link, 9, "client_uuid", conn.uuid, b"", [])
    assert c.proxy.stats.drops == {"action_refused": 3, "bad_worker_message": 1}
    assert c.proxy.groups.groups_of(conn) == [] and not conn.closed


def test_close_of_a_broadcast_set_and_of_a_group(core):
    c = core()
    c.add(1)
    clients = [c.client() for _ in range(3)]
    link = c.link(1)
    c.proxy.on_action(link, JOIN, "client_uuid", clients[0][0].uuid, b"", ["g"])
    c.proxy.on_action(link, CLOSE, "group", "g", b"bye", [])
    c.run()
    assert clients[0][0].closed and clients[0][1].recv(10) == b"bye"
    c.proxy.on_action(link, CLOSE, "broadcast", 0, b"", [])
    assert all(conn.closed for conn, _ in clients)


def test_a_graceful_stop_ends_only_once_lifecycle_streams_took_their_last_events(core):
    c = core(shutdown_spread=0)
    c.add(1)
    c.add(2, lifecycle=False)
    conn, _ = c.client()
    c.run()
    done = []
    assert c.proxy.begin_shutdown(lambda: done.append(True)) == 1
    lifecycle = c.link(1)
    deadline = time.monotonic() + 5
    while not lifecycle.half_closed and time.monotonic() < deadline:  # its check runs on a 10 ms timer
        c.run()
    assert lifecycle.inputs()[-1] == (conn.uuid, "DISCONNECTED shutdown")
    assert lifecycle.half_closed and not c.link(2).half_closed and not done
    c.proxy.upstreams.on_stream_closed(lifecycle, "worker ended the data stream")
    assert done == [True]
    assert c.proxy.begin_shutdown(lambda: done.append(False)) is None


def test_waiting_events_are_let_go_when_only_base_workers_are_left(core):
    c = core(plugins={"auth_token": {"tokens": ["s3cret"]}})
    bad_conn, _ = c.client()  # no worker yet: events may be wanted
    c.proxy.close(bad_conn, reasons.AUTH_FAILED)
    assert len(c.proxy.lifecycle.pending) == 1
    c.add(2, lifecycle=False)
    assert not c.proxy.lifecycle.pending and c.link(2).inputs() == []
