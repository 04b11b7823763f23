"""Delimited framing: every message ends with a delimiter, a newline by default.

Inbound, the delimiter is stripped and what precedes it is the message (an
empty line is an empty message; nothing else is stripped, so with the default
"\\n" a client's "\\r" stays in the message); outbound, each reply gets the
delimiter appended. Lines may be split over any number of reads, and one read
may hold many lines; both work.

Settings (`"plugins": {"framing_line": {...}}`):
- `delimiter` (default "\\n"): any non-empty string, matched as its UTF-8
  bytes, e.g. "\\r\\n" or "\\u0000".
- `max_frame_bytes` (default 1048576, 1 MiB): the longest line, delimiter not
  counted. A longer line closes that client with the reason logged, as soon
  as more than that many bytes have come without a delimiter.

Partial input stays in `conn.framing_state` (a bytearray, or None when a
connection holds no partial line, the usual case for idle clients).
"""
import voluptuous as vol

from pplex import FrameError, hookimpl, limits
from pplex.errors import shown

MiB = 1024 * 1024


def Delimiter(value):
    """a non-empty string"""
    if not isinstance(value, str) or not value:
        raise vol.Invalid(f"expected a non-empty string (got {shown(value)})")
    return value


def FrameBytes(value):
    """a positive integer (bytes), at most the largest upstream max_message_bytes"""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise vol.Invalid(f"expected a positive integer number of bytes (got {shown(value)})")
    if value > limits.MAX_MESSAGE_BYTES.high:
        raise vol.Invalid(f"must be at most {limits.MAX_MESSAGE_BYTES.high}, the largest gRPC message pplex "
                          f"sends (upstream max_message_bytes) (got {value})")
    return value


class LineFraming:
    merges = False

    def __init__(self, delimiter="\n", max_frame_bytes=MiB):
        self.delimiter = delimiter.encode("utf-8")
        self.max_frame_bytes = max_frame_bytes

    def decode(self, conn, data):
        delimiter = self.delimiter
        dlen = len(delimiter)
        buf = conn.framing_state
        scan = 0
        if buf is not None:
            # What is buffered holds no whole delimiter: search only where a
            # new one can be, so a long line arriving slowly is scanned once.
            scan = max(0, len(buf) - dlen + 1)
            buf += data
            data = buf
        limit = self.max_frame_bytes
        find = data.find
        messages = []
        offset = 0
        view = memoryview(data) if buf is not None else data
        try:
            end = find(delimiter, scan)
            while end >= 0:
                if end - offset > limit:
                    raise FrameError(f"line of {end - offset} bytes, more than max_frame_bytes ({limit})")
                messages.append(bytes(view[offset:end]) if buf is not None else data[offset:end])
                offset = end + dlen
                end = find(delimiter, offset)
        finally:
            if buf is not None:
                view.release()
        size = len(data)
        rest = size - offset
        if rest > limit:
            # Past the limit only the start of a delimiter may still come.
            if rest - limit >= dlen or not delimiter.startswith(bytes(data[offset + limit:])):
                raise FrameError(f"line longer than max_frame_bytes ({limit}) with no delimiter")
        if buf is not None:
            if offset == size:
                conn.framing_state = None
            elif offset:
                del buf[:offset]
        elif rest:
            conn.framing_state = bytearray(memoryview(data)[offset:])
        return messages

    def encode(self, payload):
        return payload + self.delimiter


_framing = [LineFraming()]


@hookimpl
def pplex_settings_schema():
    return {
        vol.Optional("delimiter", default="\n"): Delimiter,
        vol.Optional("max_frame_bytes", default=MiB): FrameBytes,
    }


@hookimpl
def pplex_configure(settings):
    _framing[0] = LineFraming(settings["delimiter"], settings["max_frame_bytes"])


@hookimpl
def pplex_framing():
    return _framing[0]
