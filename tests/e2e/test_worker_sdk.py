"""The Python worker SDK (pplex/worker.py) against a real grpcio client playing pplex's part.

No pplex here: each test opens the worker's data stream itself, sends
InputStreamRequests (messages and lifecycle events) and reads the
OutputStreamRequests the worker sends back.
"""
import logging

import grpc
import pytest
from google.protobuf import empty_pb2

from pplex._proto import upstream_pb2_grpc
from pplex.worker import (BROADCAST_ACTIVE, BROADCAST_ALL, CLOSE, CONNECTED, DISCONNECTED, JOIN, LEAVE, SEND,
                          EchoWorker, Group, Stream, Worker)
from tests.datastream import TIMEOUT, DataStream, ready_of
from tests.helpers import wait_for


@pytest.fixture
def serve():
    started = []

    def start(worker):
        worker.serve(port=0)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(grace=0)


@pytest.fixture
def streams():
    opened = []

    def open_stream(worker, node="node-1"):
        stream = DataStream(worker.port, node)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


class Recorder(Worker):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.nodes = []

    def on_message(self, stream, client_uuid, payload):
        self.calls.append(("message", client_uuid, payload))
        stream.reply(client_uuid, payload)

    def on_connected(self, stream, client_uuid, metadata):
        self.calls.append(("connected", client_uuid, metadata))
        self.nodes.append(stream.node)

    def on_disconnected(self, stream, client_uuid, reason):
        self.calls.append(("disconnected", client_uuid, reason))


class OnlyDisconnected(EchoWorker):
    def on_disconnected(self, stream, client_uuid, reason):
        pass


def test_ready_announces_lifecycle_only_when_a_lifecycle_method_is_overridden(serve):
    assert list(ready_of(serve(EchoWorker()).port).features) == []
    assert list(ready_of(serve(Recorder()).port).features) == ["lifecycle"]
    answer = ready_of(serve(OnlyDisconnected()).port)
    assert answer.ready and list(answer.features) == ["lifecycle"]


def test_inputs_are_dispatched_by_kind_in_stream_order(serve, streams):
    worker = serve(Recorder())
    stream = streams(worker, node="pplex-a")
    stream.send("u1", kind=CONNECTED, remote_addr="127.0.0.1", remote_port="50000", node="pplex-a")
    stream.send("u1", b"hello")
    stream.send("u1", kind=DISCONNECTED, reason="client_closed")
    assert stream.next().payload == b"hello"
    wait_for(lambda: len(worker.calls) == 3, message="three calls")
    assert worker.calls == [
        ("connected", "u1", {"remote_addr": "127.0.0.1", "remote_port": "50000", "node": "pplex-a"}),
        ("message", "u1", b"hello"),
        ("disconnected", "u1", "client_closed"),
    ]
    assert worker.nodes == ["pplex-a"]  # the stream knows its pplex instance (pplex-node header)


def test_a_base_contract_worker_gets_messages_as_before(serve, streams):
    stream = streams(serve(EchoWorker()), node=None)
    stream.send("u1", b"\x00\xffdata")
    out = stream.next()
    assert (out.WhichOneof("target"), out.client_uuid, out.payload, out.action) == ("client_uuid", "u1",
                                                                                   b"\x00\xffdata", SEND)


class Actions(Worker):
    def on_message(self, stream, client_uuid, payload):
        stream.close(client_uuid, b"bye")
        stream.close(client_uuid)
        stream.join(client_uuid, "red", "blue")
        stream.leave(client_uuid, "blue")
        stream.send_group("red", b"to red")
        stream.close(Group("red"), b"room closed")
        stream.join(Group("red"), "archive")
        stream.leave(BROADCAST_ACTIVE, "idle")
        stream.close(BROADCAST_ALL, b"maintenance")


def test_actions_and_targets_are_encoded_as_the_contract_says(serve, streams):
    stream = streams(serve(Actions()))
    stream.send("u1", b"go")
    got = []
    for _ in range(9):
        out = stream.next()
        target = out.WhichOneof("target")
        got.append((target, getattr(out, target), out.action, list(out.groups), out.payload))
    assert got == [
        ("client_uuid", "u1", CLOSE, [], b"bye"),
        ("client_uuid", "u1", CLOSE, [], b""),
        ("client_uuid", "u1", JOIN, ["red", "blue"], b""),
        ("client_uuid", "u1", LEAVE, ["blue"], b""),
        ("group", "red", SEND, [], b"to red"),
        ("group", "red", CLOSE, [], b"room closed"),
        ("group", "red", JOIN, ["archive"], b""),
        ("broadcast", BROADCAST_ACTIVE, LEAVE, ["idle"], b""),
        ("broadcast", BROADCAST_ALL, CLOSE, [], b"maintenance"),
    ]


def test_bad_targets_and_group_lists_raise_in_the_callers_code():
    stream = Stream()
    with pytest.raises(ValueError, match="at least one group"):
        stream.join("u1")
    with pytest.raises(ValueError, match="non-empty strings"):
        stream.leave("u1", "ok", "")
    with pytest.raises(ValueError, match="non-empty strings"):
        stream.join("u1", 7)
    for target in (True, 7, None, b"u1"):
        with pytest.raises(TypeError, match="target must be"):
            stream.close(target)
    assert repr(Group("lobby")) == "Group('lobby')"
    assert stream._out.empty()


def test_worker_send_group_goes_out_on_every_stream(serve, streams):
    worker = serve(EchoWorker())
    first, second = streams(worker, "n1"), streams(worker, "n2")
    wait_for(lambda: worker.stream_count() == 2, message="two streams")
    worker.send_group("lobby", b"news")
    for stream in (first, second):
        out = stream.next()
        assert (out.group, out.payload, out.action) == ("lobby", b"news", SEND)


class Fragile(Worker):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_message(self, stream, client_uuid, payload):
        if payload == b"boom":
            raise RuntimeError("bad message")
        stream.reply(client_uuid, payload)

    def on_connected(self, stream, client_uuid, metadata):
        raise KeyError("no seat")

    def on_disconnected(self, stream, client_uuid, reason):
        self.seen.append(reason)
        raise ValueError("cannot save")


def test_an_exception_in_user_code_is_logged_rate_limited_and_the_stream_goes_on(serve, streams, caplog):
    worker = serve(Fragile())
    stream = streams(worker)
    caplog.set_level(logging.ERROR, logger="pplex.worker")
    for k in range(5):
        stream.send(f"u{k}", b"boom")
    stream.send("u9", b"still here")
    out = stream.next()
    assert (out.client_uuid, out.payload) == ("u9", b"still here")
    assert worker.errors == 5
    lines = [r for r in caplog.records if r.name == "pplex.worker"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # one line per 10 s per handler
    assert "on_message raised for client u0; the stream goes on" in lines[0].getMessage()
    assert lines[0].exc_info and lines[0].exc_info[0] is RuntimeError
    # Lifecycle handlers too: each raise is contained and the next input is served.
    stream.send("u1", kind=CONNECTED, node="n")
    stream.send("u1", kind=DISCONNECTED, reason="client_reset")
    stream.send("u1", b"after")
    assert stream.next().payload == b"after"
    assert worker.seen == ["client_reset"] and worker.errors == 7
    assert {"on_connected raised for client u1; the stream goes on",
            "on_disconnected raised for client u1; the stream goes on"} <= {r.getMessage() for r in caplog.records}


def test_an_input_kind_newer_than_the_sdk_is_ignored(serve, streams):
    worker = serve(Recorder())
    stream = streams(worker)
    stream.send("u1", kind=7)
    stream.send("u1", b"next")
    assert stream.next().payload == b"next"
    assert worker.calls == [("message", "u1", b"next")] and worker.errors == 0


class Unwell(EchoWorker):
    def is_ready(self):
        raise OSError("database down")

    def is_live(self):
        raise OSError("database down")


def test_health_checks_that_raise_answer_false(serve):
    worker = serve(Unwell())
    assert ready_of(worker.port).ready is False
    channel = grpc.insecure_channel(f"127.0.0.1:{worker.port}")
    try:
        stub = upstream_pb2_grpc.UpstreamPeerServiceStub(channel)
        answers = stub.live(iter([empty_pb2.Empty(), empty_pb2.Empty()]), timeout=TIMEOUT)
        assert [a.live for a in answers] == [False, False]
    finally:
        channel.close()
    assert worker.errors == 3
