"""framing_len and framing_line: cutting byte streams into messages, and encoding replies."""
import struct
import time

import pytest

from pplex import FrameError
from pplex.config import validate
from pplex.errors import ConfigError
from pplex.manager import Context, PluginSet


class Conn:
    def __init__(self):
        self.framing_state = None


def framing(name, **settings):
    """The framing object of plugin `name`, configured through the real plugin manager."""
    plugins = PluginSet(enabled=[name], settings={name: settings})
    plugins.configure(Context(reactor=None, config=validate({}), proxy=None))
    return plugins.framing()


def feed(framer, conn, chunks):
    messages = []
    for chunk in chunks:
        messages.extend(framer.decode(conn, chunk))
    return messages


def frame(body, width=4):
    return struct.pack({1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width], len(body)) + body


# -- framing_len -----------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_len_round_trip_every_width(width):
    framer = framing("framing_len", width=width)
    assert framer.merges is False
    assert framer.encode(b"hello") == frame(b"hello", width)
    conn = Conn()
    assert framer.decode(conn, frame(b"hello", width) + frame(b"", width)) == [b"hello", b""]
    assert conn.framing_state is None


def test_len_frames_split_at_every_byte_arrive_whole_and_in_order():
    framer = framing("framing_len")
    bodies = [b"a", b"", b"bc" * 100, b"last one"]
    stream = b"".join(frame(b) for b in bodies)
    conn = Conn()
    got = feed(framer, conn, [stream[i:i + 1] for i in range(len(stream))])
    assert got == bodies
    assert all(type(m) is bytes for m in got)
    assert conn.framing_state is None  # nothing kept once every frame is whole


def test_len_partial_frame_is_kept_then_completed_with_the_next_frames():
    framer = framing("framing_len", width=2)
    conn = Conn()
    stream = frame(b"first", 2) + frame(b"second", 2) + frame(b"third", 2)
    assert framer.decode(conn, stream[:9]) == [b"first"]
    assert bytes(conn.framing_state) == stream[7:9]
    assert framer.decode(conn, stream[9:]) == [b"second", b"third"]
    assert conn.framing_state is None


def test_len_declared_length_over_the_limit_fails_on_the_prefix_alone():
    framer = framing("framing_len", max_frame_bytes=100)
    conn = Conn()
    assert framer.decode(conn, frame(b"x" * 100)) == [b"x" * 100]  # the limit itself is fine
    with pytest.raises(FrameError, match=r"frame of 2147483648 bytes declared, more than max_frame_bytes \(100\)"):
        framer.decode(conn, struct.pack(">I", 2 ** 31))
    conn = Conn()
    framer.decode(conn, b"\x00\x00")  # half a prefix: no verdict yet
    with pytest.raises(FrameError, match="101 bytes"):
        framer.decode(conn, b"\x00\x65")


def test_len_many_frames_in_one_read_is_linear():
    framer = framing("framing_len")
    count = 200_000
    stream = b"".join(frame(b"%06d" % i) for i in range(count))  # 2 MB, one call
    started = time.perf_counter()
    messages = framer.decode(Conn(), stream)
    took = time.perf_counter() - started
    assert len(messages) == count and messages[0] == b"000000" and messages[-1] == b"%06d" % (count - 1)
    # Linear work is ~0.1 s here; re-copying the rest after each frame would take minutes.
    assert took < 5, took
    conn = Conn()
    conn.framing_state = bytearray(b"\x00")  # the same through the buffered path
    messages = framer.decode(conn, stream[1:] + b"\x00\x00")
    assert len(messages) == count and bytes(conn.framing_state) == b"\x00\x00"


def test_len_reply_too_long_for_the_prefix_is_refused_with_a_clear_error():
    framer = framing("framing_len", width=1)
    assert framer.encode(b"x" * 255)[:1] == b"\xff"
    with pytest.raises(ValueError, match="256 bytes does not fit a 1-byte length prefix"):
        framer.encode(b"x" * 256)


@pytest.mark.parametrize("settings, message", [
    ({"width": 3}, "plugins.framing_len.width: must be 1, 2, 4 or 8 (bytes of length prefix) (got 3)"),
    ({"width": True}, "plugins.framing_len.width: must be 1, 2, 4 or 8"),
    ({"max_frame_bytes": 0}, "plugins.framing_len.max_frame_bytes: expected a positive integer"),
    ({"colour": 1}, "plugins.framing_len.colour: unknown key"),
])
def test_len_bad_settings_name_their_path(settings, message):
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["framing_len"], settings={"framing_len": settings})
    assert str(error.value).startswith(message)


# -- framing_line ----------------------------------------------------------------
def test_line_strips_inbound_and_appends_outbound():
    framer = framing("framing_line")
    assert framer.merges is False
    conn = Conn()
    assert framer.decode(conn, b"one\ntwo\r\n\nthree") == [b"one", b"two\r", b""]
    assert framer.decode(conn, b" and more\n") == [b"three and more"]
    assert conn.framing_state is None
    assert framer.encode(b"reply") == b"reply\n"


def test_line_multibyte_delimiter_split_across_reads():
    framer = framing("framing_line", delimiter="\r\n")
    conn = Conn()
    stream = b"alpha\r\nbeta\nstill beta\r\ngamma\r\n"
    assert feed(framer, conn, [stream[i:i + 1] for i in range(len(stream))]) == [
        b"alpha", b"beta\nstill beta", b"gamma"]
    assert conn.framing_state is None
    assert framer.encode(b"x") == b"x\r\n"
    unicode = framing("framing_line", delimiter="§")
    assert feed(unicode, Conn(), [b"a\xc2", b"\xa7b\xc2\xa7"]) == [b"a", b"b"]


def test_line_longer_than_the_limit_fails_without_waiting_for_its_end():
    framer = framing("framing_line", max_frame_bytes=10)
    conn = Conn()
    assert framer.decode(conn, b"0123456789\n") == [b"0123456789"]  # the limit itself is fine
    assert framer.decode(conn, b"0123456789") == []
    with pytest.raises(FrameError, match=r"longer than max_frame_bytes \(10\)"):
        framer.decode(conn, b"x")
    with pytest.raises(FrameError, match=r"line of 11 bytes, more than max_frame_bytes \(10\)"):
        framer.decode(Conn(), b"0123456789x\n")


def test_line_at_the_limit_may_wait_for_the_rest_of_its_delimiter():
    framer = framing("framing_line", delimiter="\r\n", max_frame_bytes=4)
    conn = Conn()
    assert framer.decode(conn, b"abcd\r") == []
    assert framer.decode(conn, b"\n") == [b"abcd"]
    with pytest.raises(FrameError):
        framer.decode(Conn(), b"abcdx")


def test_line_a_long_line_in_many_reads_is_scanned_linearly():
    framer = framing("framing_line", max_frame_bytes=8 * 1024 * 1024)
    conn = Conn()
    chunk = b"x" * 1024
    started = time.perf_counter()
    for _ in range(4096):  # a 4 MiB line in 1 KiB reads
        assert framer.decode(conn, chunk) == []
    messages = framer.decode(conn, b"\n")
    assert time.perf_counter() - started < 5
    assert len(messages) == 1 and len(messages[0]) == 4 * 1024 * 1024


def test_line_many_lines_in_one_read():
    framer = framing("framing_line")
    count = 200_000
    stream = b"".join(b"%06d\n" % i for i in range(count))
    started = time.perf_counter()
    messages = framer.decode(Conn(), stream)
    assert time.perf_counter() - started < 5
    assert messages == [b"%06d" % i for i in range(count)]


@pytest.mark.parametrize("settings, message", [
    ({"delimiter": ""}, "plugins.framing_line.delimiter: expected a non-empty string"),
    ({"delimiter": 10}, "plugins.framing_line.delimiter: expected a non-empty string (got 10)"),
    ({"max_frame_bytes": "big"}, "plugins.framing_line.max_frame_bytes: expected a positive integer"),
])
def test_line_bad_settings_name_their_path(settings, message):
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["framing_line"], settings={"framing_line": settings})
    assert str(error.value).startswith(message)
