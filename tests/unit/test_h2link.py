"""The h2 transport's gRPC framing and parsing, and its link against a scripted HTTP/2 worker.

The scripted worker is an `h2` server connection on a real loopback socket, in
a thread: each test decides which frames it sends (a message split across
DATA frames, many messages in one frame, trailers with an error status, a
tiny flow-control window). The link runs in a real Reactor on the test thread.
"""
import os
import random
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.settings import SettingCodes

from pplex._proto import upstream_pb2
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame

from pplex.grpcwire import (FrameScanner, FramingError, MessageReader, call_outcome, encode_batch, frame_message,
                            grpc_timeout)
from pplex import h2link
from pplex.h2link import DATA_PATH, LIVE_PATH, READY_PATH, H2Link
from pplex.reactor import Reactor
from pplex.transport import Event, LinkEvents
from tests.helpers import free_port, run_until

Out = upstream_pb2.OutputStreamRequest


# -- framing and parsing -------------------------------------------------------
def test_many_messages_in_one_chunk_come_out_in_order():
    bodies = [b"", b"a", b"bb" * 100, bytes(range(256))] * 10
    reader = MessageReader()
    assert reader.feed(b"".join(frame_message(b) for b in bodies)) == bodies
    assert reader.pending() == 0


def test_a_message_split_anywhere_including_inside_its_header_is_whole_once():
    bodies = [b"first", b"x" * 70000, b"", b"last one"]
    wire = b"".join(frame_message(b) for b in bodies)
    for cut_every in (1, 2, 3, 4, 5, 6, 7, 1000, 16384):
        reader = MessageReader()
        got = []
        for start in range(0, len(wire), cut_every):
            got += reader.feed(wire[start:start + cut_every])
        assert got == bodies, cut_every
        assert reader.pending() == 0


def test_random_cuts_of_many_messages():
    rng = random.Random(7)
    bodies = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(300)]
    wire = b"".join(frame_message(b) for b in bodies)
    reader = MessageReader()
    got = []
    pos = 0
    while pos < len(wire):
        step = rng.randrange(1, 9000)
        got += reader.feed(wire[pos:pos + step])
        pos += step
    assert got == bodies


def test_a_partial_message_is_reported_pending():
    reader = MessageReader()
    assert reader.feed(frame_message(b"0123456789")[:8]) == []
    assert reader.pending() == 8


def test_compressed_flag_and_oversized_length_are_framing_errors():
    with pytest.raises(FramingError, match="compressed"):
        MessageReader().feed(b"\x01\0\0\0\x01x")
    with pytest.raises(FramingError, match="larger than the limit"):
        MessageReader(limit=100).feed(b"\0\0\0\0\x65")


def test_encode_batch_is_the_library_encoding_framed_with_message_ends():
    batch = ["u1", b"hello", "2026-01-01T00:00:00.000001Z",
             "u2", bytearray(b"merged bytes"), "2026-01-01T00:00:00.000002Z",
             "u3", b"", "t",
             "0f0e0d0c-0b0a-4908-8706-050403020100", b"x" * 200, "",
             "u" * 300, b"y" * 70_000, "2026-01-01T00:00:00.000002Z"]
    wire, ends = encode_batch(batch)
    expected = [upstream_pb2.InputStreamRequest(client_uuid=batch[i], payload=bytes(batch[i + 1]),
                                                time=batch[i + 2]).SerializeToString()
                for i in range(0, len(batch), 3)]
    assert MessageReader().feed(wire) == expected
    assert ends[-1] == len(wire) and len(ends) == 5
    assert wire[:ends[0]] == frame_message(expected[0])
    assert b"".join(frame_message(body) for body in expected) == wire


def test_encode_batch_writes_lifecycle_events_as_the_library_does():
    """Kind (4) and metadata (5, a map: entries {key 1, value 2}) by hand, byte for byte what protobuf's
    deterministic serializer writes; messages around them are unchanged."""
    connected = Event(Event.CONNECTED, {"remote_addr": "::1", "remote_port": "5", "node": "n-1",
                                        "empty": "", "proxy_authority": "\u00e9" * 100})
    gone = Event(Event.DISCONNECTED, {"reason": "shutdown"})
    batch = ["u1", connected, "t1", "u1", b"hello", "t1", "u2", connected, "t2", "u1", gone, "t2",
             "u3", b"", "t2"]
    wire, ends = encode_batch(batch)
    make = upstream_pb2.InputStreamRequest
    expected = [make(client_uuid="u1", time="t1", kind=1, metadata=connected.metadata),
                make(client_uuid="u1", time="t1", payload=b"hello"),
                make(client_uuid="u2", time="t2", kind=1, metadata=connected.metadata),
                make(client_uuid="u1", time="t2", kind=2, metadata={"reason": "shutdown"}),
                make(client_uuid="u3", time="t2")]
    assert MessageReader().feed(wire) == [m.SerializeToString(deterministic=True) for m in expected]
    assert [make.FromString(raw) for raw in MessageReader().feed(wire)] == expected
    assert len(ends) == 5 and ends[-1] == len(wire)
    assert connected.wire is not None  # encoded once, however many batches carry it


def test_encode_batch_keeps_no_memory_per_message():
    """Refilling one upb message object kept every old field value in its arena (~100 B each)."""
    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    batch = ["0f0e0d0c-0b0a-4908-8706-050403020100", b"x" * 200, "2026-01-01T00:00:00.000001Z"] * 100
    for _ in range(200):
        encode_batch(batch)
    before = rss()
    for _ in range(2000):  # 200,000 messages: the old way grew by about 60 MB here
        encode_batch(batch)
    assert rss() - before < 8 * 1024 * 1024


def test_status_outcomes_read_like_grpcio_errors():
    assert call_outcome(200, 0, "") is None
    assert call_outcome(200, 14, "going away") == "UNAVAILABLE: going away"
    assert call_outcome(200, 2, "EOF") == "UNKNOWN: EOF"
    assert call_outcome(404, None, "") == "UNIMPLEMENTED: worker answered HTTP 404"
    assert call_outcome(200, None, "").startswith("INTERNAL: the stream ended without a grpc-status")
    assert call_outcome(None, None, "").startswith("INTERNAL")


def _merged(items):
    """Consecutive h2 chunks joined: how a reader cuts the bytes must not matter."""
    out = []
    for kind, data in items:
        if out and kind == "h2" and out[-1][0] == "h2":
            out[-1] = ("h2", out[-1][1] + data)
        elif kind != "h2" or data:
            out.append((kind, bytes(data)))
    return out


def test_frames_are_sorted_in_order_wherever_reads_cut_them():
    """GOAWAYs out, plain DATA of the fast stream to on_fast, all else to h2, in the order they came."""
    rng = random.Random(3)
    frames, expected_goaways, expected, not_goaway = [], [], [], []
    for i in range(400):
        if i % 37 == 5:
            frame = GoAwayFrame(0, last_stream_id=i, error_code=i % 3, additional_data=b"bye %d" % i)
            expected_goaways.append((i, i % 3, b"bye %d" % i))
        elif i % 11 == 0:
            frame = PingFrame(0, opaque_data=b"%08d" % i)
        elif i % 7 == 0:
            frame = DataFrame(3, data=rng.randbytes(rng.randrange(0, 2000)))   # another stream: h2's
        elif i % 13 == 0:
            frame = DataFrame(1, data=rng.randbytes(100), flags=["END_STREAM"])  # flags: h2's
        elif i % 17 == 0:
            frame = DataFrame(1, data=rng.randbytes(100), flags=["PADDED"], pad_length=7)
        else:
            frame = DataFrame(1, data=rng.randbytes(rng.randrange(0, 40000)))
        wire = frame.serialize()
        frames.append(wire)
        if not isinstance(frame, GoAwayFrame):
            not_goaway.append(wire)
        if isinstance(frame, DataFrame) and frame.stream_id == 1 and not frame.flags:
            expected.append(("fast", frame.data))
        elif not isinstance(frame, GoAwayFrame):
            expected.append(("h2", wire))
    stream = b"".join(frames)
    for trial in range(20):
        scanner = FrameScanner()
        scanner.fast = 1
        got, goaways, pos = [], [], 0
        while pos < len(stream):
            step = rng.choice((1, 2, 8, 9, 10, 17, 100, 5000, 70000))
            goaways += scanner.feed(stream[pos:pos + step], lambda b: got.append(("h2", b)),
                                    lambda run: got.extend(("fast", b) for b in run))
            pos += step
        assert _merged(got) == _merged(expected)
        assert goaways == expected_goaways
    # With no fast stream, every DATA frame is h2's.
    scanner = FrameScanner()
    got = []
    scanner.feed(stream, got.append, lambda run: pytest.fail("no fast stream"))
    assert b"".join(got) == b"".join(not_goaway)


def test_a_handler_that_returns_true_stops_the_walk():
    scanner = FrameScanner()
    scanner.fast = 1
    stream = b"".join(DataFrame(1, data=b"m%d" % i).serialize() for i in range(5))
    seen = []

    def on_fast(run):
        seen.append(run)
        return True   # the connection failed while handling them

    def on_h2(data):
        seen.append(data)
        return True

    stream = stream[:2 * len(stream) // 5] + PingFrame(0).serialize() + stream[2 * len(stream) // 5:]
    scanner.feed(stream, on_h2, on_fast)
    assert seen == [[b"m0", b"m1"]]   # the run before the PING; nothing after the stop


def test_grpc_timeout_header_has_at_most_eight_digits():
    assert grpc_timeout(5) == b"5000m"
    assert grpc_timeout(0.0001) == b"1m"
    assert grpc_timeout(10 ** 6) == b"1000000S"


# -- a scripted worker -----------------------------------------------------------
class ScriptedWorker:
    """One HTTP/2 server connection in a thread; `on_message(worker, stream_id, path, body)` answers.

    Ready and live are answered by default (ready=`ready`, live=true); data
    streams get response headers at once.
    """

    def __init__(self, on_message=None, settings=None, ready=True, answer_ready=True, acknowledge=True,
                 features=()):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.features = features  # ReadyResult.features
        self.port = self.listener.getsockname()[1]
        self.on_message = on_message
        self.settings = settings
        self.ready = ready
        self.answer_ready = answer_ready
        self.acknowledge = acknowledge   # False: never hands flow-control window back
        self.paths = {}
        self.readers = {}
        self.received = []        # (path, body) of every request message
        self.resets = []          # stream ids the client reset
        self.unsent = {}          # stream id -> bytes `send_all` keeps until the client gives window
        self.lock = threading.RLock()
        self.conn = None
        self.sock = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(10)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        self.sock = sock
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        if self.settings:
            conn.update_settings(self.settings)
        self.conn = conn
        sock.sendall(conn.data_to_send())
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                try:
                    for event in conn.receive_data(data):
                        self._event(event)
                except h2.exceptions.ProtocolError:  # the link said GOAWAY: this connection is over
                    return
                self.flush()

    def flush(self):
        with self.lock:
            data = self.conn.data_to_send()
            if data:
                try:
                    self.sock.sendall(data)
                except OSError:  # closed by the test
                    pass

    def _event(self, event):
        conn = self.conn
        if isinstance(event, h2.events.RequestReceived):
            path = dict(event.headers)[b":path"]
            self.paths[event.stream_id] = path
            self.readers[event.stream_id] = MessageReader()
            if path != READY_PATH:
                conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        elif isinstance(event, h2.events.DataReceived):
            if self.acknowledge:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            path = self.paths[event.stream_id]
            for body in self.readers[event.stream_id].feed(event.data):
                self.received.append((path, body))
                self._message(event.stream_id, path, body)
        elif isinstance(event, h2.events.StreamReset):
            self.resets.append(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._push()

    def _message(self, sid, path, body):
        if path == READY_PATH:
            if self.answer_ready:
                self.respond(sid, [upstream_pb2.ReadyResult(time="t", ready=self.ready, features=self.features)])
                self.trailers(sid, 0)
        elif path == LIVE_PATH:
            self.send(sid, frame_message(upstream_pb2.LiveResult(time="t", live=True).SerializeToString()))
        elif self.on_message is not None:
            self.on_message(self, sid, path, body)

    # tools for scripts (the lock is held when scripts run)
    def respond(self, sid, messages, headers=True):
        if headers:
            self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.send(sid, b"".join(frame_message(m.SerializeToString()) for m in messages))

    def send(self, sid, data):
        """`data` as one DATA frame."""
        self.conn.send_data(sid, data)

    def send_all(self, sid, data):
        """`data` in as many DATA frames as it takes, each when the client's windows allow."""
        self.unsent[sid] = self.unsent.get(sid, b"") + data
        self._push()

    def _push(self):
        for sid, data in list(self.unsent.items()):
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            while data and room > 0:
                self.conn.send_data(sid, data[:room])
                data = data[room:]
                room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            self.unsent[sid] = data

    def trailers(self, sid, status, message=b""):
        headers = [(b"grpc-status", str(status).encode())]
        if message:
            headers.append((b"grpc-message", message))
        self.conn.send_headers(sid, headers, end_stream=True)

    def data_bodies(self):
        with self.lock:
            return [upstream_pb2.InputStreamRequest.FromString(b) for p, b in self.received if p == DATA_PATH]

    def close(self):
        self.listener.close()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        self.thread.join(5)


class Recorder(LinkEvents):
    def __init__(self):
        self.log = []
        self.in_offer = False

    def _add(self, *item):
        assert not self.in_offer, f"{item[0]} reported from inside offer()"
        self.log.append(item)

    def on_ready(self, link, ok, detail, features=()):
        self._add("ready", ok, detail)
        self.features = features

    def on_stream_closed(self, link, detail):
        self._add("closed", detail)

    def on_drained(self, link):
        self._add("drained")

    def on_reply(self, link, client_uuid, payload):
        self._add("reply", client_uuid, payload)

    def on_broadcast(self, link, kind, payload):
        self._add("broadcast", kind, payload)

    def on_bad_message(self, link, reason):
        self._add("bad", reason)

    def on_action(self, link, action, which, target, payload, groups):
        self._add("action", action, which, target, payload, list(groups))

    def on_live(self, link, ok, detail):
        self._add("live", ok, detail)

    def kinds(self, kind):
        return [e for e in self.log if e[0] == kind]


@pytest.fixture
def setup():
    made = []

    def make(**worker_options):
        worker = ScriptedWorker(**worker_options)
        reactor = Reactor()
        events = Recorder()
        link = H2Link(reactor, "127.0.0.1", worker.port, events)
        made.append((worker, reactor, link))
        return worker, reactor, link, events

    yield make
    for worker, reactor, link in made:
        link.close()
        worker.close()
        reactor.close()


def offer(link, events, batch):
    events.in_offer = True
    try:
        return link.offer(batch)
    finally:
        events.in_offer = False


def make_ready(reactor, link, events):
    link.probe_ready(2)
    run_until(reactor, lambda: events.kinds("ready"))
    assert events.kinds("ready") == [("ready", True, "ready")]
    link.open_stream()


def test_reply_split_across_frames_then_many_in_one_frame_then_error_trailers(setup):
    def script(worker, sid, path, body):
        request = upstream_pb2.InputStreamRequest.FromString(body)
        first = frame_message(Out(client_uuid=request.client_uuid, payload=b"A" * 1000).SerializeToString())
        for start in range(0, len(first), 300):  # one message over four DATA frames
            worker.send(sid, first[start:start + 300])
        many = [Out(client_uuid=request.client_uuid, payload=b"%d" % i) for i in range(50)]
        many.insert(10, Out(broadcast=Out.BROADCAST_ALL, payload=b"everyone"))
        many.insert(20, Out(payload=b"nowhere"))
        worker.send(sid, b"".join(frame_message(m.SerializeToString()) for m in many))  # one frame
        worker.trailers(sid, 14, b"going%20away%20%E2%9C%93")

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    assert offer(link, events, ["c1", b"hi", "t0"]) is True
    run_until(reactor, lambda: events.kinds("closed"))
    log = events.log[1:]
    assert log[0] == ("reply", "c1", b"A" * 1000)
    assert log[11] == ("broadcast", 0, b"everyone")
    assert log[21] == ("bad", "message with no target")
    replies = [e[2] for e in log if e[0] == "reply"]
    assert replies == [b"A" * 1000] + [b"%d" % i for i in range(50)]
    assert log[-1] == ("closed", "UNAVAILABLE: going away \u2713")
    assert link.backlog() == 0 and link.progress() == 1
    # Its one message was answered, but the worker never gave its window back: not known read.
    assert link.stop_stream() == ([], 1, [])


def test_data_stream_bypasses_h2_and_gives_its_window_back(setup, monkeypatch):
    """Far more reply bytes than the receive window: they arrive only if the link returns the window."""
    monkeypatch.setattr(h2link, "RECEIVE_WINDOW", 256 * 1024)
    monkeypatch.setattr(h2link, "WINDOW_RETURN_BYTES", 64 * 1024)
    replies = [Out(client_uuid="c1", payload=bytes([i]) * 16000) for i in range(80)]   # 1.3 MB

    def script(worker, sid, path, body):
        worker.send_all(sid, b"".join(frame_message(m.SerializeToString()) for m in replies))

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    assert offer(link, events, ["c1", b"go", "t0"]) is True
    run_until(reactor, lambda: len(events.kinds("reply")) == 80, timeout=10)
    assert [e[2] for e in events.kinds("reply")] == [m.payload for m in replies]
    assert link._conn.scanner.fast == link._data.stream_id   # the data stream's DATA skipped h2
    # Ready and live still go through h2 on the same connection.
    link.start_live(0.05)
    run_until(reactor, lambda: events.kinds("live"))
    assert events.kinds("live")[0][1] is True


def test_a_whole_batch_goes_out_in_one_data_frame(setup):
    frames = []

    def script(worker, sid, path, body):
        request = upstream_pb2.InputStreamRequest.FromString(body)
        worker.respond(sid, [Out(client_uuid=request.client_uuid, payload=request.payload)], headers=False)

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    original = worker._event

    def counting(event):
        if isinstance(event, h2.events.DataReceived) and worker.paths[event.stream_id] == DATA_PATH:
            frames.append(len(event.data))
        original(event)

    worker._event = counting
    batch = []
    for i in range(100):
        batch += [f"c{i}", b"payload %d" % i, "2026-01-01T00:00:00.000000Z"]
    assert offer(link, events, batch) is True
    run_until(reactor, lambda: len(events.kinds("reply")) == 100)
    assert len(frames) == 1
    assert [e[1:] for e in events.kinds("reply")] == [(f"c{i}", b"payload %d" % i) for i in range(100)]
    assert link.backlog() == 0 and link.progress() == 100


def test_flow_control_keeps_the_rest_refuses_offers_then_drains(setup):
    def script(worker, sid, path, body):
        request = upstream_pb2.InputStreamRequest.FromString(body)
        worker.respond(sid, [Out(client_uuid=request.client_uuid, payload=b"ok")], headers=False)

    # The worker's stream windows start at 1000 bytes and it acknowledges as it reads.
    worker, reactor, link, events = setup(on_message=script, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    make_ready(reactor, link, events)
    batch = []
    for i in range(200):
        batch += [f"c{i}", b"x" * 50, "t"]
    assert offer(link, events, batch) is True
    assert offer(link, events, ["late", b"y", "t"]) is False  # still holding most of the first
    run_until(reactor, lambda: events.kinds("drained"))
    run_until(reactor, lambda: len(events.kinds("reply")) == 200)
    assert [e[1] for e in events.kinds("reply")] == [f"c{i}" for i in range(200)]
    assert [m.client_uuid for m in worker.data_bodies()] == [f"c{i}" for i in range(200)]
    assert offer(link, events, ["late", b"y", "t"]) is True


def test_stop_stream_takes_back_what_the_windows_kept(setup):
    # This worker never answers and never hands back its first 1000-byte window.
    worker, reactor, link, events = setup(settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000}, acknowledge=False)
    make_ready(reactor, link, events)
    batch = []
    for i in range(100):
        batch += [f"c{i}", b"x" * 50, "t"]
    assert offer(link, events, batch) is True
    run_until(reactor, lambda: len(worker.data_bodies()) > 0)
    assert link.progress() + link.backlog() == 100 and link.backlog() > 0
    unsent, unconfirmed, resend = link.stop_stream()
    assert unconfirmed > 0 and len(unsent) // 3 + unconfirmed == 100 and resend == []
    assert unsent[:3] == [f"c{unconfirmed}", b"x" * 50, "t"]  # in order, right after the written ones


def test_stop_stream_hands_back_the_unconfirmed_ones_when_asked_to_keep_them(setup):
    worker, reactor, link, events = setup(settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000}, acknowledge=False)
    link.keep_unconfirmed = True
    make_ready(reactor, link, events)
    batch = []
    for i in range(100):
        batch += [f"c{i}", b"x" * 50, "t"]
    assert offer(link, events, batch) is True
    run_until(reactor, lambda: len(worker.data_bodies()) > 0)
    unsent, unconfirmed, resend = link.stop_stream()
    assert unconfirmed == 0 and len(resend) // 3 + len(unsent) // 3 == 100
    assert resend + unsent == batch  # every message once, in order: written-unconfirmed, then unsent


def test_features_lifecycle_events_and_session_actions(setup):
    """The ready answer's features reach the core; events go out as kind + metadata; a worker's
    actions come back as on_action, while SEND to a client or a set stays on_reply / on_broadcast."""
    def script(worker, sid, path, body):
        request = upstream_pb2.InputStreamRequest.FromString(body)
        if request.kind != request.CONNECTED:
            return
        worker.respond(sid, [Out(client_uuid=request.client_uuid, action=Out.CLOSE, payload=b"bye"),
                             Out(group="room", payload=b"to the room"),
                             Out(broadcast=Out.BROADCAST_ACTIVE, action=Out.JOIN, groups=["g1", "g2"]),
                             Out(group="room", action=Out.LEAVE, groups=["room"]),
                             Out(client_uuid=request.client_uuid, payload=b"plain"),
                             Out(broadcast=Out.BROADCAST_ALL, payload=b"everyone")], headers=False)

    worker, reactor, link, events = setup(on_message=script, features=["lifecycle", "from-the-future"])
    make_ready(reactor, link, events)
    assert events.features == ("lifecycle", "from-the-future")
    connected = Event(Event.CONNECTED, {"remote_addr": "127.0.0.1", "node": "n"})
    assert offer(link, events, ["c1", connected, "t", "c1", b"hello", "t"]) is True
    run_until(reactor, lambda: len(events.log) >= 7)
    assert [m.kind for m in worker.data_bodies()] == [1, 0]
    assert dict(worker.data_bodies()[0].metadata) == connected.metadata
    assert events.log[1:] == [
        ("action", Out.CLOSE, "client_uuid", "c1", b"bye", []),
        ("action", Out.SEND, "group", "room", b"to the room", []),
        ("action", Out.JOIN, "broadcast", Out.BROADCAST_ACTIVE, b"", ["g1", "g2"]),
        ("action", Out.LEAVE, "group", "room", b"", ["room"]),
        ("reply", "c1", b"plain"),
        ("broadcast", Out.BROADCAST_ALL, b"everyone")]


def test_ready_false_and_trailers_only_error_and_deadline(setup):
    worker, reactor, link, events = setup(ready=False)
    link.probe_ready(2)
    run_until(reactor, lambda: events.log)
    assert events.log == [("ready", False, "worker answered ready=false")]

    silent, reactor2, link2, events2 = setup(answer_ready=False)
    started = time.monotonic()
    link2.probe_ready(0.2)
    run_until(reactor2, lambda: events2.log)
    assert events2.log[0][:2] == ("ready", False)
    assert events2.log[0][2].startswith("DEADLINE_EXCEEDED")
    assert 0.15 < time.monotonic() - started < 2


def test_trailers_only_answer_is_an_error_with_its_status(setup):
    worker, reactor, link, events = setup(answer_ready=False)
    original = worker._message

    def refuse(sid, path, body):
        if path == READY_PATH:
            worker.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                           (b"grpc-status", b"12"), (b"grpc-message", b"no%20such%20method")],
                                     end_stream=True)
        else:
            original(sid, path, body)

    worker._message = refuse
    link.probe_ready(2)
    run_until(reactor, lambda: events.log)
    assert events.log == [("ready", False, "UNIMPLEMENTED: no such method")]


def test_connect_refused_answers_not_ready_later_not_inside_probe_ready():
    reactor = Reactor()
    events = Recorder()
    link = H2Link(reactor, "127.0.0.1", free_port(), events)
    link.probe_ready(1)
    assert events.log == []
    run_until(reactor, lambda: events.log)
    assert events.log[0][:2] == ("ready", False)
    assert "cannot connect" in events.log[0][2] and "refused" in events.log[0][2].lower()
    link.close()
    reactor.close()


def test_a_name_is_resolved_off_thread_and_each_address_tried_in_turn(setup, monkeypatch):
    """A name whose first address refuses (say ::1 with a worker on 127.0.0.1 only) reaches the next one."""
    worker, reactor, link, events = setup()
    refused = ("127.0.0.1", free_port())
    real_getaddrinfo = socket.getaddrinfo
    resolved_on = []

    def resolve(host, port, *args, **kwargs):
        if host != "two-addresses.test" or kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            return real_getaddrinfo(host, port, *args, **kwargs)
        resolved_on.append(threading.current_thread())
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", refused),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", worker.port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    link.host = "two-addresses.test"
    link.probe_ready(2)
    run_until(reactor, lambda: events.log)
    assert events.log == [("ready", True, "ready")]
    assert resolved_on and resolved_on[0] is not threading.current_thread()


def test_a_name_that_does_not_resolve_is_a_clear_not_ready():
    reactor = Reactor()
    events = Recorder()
    link = H2Link(reactor, "no-such-worker.invalid", 5000, events)
    link.probe_ready(5)
    run_until(reactor, lambda: events.log, timeout=10)
    assert events.log[0][:2] == ("ready", False)
    assert events.log[0][2].startswith("UNAVAILABLE: cannot resolve no-such-worker.invalid:5000"), events.log
    link.close()
    reactor.close()


def test_live_answers_and_no_report_after_stop_live_even_for_unknown_eof(setup):
    worker, reactor, link, events = setup()
    make_ready(reactor, link, events)
    link.start_live(0.05)
    run_until(reactor, lambda: len(events.kinds("live")) >= 3)
    assert set(events.kinds("live")) == {("live", True, "live")}
    live_sid = [sid for sid, path in worker.paths.items() if path == LIVE_PATH][0]
    link.stop_live()
    count = len(events.kinds("live"))
    with worker.lock:  # the reference worker's way to end a half-closed live call
        try:
            worker.trailers(live_sid, 2, b"EOF")
        except h2.exceptions.StreamClosedError:
            pass
        worker.flush()
    deadline = time.monotonic() + 0.3
    run_until(reactor, lambda: time.monotonic() > deadline)
    assert len(events.kinds("live")) == count
    assert not events.kinds("closed")


def test_worker_closing_the_connection_ends_every_stream_with_a_clear_detail(setup):
    worker, reactor, link, events = setup()
    make_ready(reactor, link, events)
    link.start_live(10)
    run_until(reactor, lambda: events.kinds("live"))
    worker.close()
    run_until(reactor, lambda: events.kinds("closed") and len(events.kinds("live")) == 2)
    assert events.kinds("closed")[0][1].startswith("UNAVAILABLE")
    assert events.kinds("live")[-1][1] is False
    assert link.offer(["c", b"x", "t"]) is False


def _raw(worker, *frames):
    """Write hand-made frames after whatever h2 queued (h2 itself would refuse frames after GOAWAY)."""
    worker.flush()
    worker.sock.sendall(b"".join(f.serialize() for f in frames))


def test_graceful_goaway_keeps_the_open_streams_and_the_next_probe_uses_a_new_connection(setup):
    def script(worker, sid, path, body):
        request = upstream_pb2.InputStreamRequest.FromString(body)
        reply = frame_message(Out(client_uuid=request.client_uuid, payload=request.payload).SerializeToString())
        if request.payload == b"before":
            # A reply, GOAWAY, PING and another reply, all in one write: nothing is lost.
            worker.send(sid, reply)
            _raw(worker, GoAwayFrame(0, last_stream_id=2 ** 31 - 1, error_code=0),
                 PingFrame(0, opaque_data=b"12345678"), DataFrame(sid, data=reply))
        else:
            _raw(worker, DataFrame(sid, data=reply))

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    first_connection = link._conn
    assert offer(link, events, ["c1", b"before", "t"]) is True
    run_until(reactor, lambda: len(events.kinds("reply")) == 2)
    assert offer(link, events, ["c1", b"after", "t"]) is True
    run_until(reactor, lambda: len(events.kinds("reply")) == 3)
    assert [e[2] for e in events.kinds("reply")] == [b"before", b"before", b"after"]
    assert not events.kinds("closed")
    assert link._conn is None and not first_connection.closed  # going away, still serving the stream
    worker.close()
    run_until(reactor, lambda: events.kinds("closed"))
    assert events.kinds("closed")[0][1] == ("UNAVAILABLE: the worker closed the connection after "
                                            "GOAWAY (NO_ERROR)")


def test_goaway_with_an_error_ends_every_stream_with_its_code_and_text(setup):
    def script(worker, sid, path, body):
        _raw(worker, GoAwayFrame(0, last_stream_id=sid, error_code=11, additional_data=b"too_many_pings"))

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    link.start_live(10)
    run_until(reactor, lambda: events.kinds("live"))
    assert offer(link, events, ["c1", b"x", "t"]) is True
    run_until(reactor, lambda: events.kinds("closed"))
    detail = "UNAVAILABLE: the worker sent GOAWAY (ENHANCE_YOUR_CALM: too_many_pings)"
    assert events.kinds("closed") == [("closed", detail)]
    assert events.kinds("live")[-1] == ("live", False, detail)


def test_a_worker_that_sends_past_the_window_while_replies_are_held_is_cut_off(setup, monkeypatch):
    """Held replies are bounded by the data stream's window: DATA past it is a flow-control error
    (RFC 9113 section 6.9.1) that fails the connection, so the held bytes never exceed the window."""
    monkeypatch.setattr(h2link, "RECEIVE_WINDOW", 256 * 1024)
    reply = frame_message(Out(client_uuid="c1", payload=b"F" * 16000).SerializeToString())

    def script(worker, sid, path, body):
        # Raw DATA frames that ignore the window pplex grants: 40 x 16 KB, far past 256 KiB.
        _raw(worker, *[DataFrame(sid, data=reply) for _ in range(40)])

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    link.pause_replies()   # clients are behind: what the worker sends is held, its window kept
    assert offer(link, events, ["c1", b"go", "t0"]) is True
    run_until(reactor, lambda: events.kinds("closed"))
    detail = events.kinds("closed")[0][1]
    assert "FLOW_CONTROL_ERROR" in detail and "262144-byte window" in detail
    assert not events.kinds("reply")


def test_replies_held_within_the_window_are_all_delivered_on_resume(setup, monkeypatch):
    monkeypatch.setattr(h2link, "RECEIVE_WINDOW", 256 * 1024)
    monkeypatch.setattr(h2link, "WINDOW_RETURN_BYTES", 64 * 1024)
    replies = [Out(client_uuid="c1", payload=bytes([i]) * 16000) for i in range(40)]   # 640 KB

    def script(worker, sid, path, body):
        worker.send_all(sid, b"".join(frame_message(m.SerializeToString()) for m in replies))

    worker, reactor, link, events = setup(on_message=script)
    make_ready(reactor, link, events)
    link.pause_replies()
    assert offer(link, events, ["c1", b"go", "t0"]) is True
    run_until(reactor, lambda: link._data.held_bytes > 200 * 1024)
    assert not events.kinds("reply") and not events.kinds("closed")
    link.resume_replies()
    run_until(reactor, lambda: len(events.kinds("reply")) == 40, timeout=10)
    assert [e[2] for e in events.kinds("reply")] == [m.payload for m in replies]
    assert not events.kinds("closed") and link._data.held_bytes == 0
