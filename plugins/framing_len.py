"""Length-prefixed framing: every message is a big-endian length, then that many bytes.

Inbound, the prefix is stripped and the body is the message; outbound, each
reply gets the prefix of its length. Frames may be split over any number of
reads, and one read may hold many frames; both work. A zero-length frame is
an empty message.

Settings (`"plugins": {"framing_len": {...}}`):
- `width` (default 4): bytes in the length prefix: 1, 2, 4 or 8.
- `max_frame_bytes` (default 1048576, 1 MiB): the largest body a client may
  declare. A larger declared length closes that client, with the length in
  the logged reason, as soon as the prefix is read (pplex does not wait for,
  nor buffer, the body).

A reply longer than the prefix can express (255 bytes with `width` 1, 65535
with 2) cannot be framed: it is dropped and logged as an error.

Partial input stays in `conn.framing_state` (a bytearray, or None when a
connection holds no partial frame, the usual case for idle clients).
"""
import struct

import voluptuous as vol

from pplex import FrameError, hookimpl, limits
from pplex.errors import shown

MiB = 1024 * 1024
FORMATS = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}


def Width(value):
    """1, 2, 4 or 8 (bytes of the length prefix)"""
    if isinstance(value, bool) or not isinstance(value, int) or value not in FORMATS:  # a list is unhashable
        raise vol.Invalid(f"must be 1, 2, 4 or 8 (bytes of length prefix) (got {shown(value)})")
    return value


def FrameBytes(value):
    """a positive integer (bytes), at most the largest upstream max_message_bytes"""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise vol.Invalid(f"expected a positive integer number of bytes (got {shown(value)})")
    if value > limits.MAX_MESSAGE_BYTES.high:
        raise vol.Invalid(f"must be at most {limits.MAX_MESSAGE_BYTES.high}, the largest gRPC message pplex "
                          f"sends (upstream max_message_bytes) (got {value})")
    return value


class LengthFraming:
    merges = False

    def __init__(self, width=4, max_frame_bytes=MiB):
        prefix = struct.Struct(FORMATS[width])
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        self.largest_reply = (1 << (8 * width)) - 1
        self._unpack_from = prefix.unpack_from
        self._pack = prefix.pack

    def decode(self, conn, data):
        buf = conn.framing_state
        if buf is not None:
            buf += data
            data = buf
        size = len(data)
        width = self.width
        limit = self.max_frame_bytes
        unpack_from = self._unpack_from
        messages = []
        offset = 0
        # Bytes slice straight into bytes; a buffered bytearray goes through
        # a memoryview so each message is copied once, and the buffer never is.
        view = memoryview(data) if buf is not None else data
        try:
            while size - offset >= width:
                length = unpack_from(data, offset)[0]
                if length > limit:
                    raise FrameError(
                        f"frame of {length} bytes declared, more than max_frame_bytes ({limit})")
                start = offset + width
                end = start + length
                if end > size:
                    break
                messages.append(bytes(view[start:end]) if buf is not None else data[start:end])
                offset = end
        finally:
            if buf is not None:
                view.release()
        if buf is not None:
            if offset == size:
                conn.framing_state = None
            elif offset:
                del buf[:offset]
        elif offset < size:
            conn.framing_state = bytearray(memoryview(data)[offset:])
        return messages

    def encode(self, payload):
        try:
            return self._pack(len(payload)) + payload
        except struct.error:
            raise ValueError(f"framing_len: a reply of {len(payload)} bytes does not fit a {self.width}-byte "
                             f"length prefix (at most {self.largest_reply}); dropped") from None


_framing = [LengthFraming()]


@hookimpl
def pplex_settings_schema():
    return {
        vol.Optional("width", default=4): Width,
        vol.Optional("max_frame_bytes", default=MiB): FrameBytes,
    }


@hookimpl
def pplex_configure(settings):
    _framing[0] = LengthFraming(settings["width"], settings["max_frame_bytes"])


@hookimpl
def pplex_framing():
    return _framing[0]
