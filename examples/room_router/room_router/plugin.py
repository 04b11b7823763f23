"""Routing plugin `rooms`: every message of one game room goes to the same worker.

Messages carry their room, by default as `ROOM <id> <rest>` lines (use it with
`framing_line`). The room id picks one worker among those in rotation by
rendezvous hashing (highest random weight): each worker gets a score, a
stable hash of the room id and the worker's address, and the highest score
wins. So:

- every pplex instance in front of the same workers sends a room to the same
  worker (the address, not pplex's own upstream id, names a worker);
- when a worker joins, only the rooms that now score highest on it move to it;
  when one leaves, only its rooms move, each to its next-highest worker;
- a message with no room id goes to any worker (the balancer picks);
- with no worker in rotation, messages wait (pplex holds them, in order).

Settings (`"plugins": {"rooms": {...}}`):
- `pattern` (default `^ROOM ([A-Za-z0-9_.:-]{1,64})(?: |$)`): a regular
  expression matched at the start of each message (as UTF-8 bytes); its one
  group is the room id. E.g. `^\\{"room": ?"([^"]+)"` for JSON messages that
  start with their room field.
"""
import hashlib
import json
import re

import voluptuous as vol

from pplex import hookimpl

DEFAULT_PATTERN = r"^ROOM ([A-Za-z0-9_.:-]{1,64})(?: |$)"

_pattern = [re.compile(DEFAULT_PATTERN.encode())]


def RoomPattern(value):
    """a regular expression with exactly one group: the room id"""
    if not isinstance(value, str) or not value:
        raise vol.Invalid(f"expected a regular expression (got {json.dumps(value)})")
    try:
        compiled = re.compile(value.encode("utf-8"))
    except re.error as error:
        raise vol.Invalid(f"not a valid regular expression: {error} (got {json.dumps(value)})") from None
    if compiled.groups != 1:
        raise vol.Invalid(f"needs exactly one group, the room id; it has {compiled.groups} "
                          f"(got {json.dumps(value)})")
    return value


@hookimpl
def pplex_settings_schema():
    return {vol.Optional("pattern", default=DEFAULT_PATTERN): RoomPattern}


@hookimpl
def pplex_configure(settings):
    _pattern[0] = re.compile(settings["pattern"].encode("utf-8"))


def room_of(payload):
    """The room id in a message (bytes), or None."""
    match = _pattern[0].match(payload)
    return match.group(1) if match is not None else None


def score(room, upstream):
    """A stable 64-bit score of (room, worker): the same in every process, unlike hash()."""
    digest = hashlib.blake2b(room + b"\x00" + upstream.address.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def worker_for(room, ready):
    """The worker with the highest score for this room among `ready` (non-empty)."""
    return max(ready, key=lambda upstream: score(room, upstream))


@hookimpl
def pplex_route(payload, ready):
    room = room_of(payload)
    if room is None or not ready:
        return ready  # no room: any worker; no worker: pplex holds the message
    return (worker_for(room, ready),)
