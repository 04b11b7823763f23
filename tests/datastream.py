"""pplex's side of a worker's data stream, for tests that talk to a worker without pplex.

`DataStream(port, node)` opens `bidirectionalStreaming` with the `pplex-node`
header, sends InputStreamRequests (messages and lifecycle events) and reads
the OutputStreamRequests back with a deadline; `ready_of(port)` asks `ready`.
"""
import queue
import threading

import grpc
from google.protobuf import empty_pb2

from pplex._proto import upstream_pb2, upstream_pb2_grpc

In = upstream_pb2.InputStreamRequest
MESSAGE, CONNECTED, DISCONNECTED = In.MESSAGE, In.CONNECTED, In.DISCONNECTED
TIMEOUT = 5.0


class DataStream:
    """pplex's side of one data stream: send inputs, read outputs (with a deadline)."""

    def __init__(self, port, node="node-1"):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = upstream_pb2_grpc.UpstreamPeerServiceStub(self.channel)
        self.requests = queue.SimpleQueue()
        self.outputs = queue.SimpleQueue()
        metadata = [("pplex-node", node)] if node else None
        self.call = stub.bidirectionalStreaming(iter(self.requests.get, None), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for out in self.call:
                self.outputs.put(out)
        except grpc.RpcError:
            pass

    def send(self, client_uuid, payload=b"", kind=MESSAGE, **metadata):
        self.requests.put(In(time="2026-11-25T05:39:01.000000Z", client_uuid=client_uuid, payload=payload,
                             kind=kind, metadata=metadata))

    def next(self, timeout=TIMEOUT):
        return self.outputs.get(timeout=timeout)

    def close(self):
        self.requests.put(None)
        self.channel.close()


def ready_of(port, timeout=TIMEOUT):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return upstream_pb2_grpc.UpstreamPeerServiceStub(channel).ready(empty_pb2.Empty(), timeout=timeout)
    finally:
        channel.close()
