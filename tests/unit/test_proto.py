"""The committed generated modules match proto/upstream.proto."""
import os
import sys

from pplex._proto import upstream_pb2
from tests.helpers import ROOT


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


def test_wire_names_are_the_contract():
    service = upstream_pb2.DESCRIPTOR.services_by_name["UpstreamPeerService"]
    assert service.full_name == "upstream.grpc.service.UpstreamPeerService"
    assert [m.name for m in service.methods] == ["bidirectionalStreaming", "ready", "live"]
    out = upstream_pb2.OutputStreamRequest
    assert [f.name for f in out.DESCRIPTOR.oneofs_by_name["target"].fields] == ["client_uuid", "broadcast"]
    assert dict(out.Broadcast.items()) == {"BROADCAST_ALL": 0, "BROADCAST_ACTIVE": 1, "BROADCAST_NOT_ACTIVE": 2}
    fields = {f.name: (f.number, f.type) for f in upstream_pb2.InputStreamRequest.DESCRIPTOR.fields}
    assert fields == {"time": (1, 9), "client_uuid": (2, 9), "payload": (3, 12)}
    # BROADCAST_ALL is the zero value, yet "sent" is told from "no target" by the oneof.
    message = out(broadcast=out.BROADCAST_ALL)
    assert message.WhichOneof("target") == "broadcast"
    assert out().WhichOneof("target") is None
