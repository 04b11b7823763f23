"""The relay wire format: round trips, forward compatibility, and torn or hostile frames."""
import random

import pytest

from pplex import relaywire

TAG, INSTANCE = bytes.fromhex("0123abcd"), b"\x01\x02\x03\x04"
UUID = "0123abcd-0000-4000-8000-000000000001"


def frame(*records):
    return relaywire.header(TAG, INSTANCE) + b"".join(records)


def test_records_round_trip():
    data = frame(relaywire.broadcast(2, b"hi"), relaywire.reply(UUID, b"\x00\xff"),
                 relaywire.record(relaywire.LEAVE),
                 relaywire.with_request_id(relaywire.ADMIN_ASK, 7, b'{"op":"stats"}'))
    assert relaywire.read_header(data) == (TAG, INSTANCE)
    got = list(relaywire.records(data))
    assert [kind for kind, _ in got] == [relaywire.BROADCAST, relaywire.REPLY, relaywire.LEAVE, relaywire.ADMIN_ASK]
    assert relaywire.split_broadcast(got[0][1]) == (2, b"hi")
    assert relaywire.split_reply(got[1][1]) == (UUID, b"\x00\xff")
    assert bytes(got[2][1]) == b""
    assert relaywire.split_request(got[3][1]) == (7, b'{"op":"stats"}')


def test_a_kind_this_node_does_not_know_is_skipped_by_its_length():
    # What a newer node (kinds 17..31 are kept for sessions) sends must not break an older one.
    data = frame(relaywire.record(17, b"group-send body"), relaywire.broadcast(0, b"after"))
    kinds = [(kind, bytes(body)) for kind, body in relaywire.records(data)]
    assert kinds == [(17, b"group-send body"), (relaywire.BROADCAST, b"\x00after")]


@pytest.mark.parametrize("action, which, target, payload, groups", [
    (0, "group", "room \u00e9", b"to the room", []),
    (1, "broadcast", 2, b"", []),
    (2, "client_uuid", UUID, b"", ["red", "blue"]),
    (3, "group", "g", b"\x00\xff", ["x" * 300]),
])
def test_actions_round_trip(action, which, target, payload, groups):
    data = frame(relaywire.action(action, which, target, payload, groups), relaywire.broadcast(0, b"after"))
    (kind, body), (after, _) = relaywire.records(data)
    assert kind == relaywire.ACTION == 16 and after == relaywire.BROADCAST
    assert relaywire.split_action(body) == (action, which, target, payload, groups)


def test_action_layout_is_fixed():
    assert relaywire.action(1, "group", "g", b"bye", ["a"]) == (
        b"\x10\x00\x00\x00\x0d" b"\x01\x02\x00\x01g" b"\x00\x01\x00\x01a" b"bye")


def test_torn_or_hostile_actions_raise_bad_frame():
    whole = relaywire.action(2, "client_uuid", UUID, b"p", ["red", "blue"])[relaywire.RECORD_HEADER_SIZE:]
    for cut in range(0, len(whole) - 2):  # a cut inside a name or count (the payload may be empty)
        try:
            relaywire.split_action(whole[:cut])
        except relaywire.BadFrame:
            continue
        assert cut >= len(whole) - 1
    for body, reason in ((b"\x00\x07\x00\x00\x00\x00", "target kind 7"),
                         (b"\x00\x02\x00\x01\xff\x00\x00", "not UTF-8"),
                         (b"\x00\x01\x00\x02ab\x00\x00", "not 1 byte")):
        with pytest.raises(relaywire.BadFrame, match=reason):
            relaywire.split_action(body)


def test_header_layout_is_fixed():
    assert relaywire.header(TAG, INSTANCE) == b"\x01\x00" + TAG + INSTANCE
    assert relaywire.broadcast(1, b"x") == b"\x01\x00\x00\x00\x02\x01x"


@pytest.mark.parametrize("data, reason", [
    (b"\x01\x00", "shorter than the header"),
    (b"\x02\x00" + TAG + INSTANCE, "version 2"),
])
def test_bad_headers(data, reason):
    with pytest.raises(relaywire.BadFrame, match=reason):
        relaywire.read_header(data)


def test_torn_records_raise_bad_frame():
    whole = frame(relaywire.broadcast(0, b"payload"))
    for cut in range(relaywire.HEADER_SIZE + 1, len(whole)):
        with pytest.raises(relaywire.BadFrame):
            list(relaywire.records(whole[:cut]))
    with pytest.raises(relaywire.BadFrame):
        relaywire.split_reply(memoryview(b"short"))
    with pytest.raises(relaywire.BadFrame):
        relaywire.split_broadcast(memoryview(b""))


def test_random_bytes_never_raise_anything_but_bad_frame():
    rng = random.Random(12)
    for _ in range(3000):
        data = relaywire.header(TAG, INSTANCE) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(40)))
        try:
            for kind, body in relaywire.records(data):
                if kind == relaywire.REPLY:
                    relaywire.split_reply(body)
                elif kind == relaywire.BROADCAST:
                    relaywire.split_broadcast(body)
                elif kind == relaywire.ACTION:
                    relaywire.split_action(body)
        except relaywire.BadFrame:
            pass
