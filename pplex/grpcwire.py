"""gRPC over HTTP/2 on the wire, with no I/O: message framing, GOAWAY frames, status wording.

The h2 transport (`pplex.h2link`) feeds these the bytes it reads and writes
what they return; keeping them apart keeps them testable byte by byte.
Facts from the gRPC-over-HTTP/2 protocol: a message is a 1-byte compressed
flag, a 4-byte big-endian length and the protobuf bytes; `grpc-timeout` is
at most 8 digits and a unit; HTTP statuses and RST_STREAM codes seen without
a `grpc-status` map to the codes listed below.
"""
import math
import struct

from h2.errors import ErrorCodes

from pplex.transport import Event

MAX_MESSAGE_BYTES = 64 * 1024 * 1024   # the same limit as the grpcio transport

GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED")
# gRPC's mapping of HTTP statuses seen without a grpc-status.
HTTP_TO_GRPC = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}
# gRPC's mapping of RST_STREAM codes.
RESET_TO_GRPC = {ErrorCodes.CANCEL: "CANCELLED", ErrorCodes.REFUSED_STREAM: "UNAVAILABLE",
                 ErrorCodes.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
                 ErrorCodes.INADEQUATE_SECURITY: "PERMISSION_DENIED"}

_HEADER = struct.Struct(">BI")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
EMPTY_MESSAGE = b"\0\0\0\0\0"     # google.protobuf.Empty, framed


class FramingError(Exception):
    """The worker's DATA does not hold valid gRPC messages."""


# -- gRPC framing ----------------------------------------------------------------
def frame_message(body):
    """One gRPC message on the wire: flag 0 (not compressed), length, body."""
    return _pack_header(0, len(body)) + body


def _varint(value):
    """Protocol Buffers base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((n,)) for n in range(128)]
# Field keys of InputStreamRequest: (field number << 3) | wire type 2 (length-delimited).
_TIME_KEY, _UUID_KEY, _PAYLOAD_KEY = b"\x0a", b"\x12", b"\x1a"
# kind = 4 is a varint (wire type 0); metadata = 5 is a map, on the wire a repeated message
# (wire type 2) of entries {key = 1, value = 2}, both length-delimited strings.
_KIND_KEY, _METADATA_KEY, _ENTRY_KEY, _ENTRY_VALUE = b"\x20", b"\x2a", b"\x0a", b"\x12"


# The payload field's key and length for the sizes a merged raw message or a frame usually has
# (under 16 KiB), made once each, when first needed: 1 + 2 bytes each, at most 16,384 of them.
_payload_heads = [None] * 16384


def _length_prefix(key, size):
    return key + (_SMALL_VARINTS[size] if size < 128 else _varint(size))


def _payload_head(size):
    """The payload field's key and length prefix (`_length_prefix(_PAYLOAD_KEY, size)`), cached."""
    if size < 16384:
        head = _payload_heads[size]
        if head is None:
            head = _payload_heads[size] = _length_prefix(_PAYLOAD_KEY, size)
        return head
    return _length_prefix(_PAYLOAD_KEY, size)


# Encoded map-entry keys (a handful of names: the CONNECTED keys, "reason"), and whole events of one
# entry (a DISCONNECTED: one per kind and reason); both bounded, in case a caller makes up names.
_entry_keys = {}
_single_entry_events = {}
_CACHE_LIMIT = 256


def event_fields(event):
    """The encoded fields 4 (`kind`) and 5 (`metadata`) of a lifecycle input; kept on the event.

    Map entries are written in key order, key then value, as protobuf's
    deterministic serializer does; a parser accepts any order. Strings are
    UTF-8 (the metadata builder made them valid).
    """
    metadata = event.metadata
    single = None
    if len(metadata) == 1:
        single = (event.kind, *metadata.items())
        wire = _single_entry_events.get(single)
        if wire is not None:
            event.wire = wire
            return wire
    parts = [_KIND_KEY, _SMALL_VARINTS[event.kind] if event.kind < 128 else _varint(event.kind)]
    for name in sorted(metadata):
        key_field = _entry_keys.get(name)
        if key_field is None:
            key = name.encode()
            key_field = _length_prefix(_ENTRY_KEY, len(key)) + key
            if len(_entry_keys) < _CACHE_LIMIT:
                _entry_keys[name] = key_field
        value = metadata[name].encode()
        length = len(value)
        size = len(key_field) + length + 2
        if size < 128:  # the usual entry: every length is one byte
            parts.append(_METADATA_KEY + _SMALL_VARINTS[size] + key_field + _ENTRY_VALUE + _SMALL_VARINTS[length]
                         + value)
            continue
        value_field = _length_prefix(_ENTRY_VALUE, length) + value
        parts.append(_length_prefix(_METADATA_KEY, len(key_field) + len(value_field)))
        parts.append(key_field)
        parts.append(value_field)
    wire = event.wire = b"".join(parts)
    if single is not None and len(_single_entry_events) < _CACHE_LIMIT:
        _single_entry_events[single] = wire
    return wire


def encode_batch(batch):
    """A flat batch [uuid, payload, time, ...] -> (wire bytes, end offset of each message).

    Each message is an `InputStreamRequest{time=1, client_uuid=2, payload=3}`
    encoded by hand (Protocol Buffers wire format: for each field a key byte,
    a varint length, the bytes; fields in number order, as protobuf's own
    serializer writes them) and framed for gRPC. By hand because it is the
    per-message path, and because refilling one upb message object instead
    keeps every old field value in the message's arena until it dies.
    A lifecycle `Event` in the payload slot becomes `{time, client_uuid,
    kind=4, metadata=5}` (no payload field); only an empty payload is looked
    at for that, so a message with bytes costs nothing more.
    """
    parts = []
    ends = []
    pos = 0
    append = parts.append
    heads = _payload_heads
    stamp = None
    time_field = b""
    for i in range(0, len(batch), 3):
        payload = batch[i + 1]
        when = batch[i + 2]
        if when is not stamp:  # one stamp per reactor pass: encode it once
            stamp = when
            raw = when.encode()
            time_field = _length_prefix(_TIME_KEY, len(raw)) + raw if raw else b""
        uuid = batch[i].encode()
        size = len(payload)
        if size:
            head = heads[size] if size < 16384 else None
            if head is None:
                head = _payload_head(size)
        elif payload.__class__ is Event:  # fields 4 and 5 instead of a payload
            head = payload.wire or event_fields(payload)
        else:
            head = b""
        body = len(time_field) + len(uuid) + 2 + len(head) + size if len(uuid) < 128 else None
        if body is None:  # not one of pplex's UUIDs: the general form
            uuid_field = _length_prefix(_UUID_KEY, len(uuid)) + uuid
            body = len(time_field) + len(uuid_field) + len(head) + size
        else:
            uuid_field = _UUID_KEY + _SMALL_VARINTS[len(uuid)] + uuid
        append(_pack_header(0, body))
        append(time_field)
        append(uuid_field)
        if size:
            append(head)
            append(payload)
        elif head:
            append(head)
        pos += 5 + body
        ends.append(pos)
    return b"".join(parts), ends


class MessageReader:
    """Splits a stream's DATA into gRPC messages: one may span frames, one frame may hold many."""

    __slots__ = ("parts", "size", "need", "limit")

    def __init__(self, limit=MAX_MESSAGE_BYTES):
        self.parts = []    # received bytes not yet a whole message
        self.size = 0
        self.need = 0      # bytes the message being assembled needs in all (0: unknown yet)
        self.limit = limit

    def feed(self, data):
        """Add DATA bytes; return the whole messages they complete (bytes), in order."""
        if self.parts:
            self.size += len(data)
            self.parts.append(data)
            if self.size < self.need:
                return []      # a large message still arriving: no copy until it is whole
            data = b"".join(self.parts)
            self.parts = []
            self.size = 0
        messages = []
        pos = 0
        end_of_data = len(data)
        while end_of_data - pos >= 5:
            flag, length = _unpack_header(data, pos)
            if flag:
                raise FramingError(f"compressed message (flag {flag}) but no compression was agreed")
            if length > self.limit:
                raise FramingError(f"message of {length} bytes is larger than the limit ({self.limit})")
            end = pos + 5 + length
            if end > end_of_data:
                self.need = 5 + length
                break
            messages.append(data[pos + 5:end])
            pos = end
        else:
            self.need = 0
        if pos < end_of_data:
            rest = data[pos:] if pos else data
            self.parts.append(rest)
            self.size = len(rest)
            if len(rest) < 5:
                self.need = 5
        return messages

    def feed_frames(self, payloads):
        """`feed` for several DATA payloads; a payload that is exactly one message costs one slice."""
        messages = []
        append = messages.append
        for payload in payloads:
            if not self.parts and len(payload) >= 5:
                flag, length = _unpack_header(payload, 0)
                if not flag and length == len(payload) - 5 and length <= self.limit:
                    append(payload[5:])
                    continue
            messages += self.feed(payload)
        return messages

    def pending(self):
        """Bytes received that are not yet a whole message."""
        return self.size


DATA_TYPE = 0x0
GOAWAY_TYPE = 0x7
WINDOW_UPDATE_TYPE = 0x8


class FrameScanner:
    """Walks the HTTP/2 frames in the received bytes, in order, and sorts them three ways.

    - GOAWAY frames are taken out and returned, for the caller to act on after the rest;
    - plain DATA frames (no flags: no END_STREAM, no padding) of one stream, `fast`, go to
      `on_fast(payloads)`, a run of consecutive ones at a time: the data stream's bytes skip h2's
      per-frame objects and events;
    - every other byte goes to `on_h2(bytes)`, in runs, in order with the DATA payloads.

    A frame header, a GOAWAY frame or a fast DATA frame not yet whole is held
    back until it is; any other frame is passed on as soon as its header was
    seen. A callback that returns True stops the walk: the connection is gone.
    `fast` is read once per `feed`: a change made by a callback applies from
    the next read (until then its frames go where they were sorted, in order).
    """

    __slots__ = ("skip", "held", "fast")

    def __init__(self):
        self.skip = 0      # bytes of a frame already passed to h2 that are still to come
        self.held = b""    # the start of a frame header, a GOAWAY frame or a fast DATA frame
        self.fast = 0      # the stream whose plain DATA frames bypass h2 (0: none)

    def feed(self, data, on_h2, on_fast):
        """Hand `data` on in order; return the GOAWAYs it held: [(last_stream_id, error_code, debug)]."""
        if self.held:
            data = self.held + data
            self.held = b""
        n = len(data)
        pos = self.skip
        if pos >= n:
            self.skip = pos - n
            on_h2(data)
            return ()
        self.skip = 0
        goaways = ()
        segments = []      # in order: bytes for h2, or a list of fast DATA payloads
        start = 0          # the first byte not yet in a segment
        fast = self.fast
        while n - pos >= 9:
            end = pos + 9 + ((data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2])
            kind = data[pos + 3]
            if kind == DATA_TYPE and fast and not data[pos + 4] and fast == (
                    ((data[pos + 5] & 0x7F) << 24) | (data[pos + 6] << 16) | (data[pos + 7] << 8) | data[pos + 8]):
                if end > n:
                    break
                if start < pos:
                    segments.append(data[start:pos])
                if segments and segments[-1].__class__ is list:
                    segments[-1].append(data[pos + 9:end])
                else:
                    segments.append([data[pos + 9:end]])
                start = end
            elif kind == GOAWAY_TYPE:
                if end > n:
                    break
                last_id, code = struct.unpack_from(">II", data, pos + 9)
                if not goaways:
                    goaways = []
                goaways.append((last_id & 0x7FFFFFFF, code, bytes(data[pos + 17:end])))
                if start < pos:
                    segments.append(data[start:pos])
                start = end
            elif end > n:
                self.skip = end - n
                pos = n
                break
            pos = end
        if pos < n:
            self.held = data[pos:]
        if start < pos:
            segments.append(data[start:pos] if start or pos < n else data)
        for segment in segments:
            if on_fast(segment) if segment.__class__ is list else on_h2(segment):
                break
        return goaways


def window_update(stream_id, increment):
    """A WINDOW_UPDATE frame: give the peer `increment` more bytes to send on the stream (0: connection)."""
    return struct.pack(">HBBBII", 0, 4, WINDOW_UPDATE_TYPE, 0, stream_id, increment)


def grpc_timeout(seconds):
    """The `grpc-timeout` header value: at most 8 digits and a unit."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 100_000_000:
        return f"{ms}m".encode()
    return f"{min(99_999_999, math.ceil(seconds))}S".encode()


def call_outcome(http_status, grpc_status, grpc_message):
    """None for a call that ended with status OK, else 'CODE: details' as grpcio words it."""
    if http_status is None:
        return "INTERNAL: the stream ended without response headers"
    if http_status != 200 and grpc_status is None:
        return f"{HTTP_TO_GRPC.get(http_status, 'UNKNOWN')}: worker answered HTTP {http_status}"
    if grpc_status is None:
        return "INTERNAL: the stream ended without a grpc-status"
    if grpc_status == 0:
        return None
    name = GRPC_CODES[grpc_status] if 0 <= grpc_status < len(GRPC_CODES) else f"code {grpc_status}"
    return f"{name}: {grpc_message}"


def describe_reset(error_code):
    name = getattr(error_code, "name", str(error_code))
    return f"{RESET_TO_GRPC.get(error_code, 'INTERNAL')}: worker reset the stream ({name})"
