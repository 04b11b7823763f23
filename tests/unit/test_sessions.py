"""pplex/sessions.py and pplex/reasons.py: the reasons as documented, CONNECTED metadata, and group
bookkeeping with limits."""
import re

from pplex import reasons, sessions
from pplex.proxyproto import HeaderParser
from pplex.sessions import Groups
from tests import proxyheaders as build
from tests.helpers import ROOT


def test_every_reason_has_its_readme_line_and_no_other_is_documented():
    """reasons.py is the one list (logs, stats, DISCONNECTED); README's table follows it, in its order."""
    readme = open(f"{ROOT}/README.md").read()
    section = readme[readme.index("DISCONNECTED `metadata[\"reason\"]` is one of"):readme.index("**Outputs**")]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert documented == list(reasons.REASONS)
    assert not hasattr(sessions, "REASONS")


def test_connected_metadata_is_all_strings_with_proxy_and_tls_facts():
    header = HeaderParser().feed(build.v2(("203.0.113.7", 51234), ("10.0.0.1", 7999),
                                          tlvs=[build.tlv(0x02, b"game.example")]))
    meta = sessions.connected_metadata(header.client_address(), ("10.0.0.1", 7999), "node-a",
                                       proxy=header.metadata(), tls={"tls_version": "TLSv1.3"})
    assert meta["remote_addr"] == "203.0.113.7" and meta["remote_port"] == "51234"
    assert meta["local_port"] == "7999" and meta["node"] == "node-a"
    assert meta["proxy_authority"] == "game.example" and meta["tls_version"] == "TLSv1.3"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def test_join_send_leave_drop():
    groups = Groups()
    a, b = object(), object()
    assert groups.join(a, ["red", "blue"]) is None and groups.join(b, ["red"]) is None
    assert set(groups.members("red")) == {a, b} and groups.groups_of(a) == ["blue", "red"]
    assert groups.listing() == [("blue", 1), ("red", 2)]
    assert groups.leave(a, ["red", "never-joined"]) is None
    assert groups.members("red") == (b,)
    groups.drop(b)
    assert groups.members("red") == () and groups.listing() == [("blue", 1)]
    groups.drop(a)
    assert len(groups) == 0 and groups.groups_of(a) == []
    assert groups.leave(a, ["blue"]) is None  # a member with no groups: nothing to do


def test_limits_refuse_the_whole_action_with_a_reason():
    groups = Groups(max_per_client=2, max_name_bytes=5, max_groups=3)
    a, b = object(), object()
    assert groups.join(a, ["x", "toolong"]) == "group name over 5 bytes"
    assert groups.join(a, [""]) == "a group name must be a non-empty string"
    assert groups.join(a, [None]) == "a group name must be a non-empty string"
    assert groups.groups_of(a) == []  # all or none
    assert groups.join(a, ["x", "y"]) is None
    assert groups.join(a, ["x"]) is None  # already in: no new group counted
    assert groups.join(a, ["z"]) == "a client may be in at most 2 groups"
    assert groups.join(b, ["z", "w"]) == "at most 3 groups in all"
    assert groups.join(b, ["z"]) is None and len(groups) == 3
    assert groups.join(b, ["\u00e9\u00e9\u00e9"]) == "group name over 5 bytes"  # bytes, not characters
