"""The cluster's relays on the reactor thread, with a fake broker and a fake proxy (no network)."""
import json

import pytest

from pplex import relaywire
from pplex.cluster import RELAY, Cluster
from pplex.logs import FAULTS
from pplex.node import Node
from pplex.reactor import Reactor

SETTINGS = {"broker": "nats://127.0.0.1:1", "name": "game", "heartbeat": 1, "dead_after": 3, "admin_timeout": 1}


class FakeBroker:
    def __init__(self):
        self.published = []
        self.refuse = None
        self.lost_relays = self.inbound_dropped = self.published_frames = self.connects = 0
        self.shown_url = SETTINGS["broker"]
        self.client = None

    def publish(self, subject, frame, count=1):
        if self.refuse:
            return self.refuse
        self.published.append((subject, frame, count))
        return None

    def close(self):
        pass


class FakeProxy:
    def __init__(self):
        self.broadcasts, self.replies, self.actions = [], [], []
        self.fail = False

    def on_action(self, link, action, which, target, payload, groups):
        self.actions.append((link, action, which, target, payload, groups))

    def on_broadcast(self, link, kind, payload):
        if self.fail:
            raise RuntimeError("plugin bug")
        self.broadcasts.append((link, kind, payload))

    def on_reply(self, link, client_uuid, payload):
        self.replies.append((link, client_uuid, payload))


@pytest.fixture
def cluster():
    reactor = Reactor()
    made = Cluster(reactor, FakeProxy(), Node("me"), SETTINGS, ops={"stats": lambda args: {"n": 1}})
    made.broker = FakeBroker()
    made.on_broker_state(True, "connected")
    made.broker.published.clear()  # the hello heartbeat
    yield made
    reactor.close()


def peer_frame(node_id, *records, instance=b"\x00\x00\x00\x09"):
    return relaywire.header(bytes.fromhex(Node(node_id).tag), instance) + b"".join(records)


def heartbeat(node_id, **extra):
    body = json.dumps({"node": node_id, "tag": Node(node_id).tag, **extra}).encode()
    return relaywire.record(relaywire.HEARTBEAT, body)


def test_broadcasts_of_one_pass_go_out_as_one_frame_and_relays_are_not_relayed_again(cluster):
    cluster.relay_broadcast("link", 0, b"one")
    cluster.relay_broadcast("link", 1, b"two")
    cluster.relay_broadcast(RELAY, 0, b"from another node")
    assert cluster.broker.published == []  # nothing before the end of the pass
    cluster._end_of_pass()
    [(subject, frame, count)] = cluster.broker.published
    assert subject == "game.all" and count == 2
    assert [relaywire.split_broadcast(body) for _, body in relaywire.records(frame)] == [(0, b"one"), (1, b"two")]
    assert cluster.snapshot()["relayed_out"] == 2


def test_replies_go_straight_to_the_owner_node_only_when_it_is_alive(cluster):
    other = Node("other")
    their_uuid = other.uuid_maker()()
    assert cluster.relay_reply("link", their_uuid, b"x") is False  # not alive yet: an unknown UUID
    cluster.on_frames([peer_frame("other", heartbeat("other"))])
    assert cluster.relay_reply("link", their_uuid, b"x") is True
    assert cluster.relay_reply("link", cluster.node.uuid_maker()(), b"x") is False  # ours, and gone
    assert cluster.relay_reply(RELAY, their_uuid, b"x") is False  # never bounced on
    assert cluster.relay_reply("link", "not-a-uuid", b"x") is False
    cluster._end_of_pass()
    [(subject, frame, _)] = cluster.broker.published
    assert subject == f"game.node.{other.tag}"
    assert [relaywire.split_reply(body) for _, body in relaywire.records(frame)] == [(their_uuid, b"x")]


def test_actions_on_sets_go_to_every_node_and_on_a_client_to_its_owner(cluster):
    other = Node("other")
    their_uuid = other.uuid_maker()()
    assert cluster.relay_action("link", 0, "group", "room", b"hi", []) is True
    assert cluster.relay_action("link", 1, "client_uuid", their_uuid, b"bye", []) is False  # not alive yet
    cluster.on_frames([peer_frame("other", heartbeat("other"))])
    assert cluster.relay_action("link", 2, "client_uuid", their_uuid, b"", ["red"]) is True
    assert cluster.relay_action("link", 1, "client_uuid", cluster.node.uuid_maker()(), b"", []) is False  # ours
    assert cluster.relay_action(RELAY, 1, "group", "room", b"", []) is False  # never bounced on
    cluster._end_of_pass()
    published = {subject: [relaywire.split_action(body) for _, body in relaywire.records(frame)]
                 for subject, frame, _ in cluster.broker.published}
    assert published == {"game.all": [(0, "group", "room", b"hi", [])],
                         f"game.node.{other.tag}": [(2, "client_uuid", their_uuid, b"", ["red"])]}
    cluster.on_frames([peer_frame("other", relaywire.action(3, "broadcast", 1, b"", ["g"]))])
    assert cluster.proxy.actions == [(RELAY, 3, "broadcast", 1, b"", ["g"])]
    assert cluster.snapshot()["relayed_in"] == {"action": 1}


def test_while_the_broker_is_down_relays_are_counted_not_queued(cluster):
    cluster.on_frames([peer_frame("other", heartbeat("other"))])
    cluster.on_broker_state(False, "connection refused")
    cluster.relay_broadcast("link", 0, b"lost")
    assert cluster.relay_reply("link", Node("other").uuid_maker()(), b"lost") is True
    cluster._end_of_pass()
    assert cluster.snapshot()["unrelayed"] == {"broker_down": 2}
    cluster.on_broker_state(True, "connected")
    cluster.broker.refuse = "backlog"
    cluster.relay_broadcast("link", 0, b"full")
    cluster._end_of_pass()
    assert cluster.snapshot()["unrelayed"] == {"broker_down": 2, "backlog": 1}


def test_frames_from_other_nodes_are_applied_and_own_frames_dropped(cluster):
    uuid = cluster.node.uuid_maker()()
    cluster.on_frames([
        peer_frame("other", relaywire.broadcast(2, b"b"), relaywire.reply(uuid, b"r")),
        relaywire.header(*cluster.origin) + relaywire.broadcast(0, b"mine"),
    ])
    assert cluster.proxy.broadcasts == [(RELAY, 2, b"b")]
    assert cluster.proxy.replies == [(RELAY, uuid, b"r")]
    snap = cluster.snapshot()
    assert snap["relayed_in"] == {"broadcast": 1, "reply": 1} and snap["dropped"] == {"own": 1}


def test_bad_frames_unknown_kinds_and_failing_applies_are_contained(cluster):
    before = FAULTS.snapshot().get("cluster relay", 0)
    cluster.proxy.fail = True
    cluster.on_frames([
        b"\x09junk",                                                    # wrong version
        peer_frame("other", relaywire.broadcast(0, b"x"))[:-3] + b"\xff\xff\xff\xff\xff\xff",  # torn
        peer_frame("other", relaywire.record(20, b"a future kind")),
        peer_frame("other", relaywire.broadcast(0, b"raises")),
        peer_frame("other", relaywire.record(relaywire.HEARTBEAT, b"{not json")),
    ])
    snap = cluster.snapshot()
    assert snap["dropped"] == {"bad_frame": 3, "unknown_kind": 1}
    assert FAULTS.snapshot()["cluster relay"] == before + 1


def test_live_node_table_joins_expires_and_leaves(cluster):
    clock = [100.0]
    cluster.reactor.clock = lambda: clock[0]
    cluster.on_frames([peer_frame("b", heartbeat("b", connections=4)), peer_frame("c", heartbeat("c"))])
    assert [n["node"] for n in cluster.live_nodes()] == ["b", "c", "me"]
    assert cluster.live_nodes()[0]["connections"] == 4
    clock[0] += 2.0
    cluster.on_frames([peer_frame("b", heartbeat("b"))])
    clock[0] += 2.0  # c silent for 4 s > dead_after 3
    cluster._expire()
    assert sorted(cluster.peers) == ["b"]
    cluster.on_frames([peer_frame("b", relaywire.record(relaywire.LEAVE), instance=b"\x00\x00\x00\x01")])
    assert sorted(cluster.peers) == ["b"]  # a LEAVE from another instance of b is not b's
    cluster.on_frames([peer_frame("b", relaywire.record(relaywire.LEAVE))])
    assert cluster.peers == {}


def test_a_hello_is_answered_at_once_on_the_new_nodes_subject(cluster):
    cluster.on_frames([peer_frame("new", heartbeat("new", hello=True))])
    [(subject, frame, _)] = cluster.broker.published
    assert subject == f"game.node.{Node('new').tag}"
    [(kind, body)] = relaywire.records(frame)
    assert kind == relaywire.HEARTBEAT and json.loads(bytes(body))["node"] == "me"


def test_ask_gathers_answers_and_names_the_missing(cluster):
    cluster.on_frames([peer_frame("b", heartbeat("b")), peer_frame("c", heartbeat("c"))])
    cluster.broker.published.clear()
    done = []
    cluster.ask("stats", {}, lambda *result: done.append(result))
    [(subject, frame, _)] = cluster.broker.published
    [(kind, body)] = relaywire.records(frame)
    request_id, question = relaywire.split_request(body)
    assert subject == "game.all" and json.loads(question) == {"op": "stats", "args": {}}
    answer = json.dumps({"node": "b", "result": {"n": 2}}).encode()
    cluster.on_frames([peer_frame("b", relaywire.with_request_id(relaywire.ADMIN_ANSWER, request_id, answer))])
    assert done == []
    cluster._finish_ask(cluster._asks[request_id])  # the deadline
    assert done == [({"me": {"n": 1}, "b": {"n": 2}}, ["c"], None)]


def test_a_question_from_another_node_is_answered_on_its_subject(cluster):
    question = json.dumps({"op": "stats", "args": {}}).encode()
    cluster.on_frames([peer_frame("b", relaywire.with_request_id(relaywire.ADMIN_ASK, 42, question))])
    [(subject, frame, _)] = cluster.broker.published
    [(kind, body)] = relaywire.records(frame)
    assert subject == f"game.node.{Node('b').tag}" and kind == relaywire.ADMIN_ANSWER
    assert relaywire.split_request(body) == (42, b'{"node":"me","result":{"n":1}}')
