"""The Go reference worker's --mode sessions (conformance/go-upstream/sessions.go), driven by a real
grpcio client in pplex's place: lifecycle events in, chat actions and the suite's commands out.
The conformance suite's Python SessionHelper answers the same commands the same way.

Its other modes keep the base contract: their ready answer announces nothing.
"""
import json

import pytest

from conformance.workers import SessionHelper
from pplex._proto import upstream_pb2
from tests.datastream import CONNECTED, DISCONNECTED, DataStream, ready_of
from tests.helpers import wait_for

Out = upstream_pb2.OutputStreamRequest
A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


@pytest.fixture
def stream():
    opened = []

    def open_stream(port, node="pplex-test-node"):
        data = DataStream(port, node)
        opened.append(data)
        return data

    yield open_stream
    for data in opened:
        data.close()


def described(out):
    target = out.WhichOneof("target")
    return (target, getattr(out, target), Out.Action.Name(out.action), list(out.groups), out.payload)


def test_only_sessions_mode_announces_lifecycle(go_worker):
    assert list(ready_of(go_worker("sessions").port).features) == ["lifecycle"]
    for mode in ("reference", "echo"):
        answer = ready_of(go_worker(mode).port)
        assert answer.ready and list(answer.features) == []


def test_the_chat_joins_a_room_sends_to_it_and_quit_closes(go_worker, stream):
    worker = go_worker("sessions")
    data = stream(worker.port)
    data.send(A, kind=CONNECTED, remote_addr="127.0.0.1", remote_port="50001", node="pplex-test-node")
    data.send(B, kind=CONNECTED, remote_addr="127.0.0.1", remote_port="50002", node="pplex-test-node")
    data.send(A, b"lobby\n")
    assert described(data.next()) == ("client_uuid", A, "JOIN", ["lobby"], b"")
    assert described(data.next()) == ("group", "lobby", "SEND", [], b"aaaaaaaa joined lobby")
    data.send(B, b"lobby")
    assert described(data.next()) == ("client_uuid", B, "JOIN", ["lobby"], b"")
    assert described(data.next()) == ("group", "lobby", "SEND", [], b"bbbbbbbb joined lobby")
    data.send(A, b"hello room\r\n")
    assert described(data.next()) == ("group", "lobby", "SEND", [], b"aaaaaaaa: hello room")
    data.send(A, b"/quit")
    assert described(data.next()) == ("client_uuid", A, "CLOSE", [], b"goodbye")
    data.send(A, kind=DISCONNECTED, reason="closed_by_worker")
    assert described(data.next()) == ("group", "lobby", "SEND", [], b"aaaaaaaa left lobby")
    # A client it never saw CONNECTED (events off, or sent elsewhere) still chats.
    data.send("cccccccc-0000-4000-8000-000000000003", b"")
    assert described(data.next())[4] == b"name a room (1 to 64 bytes) first"
    data.send(B, b"pplex-conformance:nonsense")
    assert described(data.next()) == ("client_uuid", B, "SEND", [], b"unknown command nonsense")
    wait_for(lambda: "DISCONNECTED" in worker.output(), message="the DISCONNECTED line")
    printed = worker.output()
    assert "opened by pplex node pplex-test-node" in printed
    assert f"CONNECTED {A} node=pplex-test-node remote_addr=127.0.0.1 remote_port=50001" in printed
    assert f"DISCONNECTED {A} reason=closed_by_worker" in printed


@pytest.fixture(params=["go", "helper"])
def session_worker_port(request, go_worker):
    if request.param == "go":
        yield go_worker("sessions").port
        return
    helper = SessionHelper().serve(port=0)
    yield helper.port
    helper.stop(grace=0)


def test_the_conformance_session_commands(session_worker_port, stream):
    data = stream(session_worker_port)
    data.send(A, kind=CONNECTED, remote_addr="127.0.0.1", remote_port="50001")
    data.send(A, b"pplex-conformance:session")
    report = json.loads(data.next().payload)
    assert report == {"uuid": A, "connected": [{"remote_addr": "127.0.0.1", "remote_port": "50001"}],
                      "disconnected": []}
    data.send(B, kind=DISCONNECTED, reason="auth_failed")
    data.send(A, f"pplex-conformance:session:{B}".encode())
    out = data.next()
    assert out.client_uuid == A
    assert json.loads(out.payload) == {"uuid": B, "connected": [], "disconnected": [{"reason": "auth_failed"}]}
    data.send(A, b"pplex-conformance:join:g1")
    assert described(data.next()) == ("client_uuid", A, "JOIN", ["g1"], b"")
    assert described(data.next()) == ("client_uuid", A, "SEND", [], b"ok")
    data.send(A, b"pplex-conformance:leave:g1")
    assert described(data.next()) == ("client_uuid", A, "LEAVE", ["g1"], b"")
    assert described(data.next()) == ("client_uuid", A, "SEND", [], b"ok")
    data.send(A, b"pplex-conformance:group:g1:to:everyone")
    assert described(data.next()) == ("group", "g1", "SEND", [], b"to:everyone")
    data.send(A, b"pplex-conformance:close-group:g1:bye all")
    assert described(data.next()) == ("group", "g1", "CLOSE", [], b"bye all")
    data.send(A, b"pplex-conformance:close:" + b"x" * 70000)
    assert described(data.next()) == ("client_uuid", A, "CLOSE", [], b"x" * 70000)
    data.send(A, b"pplex-conformance:broadcast:active")
    assert described(data.next()) == ("broadcast", Out.BROADCAST_ACTIVE, "SEND", [],
                                      b"pplex-conformance:broadcast:active")


def test_a_client_is_remembered_across_streams(go_worker, stream):
    """The suite asks, through a new pplex, what a client that went with the old one got."""
    worker = go_worker("sessions")
    first = stream(worker.port, "node-1")
    first.send(A, kind=CONNECTED, node="node-1")
    first.send(A, kind=DISCONNECTED, reason="shutdown")
    first.send(A, b"pplex-conformance:session:" + A.encode())  # its stream's order: after both events
    assert json.loads(first.next().payload)["disconnected"] == [{"reason": "shutdown"}]
    first.close()
    second = stream(worker.port, "node-2")
    second.send(B, f"pplex-conformance:session:{A}".encode())
    assert json.loads(second.next().payload) == {"uuid": A, "connected": [{"node": "node-1"}],
                                                 "disconnected": [{"reason": "shutdown"}]}
    wait_for(lambda: "closed" in worker.output(), message="the stream's end in the log")
    assert "forgetting the 0 client(s) of node node-1" in worker.output()
