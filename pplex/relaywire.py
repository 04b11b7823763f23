"""The relay wire format: what one pplex node publishes on the broker for the others.

Our own small binary format (version 1), not pickle and not protobuf: a frame
is a fixed header and a run of type-length-value records, so a frame carries
every relay of one reactor pass for one subject (one publish, many messages).

Frame::

    offset size  field
    0      1     version          1; a frame of another version is dropped whole (counted)
    1      1     flags            0; a node ignores flag bits it does not know
    2      4     origin tag       the sending node's tag (pplex.node: first 4 bytes of its UUIDs)
    6      4     origin instance  random per process start: a node drops its own frames by tag+instance
    10     ...   records

Record::

    0      1     kind             see below
    1      4     length           big-endian unsigned, bytes of body that follow
    5      ...   body

Kinds of version 1 (bodies):

    1 BROADCAST     selector (1 byte: 0 ALL, 1 ACTIVE, 2 NOT_ACTIVE) + payload
    2 REPLY         client UUID (36 ASCII bytes, its text form) + payload
    3 HEARTBEAT     JSON object: node id, tag, connections, upstreams, admin address, ...
    4 LEAVE         empty: the node is stopping; drop it from the live-node table now
    5 ADMIN_ASK     request id (4 bytes, big-endian) + JSON object {"op": ..., args}
    6 ADMIN_ANSWER  request id (4 bytes, big-endian) + JSON object (the answer)
    16 ACTION       a worker's session action (README "Sessions"), see below

ACTION body (all lengths big-endian unsigned)::

    0      1     action           OutputStreamRequest.Action: 0 SEND, 1 CLOSE, 2 JOIN, 3 LEAVE
    1      1     target kind      0 client UUID, 1 broadcast set, 2 group
    2      2     target length    n
    4      n     target           UUID text (ASCII), the selector (1 byte), or the group name (UTF-8)
    4+n    2     groups count     k (JOIN, LEAVE; else 0)
    ...          k times: 2-byte length + group name (UTF-8)
    ...          payload          the rest

A SEND to a group, and a CLOSE / JOIN / LEAVE on a broadcast set or a group,
go on `<name>.all` (every node applies it to its own clients); one on a
client UUID goes to the owner node's subject. SEND to a UUID or a broadcast
set keeps kinds REPLY and BROADCAST. Kinds 17 to 31 stay free for sessions.
**Adding a kind needs no new version**: every record
says its length, so a node skips kinds it does not know (and counts them), and
older nodes go on working beside newer ones. A change to the header or to an
existing kind's body needs version 2, which older nodes drop whole.

Payloads are bytes as the worker sent them; the receiving node applies its own
framing plugin's `encode`, as for a reply from its own stream.

Delivery is at most once: the broker (NATS core, Redis pub/sub) keeps nothing
and acknowledges nothing, and pplex never retries. Order is kept between one
sender and one receiver (one connection each), not across senders.
"""
import struct

VERSION = 1
HEADER = struct.Struct(">BB4s4s")
RECORD = struct.Struct(">BI")
REQUEST_ID = struct.Struct(">I")
HEADER_SIZE = HEADER.size          # 10
RECORD_HEADER_SIZE = RECORD.size   # 5
UUID_TEXT_BYTES = 36

BROADCAST, REPLY, HEARTBEAT, LEAVE, ADMIN_ASK, ADMIN_ANSWER = 1, 2, 3, 4, 5, 6
ACTION = 16
KIND_NAMES = {BROADCAST: "broadcast", REPLY: "reply", HEARTBEAT: "heartbeat", LEAVE: "leave",
              ADMIN_ASK: "admin_ask", ADMIN_ANSWER: "admin_answer", ACTION: "action"}
# Kept for the session extension (README "Sessions"); ACTION is the first.
RESERVED_KINDS = range(17, 32)
# ACTION target kinds, by the name of the OutputStreamRequest target field.
TARGET_KINDS = {"client_uuid": 0, "broadcast": 1, "group": 2}
TARGET_NAMES = {code: name for name, code in TARGET_KINDS.items()}
LENGTH = struct.Struct(">H")
ACTION_HEAD = struct.Struct(">BBH")

_SELECTOR_BYTES = tuple(bytes([i]) for i in range(256))


class BadFrame(ValueError):
    """A frame pplex cannot read: wrong version, or a record running past the end."""


def header(tag, instance):
    """The 10 header bytes of every frame this node sends (tag: 4 bytes, instance: 4 bytes)."""
    return HEADER.pack(VERSION, 0, tag, instance)


def record(kind, *parts):
    """One record: kind, length of the parts, the parts (bytes-like)."""
    size = 0
    for part in parts:
        size += len(part)
    return b"".join((RECORD.pack(kind, size), *parts))


def broadcast(selector, payload):
    return b"".join((RECORD.pack(BROADCAST, 1 + len(payload)), _SELECTOR_BYTES[selector], payload))


def reply(client_uuid, payload):
    encoded = client_uuid.encode("ascii")
    return b"".join((RECORD.pack(REPLY, len(encoded) + len(payload)), encoded, payload))


def action(action_code, which, target, payload, groups=()):
    """An ACTION record: `which` is the target field's name, `target` its value (str, or an int selector
    for a broadcast set); raises ValueError for a name or count over 65535 (the caller counts it)."""
    if which == "broadcast":
        target_bytes = _SELECTOR_BYTES[target]
    else:
        target_bytes = target.encode("ascii" if which == "client_uuid" else "utf-8")
    parts = [ACTION_HEAD.pack(action_code, TARGET_KINDS[which], len(target_bytes)), target_bytes,
             LENGTH.pack(len(groups))]
    for name in groups:
        encoded = name.encode("utf-8")
        parts.append(LENGTH.pack(len(encoded)))
        parts.append(encoded)
    parts.append(payload)
    return record(ACTION, *parts)


def split_action(body):
    """(action, target field name, target, payload bytes, [group names]) of an ACTION body; raises BadFrame."""
    end = len(body)
    if end < ACTION_HEAD.size:
        raise BadFrame("action record shorter than its header")
    action_code, kind, size = ACTION_HEAD.unpack_from(body, 0)
    which = TARGET_NAMES.get(kind)
    if which is None:
        raise BadFrame(f"action record with target kind {kind}")
    at = ACTION_HEAD.size
    if at + size + LENGTH.size > end:
        raise BadFrame("action record target runs past its end")
    raw = bytes(body[at:at + size])
    at += size
    try:
        if which == "broadcast":
            if size != 1:
                raise BadFrame("action record with a broadcast selector that is not 1 byte")
            target = raw[0]
        else:
            target = raw.decode("ascii" if which == "client_uuid" else "utf-8")
        count, = LENGTH.unpack_from(body, at)
        at += LENGTH.size
        groups = []
        for _ in range(count):
            if at + LENGTH.size > end:
                raise BadFrame("action record group names run past its end")
            size, = LENGTH.unpack_from(body, at)
            at += LENGTH.size
            if at + size > end:
                raise BadFrame("action record group name runs past its end")
            groups.append(bytes(body[at:at + size]).decode("utf-8"))
            at += size
    except UnicodeDecodeError:
        raise BadFrame("action record with a name that is not UTF-8") from None
    return action_code, which, target, bytes(body[at:]), groups


def with_request_id(kind, request_id, body):
    return record(kind, REQUEST_ID.pack(request_id & 0xFFFFFFFF), body)


def read_header(frame):
    """(origin tag, origin instance) of a frame; raises BadFrame."""
    if len(frame) < HEADER_SIZE:
        raise BadFrame(f"frame of {len(frame)} bytes is shorter than the header")
    version, _flags, tag, instance = HEADER.unpack_from(frame, 0)
    if version != VERSION:
        raise BadFrame(f"frame version {version} (this node reads {VERSION})")
    return tag, instance


def records(frame):
    """Yield (kind, body) for each record after the header; raises BadFrame at a torn record.

    Bodies are memoryviews into the frame (no copy); kinds are not checked here.
    """
    view = memoryview(frame)
    end = len(view)
    at = HEADER_SIZE
    unpack = RECORD.unpack_from
    while at < end:
        if at + RECORD_HEADER_SIZE > end:
            raise BadFrame(f"record header torn at byte {at}")
        kind, size = unpack(view, at)
        at += RECORD_HEADER_SIZE
        if at + size > end:
            raise BadFrame(f"record of {size} bytes at byte {at} runs past the frame end ({end})")
        yield kind, view[at:at + size]
        at += size


def split_broadcast(body):
    """(selector, payload bytes) of a BROADCAST body; raises BadFrame."""
    if len(body) < 1:
        raise BadFrame("broadcast record without a selector")
    return body[0], bytes(body[1:])


def split_reply(body):
    """(client uuid text, payload bytes) of a REPLY body; raises BadFrame."""
    if len(body) < UUID_TEXT_BYTES:
        raise BadFrame("reply record shorter than a UUID")
    try:
        client_uuid = bytes(body[:UUID_TEXT_BYTES]).decode("ascii")
    except UnicodeDecodeError:
        raise BadFrame("reply record with a non-ASCII UUID") from None
    return client_uuid, bytes(body[UUID_TEXT_BYTES:])


def split_request(body):
    """(request id, JSON bytes) of an ADMIN_ASK or ADMIN_ANSWER body; raises BadFrame."""
    if len(body) < REQUEST_ID.size:
        raise BadFrame("admin record without a request id")
    return REQUEST_ID.unpack_from(body, 0)[0], bytes(body[REQUEST_ID.size:])
