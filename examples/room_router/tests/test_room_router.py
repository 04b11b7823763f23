"""Unit tests of the `rooms` routing function, with fake upstreams: no pplex process needed."""
import re

import pytest
import voluptuous as vol

from room_router import plugin


class Up:
    """What the plugin reads of a pplex upstream: its address."""

    def __init__(self, port, host="10.0.0.1"):
        self.address = f"{host}:{port}"

    def __repr__(self):
        return f"<Up {self.address}>"


@pytest.fixture(autouse=True)
def default_settings():
    settings = vol.Schema(plugin.pplex_settings_schema())({})
    plugin.pplex_configure(settings)
    return settings


def rooms(count):
    return [b"room-%d" % i for i in range(count)]


def test_room_id_is_read_from_the_frame():
    assert plugin.room_of(b"ROOM lobby-7 move 3 4") == b"lobby-7"
    assert plugin.room_of(b"ROOM lobby-7") == b"lobby-7"
    assert plugin.room_of(b"ROOMS lobby move") is None
    assert plugin.room_of(b"ROOM lobby!7 move") is None  # not an id character, and no space after the id
    assert plugin.room_of(b"hello") is None


def test_every_message_of_a_room_goes_to_one_worker():
    ready = [Up(5000 + i) for i in range(4)]
    for room in rooms(50):
        targets = {plugin.pplex_route(b"ROOM %s msg %d" % (room, n), ready)[0] for n in range(5)}
        assert len(targets) == 1
    # ...and the same worker whatever the order of `ready` (a pplex restart, another instance)
    assert all(plugin.worker_for(r, ready) is plugin.worker_for(r, ready[::-1]) for r in rooms(50))


def test_rooms_spread_over_workers():
    ready = [Up(5000 + i) for i in range(4)]
    counts = {}
    for room in rooms(1000):
        counts[plugin.worker_for(room, ready)] = counts.get(plugin.worker_for(room, ready), 0) + 1
    assert len(counts) == 4 and all(150 <= c <= 350 for c in counts.values()), counts


def test_a_new_worker_takes_only_its_share_of_rooms():
    four = [Up(5000 + i) for i in range(4)]
    five = four + [Up(5004)]
    before = {r: plugin.worker_for(r, four) for r in rooms(1000)}
    after = {r: plugin.worker_for(r, five) for r in rooms(1000)}
    moved = [r for r in before if before[r] is not after[r]]
    assert 100 <= len(moved) <= 300
    assert {after[r] for r in moved} == {five[4]}  # no room moved between the old workers


def test_a_lost_worker_gives_up_only_its_rooms():
    four = [Up(5000 + i) for i in range(4)]
    before = {r: plugin.worker_for(r, four) for r in rooms(1000)}
    three = four[:1] + four[2:]
    moved = {r for r in before if before[r] is not plugin.worker_for(r, three)}
    assert moved == {r for r in before if before[r] is four[1]}


def test_no_room_goes_anywhere_and_no_worker_holds():
    ready = [Up(5000), Up(5001)]
    assert plugin.pplex_route(b"hello", ready) is ready  # the balancer picks
    assert list(plugin.pplex_route(b"ROOM a hi", [])) == []  # pplex holds it


def test_custom_pattern_for_json_messages():
    settings = vol.Schema(plugin.pplex_settings_schema())({"pattern": r'^\{"room": ?"([^"]+)"'})
    plugin.pplex_configure(settings)
    ready = [Up(5000 + i) for i in range(3)]
    first = plugin.pplex_route(b'{"room": "arena", "x": 1}', ready)
    assert first == plugin.pplex_route(b'{"room":"arena","y":2}', ready)
    assert plugin.room_of(b'{"room": "arena"}') == b"arena"
    assert plugin.pplex_route(b"ROOM arena hi", ready) is ready  # the old form is no room now


@pytest.mark.parametrize("pattern, message", [
    ("^ROOM (", "not a valid regular expression"),
    ("^ROOM \\S+", "needs exactly one group, the room id; it has 0"),
    ("^(ROOM) (\\S+)", "needs exactly one group, the room id; it has 2"),
    ("", "expected a regular expression"),
])
def test_bad_pattern_is_refused_by_the_schema(pattern, message):
    with pytest.raises(vol.MultipleInvalid) as error:
        vol.Schema(plugin.pplex_settings_schema())({"pattern": pattern})
    assert error.value.errors[0].path == ["pattern"]
    assert re.search(re.escape(message), str(error.value.errors[0]))
