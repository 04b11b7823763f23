"""Three pplex nodes, one broker (NATS, then Redis), two workers: they act as one proxy.

Real processes and servers on 127.0.0.1: nats-server or redis-server, three
`python -m pplex` nodes named a, b, c, two gRPC workers that every node streams
to. Heartbeats are short (0.2 s, dead after 1 s) so each test takes seconds.
"""
import os
import signal
import time

import pytest

from pplex.worker import Worker
from tests.brokers import KINDS, BrokerProcess, available
from tests.helpers import wait_for

ALL, ACTIVE, NOT_ACTIVE = 0, 1, 2
HEARTBEAT, DEAD_AFTER = 0.2, 1.0


class ClusterWorker(Worker):
    """Echoes lines, and obeys: `whoami` (its UUID back), `bcast K TEXT` (broadcast K on this
    stream only), `via NODE UUID TEXT` (reply to UUID on the stream of pplex node NODE)."""

    def on_message(self, stream, client_uuid, payload):
        words = payload.rstrip(b"\n").split(b" ", 3)
        if words[0] == b"whoami":
            stream.reply(client_uuid, client_uuid.encode() + b"\n")
        elif words[0] == b"bcast":
            stream.broadcast(words[2] + b"\n", int(words[1]))
        elif words[0] == b"via":
            node, target, text = words[1].decode(), words[2].decode(), words[3]
            chosen = [s for s in self.streams() if s.node == node]
            chosen[0].reply(target, text + b"\n")
            stream.reply(client_uuid, b"sent\n")
        else:
            stream.reply(client_uuid, payload)


@pytest.fixture(params=KINDS)
def broker(request, tmp_path):
    if not available(request.param):
        pytest.skip(f"{request.param} server not installed (./dev test installs it)")
    process = BrokerProcess(request.param, tmp_path)
    yield process
    process.stop()


def start_cluster(start_pplex, start_worker, broker, names=("a", "b", "c")):
    workers = [start_worker(ClusterWorker()), start_worker(ClusterWorker())]
    nodes = {}
    for name in names:
        # Node c speaks to the workers with the h2 transport, the others with grpcio: one cluster.
        nodes[name] = start_pplex(*(("--transport", "h2") if name == "c" else ()), config={
            "upstream": [{"host": "127.0.0.1", "port": w.port} for w in workers],
            "server": {"active_window": 60},
            "cluster": {"broker": broker.url, "node": name, "heartbeat": HEARTBEAT, "dead_after": DEAD_AFTER},
        })
    for name, pplex in nodes.items():
        pplex.wait_ready_upstreams(2)
        wait_for(lambda: listed(pplex) == set(names), 10, message=f"node {name} lists {names}")
    return nodes, workers


def listed(pplex):
    status, body = pplex.admin("GET", "/cluster")
    assert status == 200
    return {n["node"] for n in body["nodes"]}


def whoami(client):
    client.send(b"whoami\n")
    return client.recv_line().decode()


def read_until(client, end):
    """Lines received before the line `end` (consumed)."""
    lines = []
    while True:
        line = client.recv_line()
        if line == end:
            return lines
        lines.append(line)


def metric(pplex, name, **labels):
    text = pplex.admin("GET", "/metrics")[1]
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_broadcasts_replies_and_admin_reach_across_nodes(start_pplex, start_worker, broker):
    nodes, workers = start_cluster(start_pplex, start_worker, broker)
    active, idle, uuids = {}, {}, {}
    for name, pplex in nodes.items():
        active[name] = [pplex.client(), pplex.client()]
        idle[name] = pplex.client()  # never sends: not active
        uuids[name] = [whoami(c) for c in active[name]]
    for name, pplex in nodes.items():
        wait_for(lambda: pplex.stats()["connections_open"] == 3, message=f"3 clients on {name}")
        # Workers see which node opened each stream (the pplex-node header) and the cluster's name.
        assert {(s.node, s.cluster) for s in workers[0].streams()} >= {(name, "pplex")}
    # UUIDs stay UUIDv4 and start with their node's tag.
    tags = {n["node"]: n["tag"] for n in nodes["a"].admin("GET", "/cluster")[1]["nodes"]}
    for name, ids in uuids.items():
        for text in ids:
            assert text[:8] == tags[name] and text[14] == "4" and text[19] in "89ab"
    everyone = [c for name in nodes for c in active[name] + [idle[name]]]

    # BROADCAST_ALL sent on a's stream: every client of the three nodes, exactly once.
    active["a"][0].send(b"bcast 0 hello-all\n")
    assert active["a"][0].recv_line() == b"hello-all"
    active["a"][0].send(b"bcast 0 end-1\n")
    for client in everyone:
        expected = [] if client is active["a"][0] else [b"hello-all"]  # the sender read its copy above
        assert read_until(client, b"end-1") == expected

    # ACTIVE and NOT_ACTIVE, sent on b's and c's streams, judged on every node by its own clients.
    active["b"][0].send(b"bcast 1 hi-active\n")
    assert active["b"][0].recv_line() == b"hi-active"
    active["c"][0].send(b"bcast 2 hi-idle\n")
    assert idle["c"].recv_line() == b"hi-idle"  # applied on c (then relayed) before end-2 is sent
    active["c"][0].send(b"bcast 0 end-2\n")
    for name in nodes:
        for client in active[name]:
            lines = read_until(client, b"end-2")
            if client is not active["b"][0]:
                assert lines == [b"hi-active"], (name, lines)
            else:
                assert lines == [], lines
        assert read_until(idle[name], b"end-2") == ([] if name == "c" else [b"hi-idle"]), name

    # A reply for a client of a, sent on b's stream (asked by a client of c): relayed to a.
    target = uuids["a"][0]
    active["c"][0].send(f"via b {target} across\n".encode())
    assert active["c"][0].recv_line() == b"sent"
    assert active["a"][0].recv_line() == b"across"

    # Admin on any node acts on the owner.
    status, body = nodes["a"].admin("GET", f"/connections/{uuids['b'][1]}")
    assert status == 200 and body["node"] == "b" and body["uuid"] == uuids["b"][1] and body["active"]
    status, body = nodes["c"].admin("DELETE", f"/connections/{uuids['a'][1]}")
    assert (status, body) == (200, {"closed": uuids["a"][1], "node": "a"})
    assert active["a"][1].is_closed_by_peer(timeout=5)
    assert nodes["c"].admin("DELETE", f"/connections/{uuids['a'][1]}")[0] == 404
    gone = tags["b"] + "-0000-4000-8000-000000000000"
    assert nodes["a"].admin("GET", f"/connections/{gone}")[0] == 404

    for pplex in nodes.values():
        assert listed(pplex) == {"a", "b", "c"}
    status, stats = nodes["b"].admin("GET", "/stats?scope=cluster")
    assert status == 200 and stats["missing"] == [] and set(stats["nodes"]) == {"a", "b", "c"}
    assert stats["connections_open"] == 8
    status, page = nodes["b"].admin("GET", "/connections?scope=cluster&limit=100")
    assert page["count"] == 8 and len(page["connections"]) == 8
    assert {c["node"] for c in page["connections"]} == {"a", "b", "c"}
    # A search with scope=cluster searches every node: one client of a, found from b.
    status, page = nodes["b"].admin("GET", f"/connections?scope=cluster&q={uuids['a'][0]}")
    assert status == 200 and page["matched"] == 1 and [c["uuid"] for c in page["connections"]] == [uuids["a"][0]]
    status, page = nodes["b"].admin("GET", "/connections?scope=cluster&q=no-such-client")
    assert status == 200 and page["matched"] == 0 and page["connections"] == []
    assert nodes["a"].stats()["cluster"]["relayed_out"] >= 2
    assert nodes["a"].stats()["cluster"]["relayed_in"]["reply"] == 1


def test_dead_node_lost_broker_and_its_return(start_pplex, start_worker, broker):
    nodes, _ = start_cluster(start_pplex, start_worker, broker)
    clients = {name: pplex.client() for name, pplex in nodes.items()}
    for name, client in clients.items():
        client.send(b"ping\n")
        assert client.recv_line() == b"ping"

    # kill -9 c: the others keep serving and drop it within the dead-node time.
    killed_at = time.monotonic()
    os.killpg(nodes["c"].proc.pid, signal.SIGKILL)
    wait_for(lambda: listed(nodes["a"]) == {"a", "b"}, 5, message="a drops c")
    assert time.monotonic() - killed_at < DEAD_AFTER + 2 * HEARTBEAT + 1.0
    wait_for(lambda: listed(nodes["b"]) == {"a", "b"}, 5, message="b drops c")
    clients["a"].send(b"bcast 0 still-one\n")
    assert clients["a"].recv_line() == b"still-one"
    assert clients["b"].recv_line() == b"still-one"

    # The broker goes: local traffic goes on, /readyz says degraded (still 200), relays are counted.
    broker.stop()
    for pplex in (nodes["a"], nodes["b"]):
        wait_for(lambda: pplex.admin("GET", "/readyz")[1].get("status") == "degraded", 10,
                 message="/readyz degraded")
        assert pplex.admin("GET", "/readyz")[0] == 200
    clients["a"].send(b"echo while down\n")
    assert clients["a"].recv_line() == b"echo while down"
    clients["a"].send(b"bcast 0 local-only\n")
    assert clients["a"].recv_line() == b"local-only"
    wait_for(lambda: (metric(nodes["a"], "pplex_cluster_unrelayed_total", node="a", reason="broker_down") or 0) >= 1,
             message="the unrelayed broadcast counted")
    assert metric(nodes["a"], "pplex_cluster_broker_up", node="a") == 0

    # It comes back: relaying resumes without restarting pplex.
    broker.start()
    for pplex in (nodes["a"], nodes["b"]):
        wait_for(lambda: pplex.admin("GET", "/readyz")[1].get("status") == "ready", 10, message="broker back")
    wait_for(lambda: listed(nodes["a"]) == {"a", "b"} and listed(nodes["b"]) == {"a", "b"}, 5,
             message="heartbeats again")
    clients["a"].send(b"bcast 0 relayed-again\n")
    assert clients["a"].recv_line() == b"relayed-again"
    assert clients["b"].recv_line() == b"relayed-again"  # local-only never reached b
