"""route_sticky, route_prefix, least_pending and hash, on fake connections and upstreams."""
import os
import subprocess
import sys
import uuid

import pytest

from pplex.config import validate
from pplex.errors import ConfigError
from pplex.manager import Context, PluginSet
from tests.helpers import ROOT


class Link:
    def __init__(self, unanswered=0):
        self.pending = unanswered

    def unanswered(self):
        return self.pending


class Up:
    def __init__(self, upstream_id, port=5000, host="127.0.0.1", unanswered=0, batched=0):
        self.id, self.host, self.port = upstream_id, host, port
        self.link = Link(unanswered)
        self.batch = [b"uuid", b"payload", "time"] * batched

    def __repr__(self):
        return f"<Up {self.id}>"


class Conn:
    def __init__(self, client_uuid=None):
        self.uuid = client_uuid or str(uuid.uuid4())
        self.last_upstream = None
        self.attrs = None

    def plugin_data(self):
        if self.attrs is None:
            self.attrs = {}
        return self.attrs


def hook(name, hook_name, settings=None):
    plugins = PluginSet(enabled=[name], settings={name: settings or {}})
    plugins.configure(Context(reactor=None, config=validate({}), proxy=None))
    return plugins.resolve(hook_name)


# -- route_sticky ----------------------------------------------------------------
def test_sticky_keeps_the_last_worker_while_it_is_ready():
    route = hook("route_sticky", "pplex_route")
    a, b, c = Up("u1"), Up("u2"), Up("u3")
    ready = [a, b, c]
    conn = Conn()
    assert route(conn, b"first", ready) is ready  # no worker yet: any
    conn.last_upstream = b
    assert list(route(conn, b"next", ready)) == [b]
    ready.remove(b)  # b left rotation
    assert route(conn, b"moved", ready) is ready
    conn.last_upstream = c
    assert list(route(conn, b"again", ready)) == [c]
    assert list(route(conn, b"none", [])) == []  # nothing ready: held


# -- route_prefix ----------------------------------------------------------------
ROUTES = {
    "chat:": ["127.0.0.1:1001", "127.0.0.1:1002"],
    "game:": ["127.0.0.1:2001"],
    "game:boss:": ["[::1]:2002"],
}


def workers():
    return [Up("u1", 1001), Up("u2", 1002), Up("u3", 2001), Up("u4", 2002, host="::1"), Up("u5", 3001)]


def ids(candidates):
    return [u.id for u in candidates]


def test_prefix_longest_match_wins_and_pools_filter_ready_workers():
    route = hook("route_prefix", "pplex_route", {"routes": ROUTES})
    ready = workers()
    assert ids(route(None, b"chat:hi", ready)) == ["u1", "u2"]
    assert ids(route(None, b"game:move", ready)) == ["u3"]
    assert ids(route(None, b"game:boss:hit", ready)) == ["u4"]
    assert ids(route(None, b"game", ready)) == ids(ready)  # no prefix: default "any"
    assert route(None, b"other", ready) is ready
    assert ids(route(None, bytearray(b"chat:raw"), ready)) == ["u1", "u2"]
    without_boss = [u for u in ready if u.id != "u4"]
    assert route(None, b"game:boss:hit", without_boss) == []  # its pool is down: held, no fallback


def test_prefix_default_hold_sends_unmatched_only_to_pool_workers():
    route = hook("route_prefix", "pplex_route", {"routes": ROUTES, "default": "hold"})
    ready = workers()
    assert ids(route(None, b"other", ready)) == ["u1", "u2", "u3", "u4"]
    assert route(None, b"other", [Up("u5", 3001)]) == []


def test_prefix_empty_prefix_is_a_catch_all_utf8_prefixes_are_bytes():
    route = hook("route_prefix", "pplex_route", {"routes": {"": ["127.0.0.1:3001"], "é": ["127.0.0.1:1001"]}})
    ready = workers()
    assert ids(route(None, b"anything", ready)) == ["u5"]
    assert ids(route(None, "élan".encode(), ready)) == ["u1"]


@pytest.mark.parametrize("settings, message", [
    ({}, "plugins.route_prefix.routes: required key is missing"),
    ({"routes": {}}, "plugins.route_prefix.routes: expected an object of prefix"),
    ({"routes": {"a": []}}, "plugins.route_prefix.routes.a: expected a non-empty list"),
    ({"routes": {"a": ["127.0.0.1:1", "nohost"]}}, "plugins.route_prefix.routes.a[1]: expected a worker address"),
    ({"routes": {"a": ["127.0.0.1:70000"]}}, "plugins.route_prefix.routes.a[0]: expected a worker address"),
    ({"routes": {"a": ["127.0.0.1:1"]}, "default": "rr"},
     "plugins.route_prefix.default: expected \"any\" or \"hold\""),
])
def test_prefix_bad_settings_name_their_path(settings, message):
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["route_prefix"], settings={"route_prefix": settings})
    assert str(error.value).startswith(message)


# -- least_pending ---------------------------------------------------------------
def test_least_pending_picks_the_fewest_in_flight_counting_the_batch():
    balance = hook("least_pending", "pplex_balance")
    busy, light, batched = Up("u1", unanswered=5), Up("u2", unanswered=1), Up("u3", batched=3)
    for _ in range(10):
        assert balance(None, b"", [busy, light, batched]) is light
    light.link.pending = 4
    assert balance(None, b"", [busy, light, batched]) is batched
    assert balance(None, b"", [busy]) is busy


def test_least_pending_ties_go_round_robin():
    balance = hook("least_pending", "pplex_balance")
    a, b, c, loaded = Up("u1"), Up("u2"), Up("u3"), Up("u4", unanswered=1)
    picks = [balance(None, b"", [a, loaded, b, c]).id for _ in range(30)]
    assert "u4" not in picks
    assert picks.count("u1") == picks.count("u2") == picks.count("u3") == 10
    tied = [balance(None, b"", [Up("x", unanswered=2), Up("y", unanswered=2)]).id for _ in range(4)]
    assert sorted(tied) == ["x", "x", "y", "y"]


# -- hash ------------------------------------------------------------------------
def assignments(balance, conns, candidates):
    return {conn.uuid: balance(conn, b"", candidates).id for conn in conns}


def test_hash_adding_a_fifth_worker_moves_between_10_and_30_percent_all_to_it():
    balance = hook("hash", "pplex_balance")
    conns = [Conn() for _ in range(1000)]
    four = [Up(f"u{i}") for i in range(1, 5)]
    before = assignments(balance, conns, four)
    assert all(100 <= list(before.values()).count(u.id) <= 400 for u in four)  # spread over all four
    after = assignments(balance, conns, four + [Up("u5")])
    moved = [u for u in before if before[u] != after[u]]
    assert 100 <= len(moved) <= 300, len(moved)
    assert {after[u] for u in moved} == {"u5"}  # nobody moved between the old workers


def test_hash_removing_a_worker_moves_only_its_clients():
    balance = hook("hash", "pplex_balance")
    conns = [Conn() for _ in range(1000)]
    five = [Up(f"u{i}") for i in range(1, 6)]
    before = assignments(balance, conns, five)
    after = assignments(balance, conns, [u for u in five if u.id != "u3"])
    moved = {u for u in before if before[u] != after[u]}
    assert moved == {u for u in before if before[u] == "u3"}


def test_hash_same_client_same_worker_with_cache_keyed_on_the_candidates():
    balance = hook("hash", "pplex_balance")
    candidates = [Up(f"u{i}") for i in range(1, 4)]
    conn = Conn()
    first = balance(conn, b"", candidates)
    assert all(balance(conn, b"", candidates) is first for _ in range(10))
    twin = Conn(conn.uuid)  # no cache, same UUID: same answer
    assert balance(twin, b"", list(candidates)) is first
    others = [u for u in candidates if u is not first]
    assert balance(conn, b"", others) in others  # new candidates: the cache is not reused


def test_hash_is_stable_across_processes():
    """Not Python's salted hash(): two interpreters with different hash seeds agree."""
    code = ("import sys; from pplex_plugins.hash import pick\n"
            "class U:\n  def __init__(s, i): s.id = i\n"
            "ups = [U(f'u{i}') for i in range(1, 6)]\n"
            "print(','.join(pick(f'client-{n}', ups).id for n in range(50)))\n")
    outputs = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                                cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1
    assert len(set(outputs.pop().strip().split(","))) > 1  # and it does spread
