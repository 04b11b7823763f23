"""framing_len and framing_line end to end: real pplex, real sockets, a real gRPC worker."""
import socket
import struct
import time

from tests.helpers import RecordingWorker, wait_for


def upstream_args(*workers):
    return [a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")]


def frame(body):
    return struct.pack(">I", len(body)) + body


def recv_frame(client):
    (length,) = struct.unpack(">I", client.recv_exact(4))
    return client.recv_exact(length)


def bytes_in(pplex):
    connections = pplex.admin("GET", "/connections")[1]["connections"]
    return connections[0]["bytes_in"] if connections else None


def test_frame_split_over_three_reads_is_one_message_and_the_reply_is_prefixed(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--plugins", "framing_len", *upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = b"one message, three reads"
    data = frame(body)
    parts = [data[:2], data[2:10], data[10:]]  # the first cut is inside the length prefix
    sent = 0
    for part in parts:
        client.send(part)
        sent += len(part)
        # pplex has read exactly this much: each part is a read of its own.
        wait_for(lambda: bytes_in(pplex) == sent, message=f"pplex to read {sent} bytes")
        if sent < len(data):
            assert worker.count() == 0
    assert recv_frame(client) == body
    assert [payload for _, payload in worker.received] == [body]


def test_a_thousand_frames_in_one_read_arrive_in_order(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--plugins", "framing_len", *upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    bodies = [b"frame %04d" % i for i in range(1000)]
    client.send(b"".join(frame(b) for b in bodies))  # 14 KB in one write
    assert [recv_frame(client) for _ in range(1000)] == bodies
    assert [payload for _, payload in worker.received] == bodies
    assert len({client_uuid for client_uuid, _ in worker.received}) == 1


def test_a_length_prefix_of_2_pow_31_closes_that_client_only(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--plugins", "framing_len", *upstream_args(worker))
    pplex.wait_ready_upstreams(1)
    good, bad = pplex.client(), pplex.client()
    good.send(frame(b"before"))
    assert recv_frame(good) == b"before"
    started = time.monotonic()
    bad.send(struct.pack(">I", 2 ** 31))  # the prefix alone: pplex must not wait for a body
    assert bad.is_closed_by_peer(timeout=5)
    assert time.monotonic() - started < 2
    wait_for(lambda: "frame of 2147483648 bytes declared, more than max_frame_bytes (1048576)" in pplex.log(),
             message="the reason in the log")
    good.send(frame(b"after"))
    assert recv_frame(good) == b"after"
    assert [payload for _, payload in worker.received] == [b"before", b"after"]


def test_width_and_limit_settings_from_the_config(start_pplex, start_worker):
    worker = start_worker()
    config = {"plugins": {"framing_len": {"width": 2, "max_frame_bytes": 16}}}
    pplex = start_pplex(*upstream_args(worker), config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"\x00\x05hello\x00\x10" + b"x" * 16)
    assert client.recv_exact(2 + 5 + 2 + 16) == b"\x00\x05hello\x00\x10" + b"x" * 16
    client.send(b"\x00\x11")
    assert client.is_closed_by_peer(timeout=5)
    assert worker.count() == 2


def test_lines_many_per_read_and_split_and_custom_delimiter(start_pplex, start_worker):
    worker = start_worker()
    config = {"plugins": {"framing_line": {"delimiter": "\r\n"}}}
    pplex = start_pplex(*upstream_args(worker), config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"one\r\ntwo\nstill two\r\nthr")
    wait_for(lambda: worker.count() == 2, message="two lines at the worker")
    client.send(b"ee\r\n")
    assert client.recv_exact(len(b"one\r\ntwo\nstill two\r\nthree\r\n")) == b"one\r\ntwo\nstill two\r\nthree\r\n"
    assert [payload for _, payload in worker.received] == [b"one", b"two\nstill two", b"three"]


def test_a_line_longer_than_the_limit_closes_that_client_only(start_pplex, start_worker):
    worker = start_worker()
    config = {"plugins": {"framing_line": {"max_frame_bytes": 1000}}}
    pplex = start_pplex(*upstream_args(worker), config=config)
    pplex.wait_ready_upstreams(1)
    good, bad = pplex.client(), pplex.client()
    good.send(b"x" * 1000 + b"\n")  # exactly the limit: fine
    assert good.recv_line() == b"x" * 1000
    bad.send(b"y" * 1001)  # no delimiter, and already too long
    assert bad.is_closed_by_peer(timeout=5)
    wait_for(lambda: "longer than max_frame_bytes (1000)" in pplex.log(), message="the reason in the log")
    good.send(b"still here\n")
    assert good.recv_line() == b"still here"
    assert [payload for _, payload in worker.received] == [b"x" * 1000, b"still here"]



class BigReplyWorker(RecordingWorker):
    """Answers `big` with 300 bytes; echoes anything else."""

    def on_message(self, stream, client_uuid, payload):
        with self.lock:
            self.received.append((client_uuid, payload))
        stream.reply(client_uuid, b"y" * 300 if payload == b"big" else payload)


def test_a_reply_too_long_for_the_prefix_is_dropped_and_logged(start_pplex, start_worker):
    worker = start_worker(BigReplyWorker())
    pplex = start_pplex(*upstream_args(worker), config={"plugins": {"framing_len": {"width": 1}}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"\xff" + b"x" * 255)  # the largest frame a 1-byte prefix can carry
    assert client.recv_exact(256) == b"\xff" + b"x" * 255
    client.send(b"\x03big")
    wait_for(lambda: "a reply of 300 bytes does not fit a 1-byte length prefix" in pplex.log(),
             message="the dropped reply in the log")
    client.send(b"\x02hi")  # the client is still served, and got nothing in between
    assert client.recv_exact(3) == b"\x02hi"
    assert worker.count() == 3
