"""The committed generated modules match proto/upstream.proto, and the contract's wire facts hold.

The session extension (issue 11) only adds fields: a worker built on the base
contract must see and send exactly the bytes it did before. The base contract
is rebuilt here, in its own descriptor pool, from the current descriptor with
the added fields taken out, and both are compared on the wire.
"""
import os
import random
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from pplex._proto import upstream_pb2
from tests.helpers import ROOT

In = upstream_pb2.InputStreamRequest
Out = upstream_pb2.OutputStreamRequest
ADDED = {"ReadyResult": {"features"}, "InputStreamRequest": {"kind", "metadata"},
         "OutputStreamRequest": {"group", "action", "groups"}}


def test_generated_modules_match_the_proto_file(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    out = generate.generate(str(tmp_path))
    fresh_source = open(os.path.join(out, "upstream_pb2.py")).read()
    committed_source = open(os.path.join(ROOT, "pplex", "_proto", "upstream_pb2.py")).read()
    # The serialized descriptor line is the whole contract; compare it exactly.
    line = [l for l in fresh_source.splitlines() if "AddSerializedFile" in l]
    assert line and line[0] in committed_source, "pplex/_proto is stale: run python proto/generate.py"
    fresh_grpc = open(os.path.join(out, "upstream_pb2_grpc.py")).read()
    committed_grpc = open(os.path.join(ROOT, "pplex", "_proto", "upstream_pb2_grpc.py")).read()
    assert fresh_grpc == committed_grpc


def fields(message):
    return {f.name: (f.number, f.type, 3 if f.is_repeated else 1) for f in message.DESCRIPTOR.fields}


def test_wire_names_are_the_contract():
    service = upstream_pb2.DESCRIPTOR.services_by_name["UpstreamPeerService"]
    assert service.full_name == "upstream.grpc.service.UpstreamPeerService"
    assert [m.name for m in service.methods] == ["bidirectionalStreaming", "ready", "live"]
    assert [f.name for f in Out.DESCRIPTOR.oneofs_by_name["target"].fields] == ["client_uuid", "broadcast", "group"]
    assert dict(Out.Broadcast.items()) == {"BROADCAST_ALL": 0, "BROADCAST_ACTIVE": 1, "BROADCAST_NOT_ACTIVE": 2}
    assert dict(Out.Action.items()) == {"SEND": 0, "CLOSE": 1, "JOIN": 2, "LEAVE": 3}
    assert dict(In.Kind.items()) == {"MESSAGE": 0, "CONNECTED": 1, "DISCONNECTED": 2}
    optional, repeated = 1, 3
    string, bytes_, enum, bool_, message = 9, 12, 14, 8, 11
    assert fields(upstream_pb2.ReadyResult) == {
        "time": (1, string, optional), "ready": (2, bool_, optional), "features": (3, string, repeated)}
    assert fields(In) == {"time": (1, string, optional), "client_uuid": (2, string, optional),
                          "payload": (3, bytes_, optional), "kind": (4, enum, optional),
                          "metadata": (5, message, repeated)}
    assert In.DESCRIPTOR.fields_by_name["metadata"].message_type.GetOptions().map_entry
    entry = In.DESCRIPTOR.fields_by_name["metadata"].message_type
    assert [(f.name, f.type) for f in entry.fields] == [("key", string), ("value", string)]
    assert fields(Out) == {"time": (1, string, optional), "client_uuid": (2, string, optional),
                           "broadcast": (3, enum, optional), "payload": (4, bytes_, optional),
                           "group": (5, string, optional), "action": (6, enum, optional),
                           "groups": (7, string, repeated)}
    # BROADCAST_ALL is the zero value, yet "sent" is told from "no target" by the oneof.
    assert Out(broadcast=Out.BROADCAST_ALL).WhichOneof("target") == "broadcast"
    assert Out().WhichOneof("target") is None
    assert Out(group="").WhichOneof("target") == "group"


def base_contract():
    """The base contract's message classes, rebuilt without the session fields in a pool of their own."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    upstream_pb2.DESCRIPTOR.CopyToProto(file_proto)
    file_proto.name = "base/upstream.proto"
    file_proto.ClearField("service")
    file_proto.ClearField("dependency")
    for message in file_proto.message_type:
        added = ADDED.get(message.name, ())
        kept = [f for f in message.field if f.name not in added]
        del message.field[:]
        message.field.extend(kept)
        for nested in ("Kind", "Action"):
            keep = [e for e in message.enum_type if e.name != nested]
            del message.enum_type[:]
            message.enum_type.extend(keep)
        keep = [n for n in message.nested_type if not n.options.map_entry]
        del message.nested_type[:]
        message.nested_type.extend(keep)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"upstream.grpc.service.{name}"))
            for name in ("ReadyResult", "InputStreamRequest", "OutputStreamRequest")}


def test_the_base_contract_rebuilt_here_has_no_session_fields():
    base = base_contract()
    assert set(fields(base["InputStreamRequest"])) == {"time", "client_uuid", "payload"}
    assert set(fields(base["OutputStreamRequest"])) == {"time", "client_uuid", "broadcast", "payload"}
    assert set(fields(base["ReadyResult"])) == {"time", "ready"}


def test_a_message_input_is_byte_for_byte_the_base_contract():
    base = base_contract()["InputStreamRequest"]
    rng = random.Random(11)
    for _ in range(200):
        time = "2026-11-25T05:39:01.%06dZ" % rng.randrange(10**6)
        client = "%032x" % rng.getrandbits(128)
        payload = rng.randbytes(rng.choice((0, 1, 5, 300, 70000)))
        new = In(time=time, client_uuid=client, payload=payload, kind=In.MESSAGE)
        old = base(time=time, client_uuid=client, payload=payload)
        assert new.SerializeToString() == old.SerializeToString()
        again = base.FromString(new.SerializeToString())
        assert (again.time, again.client_uuid, again.payload) == (time, client, payload)
    # What h2link's fast path writes (grpcwire.encode_batch) parses as a MESSAGE with no metadata.
    parsed = In.FromString(old.SerializeToString())
    assert parsed.kind == In.MESSAGE and not parsed.metadata


def test_base_outputs_mean_the_same_and_sends_encode_as_before():
    base = base_contract()["OutputStreamRequest"]
    for kwargs in ({"client_uuid": "u-1", "payload": b"x"}, {"broadcast": 0, "payload": b"all"},
                   {"broadcast": 2, "payload": b""}, {"time": "Wed Nov 25 05:39:01 UTC 2026"}):
        old = base(**kwargs)
        new = Out.FromString(old.SerializeToString())
        assert new.action == Out.SEND and not new.groups
        assert new.WhichOneof("target") == old.WhichOneof("target")
        assert Out(action=Out.SEND, **kwargs).SerializeToString() == old.SerializeToString()


def test_a_base_worker_ignores_session_fields_it_does_not_know():
    """An event sent by mistake still parses on the base contract: the extra fields are unknown, skipped."""
    base = base_contract()
    event = In(time="t", client_uuid="u", kind=In.DISCONNECTED, metadata={"reason": "client_closed"})
    old = base["InputStreamRequest"].FromString(event.SerializeToString())
    assert (old.time, old.client_uuid, old.payload) == ("t", "u", b"")
    ready = base["ReadyResult"].FromString(upstream_pb2.ReadyResult(ready=True, features=["lifecycle"])
                                           .SerializeToString())
    assert ready.ready is True
