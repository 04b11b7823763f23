"""Node identity: UUIDs that stay UUIDv4 and name their node; the log field."""
import logging
import uuid

import pytest

from pplex import node


def test_uuids_are_version_4_with_the_node_tag_up_front():
    me = node.Node("edge-1")
    make = me.uuid_maker()
    made = {make() for _ in range(2000)}
    assert len(made) == 2000
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert text[:8] == me.tag and me.owns(text)
    # The variant's two free bits are random: all of 8, 9, a, b appear.
    assert {text[19] for text in made} == set("89ab")


def test_tag_is_derived_from_the_id_and_differs_between_ids():
    assert node.tag_of("a") == node.Node("a").tag == node.tag_of("a")
    assert node.tag_of("a") != node.tag_of("b")
    assert len(node.tag_of("a")) == 8


@pytest.mark.parametrize("text, tag", [
    ("0123abcd-0000-4000-8000-000000000000", "0123abcd"),
    ("0123ABCD-0000-4000-8000-000000000000", "0123abcd"),
    ("0123abcz-0000-4000-8000-000000000000", None),
    ("short", None),
    ("0123abcd+0000-4000-8000-000000000000", None),
])
def test_uuid_tag(text, tag):
    assert node.uuid_tag(text) == tag


def test_ids_are_checked_and_children_get_an_index():
    with pytest.raises(ValueError):
        node.Node("has space")
    saved = node.current
    try:
        assert node.configure("edge", 3).id == "edge-3"
        assert node.current.metadata == (("pplex-node", "edge-3"),)
        clustered = node.configure("edge", None, cluster="game")
        assert clustered.headers == ((b"pplex-node", b"edge"), (b"pplex-cluster", b"game"))
        assert node.ID_PATTERN.match(node.configure().id)
    finally:
        node.current = saved


def test_log_field_names_the_node():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    assert node.LogField().filter(record) and record.node == node.current.id
