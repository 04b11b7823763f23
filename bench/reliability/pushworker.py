"""The slow-consumer section's worker: echoes every message, and streams a push on request.

    python -m bench.reliability.pushworker --port N

A gRPC server for `proto/upstream.proto` (grpcio). Each input is echoed to its
sender, except `push COUNT SIZE`: that client is then sent COUNT replies of
SIZE bytes, one after another, on the same data stream as every echo. Echoes
go first (a reply waiting is always sent before the next push chunk), so
what slows the other clients down is pplex, not this worker's queue.

The push is produced as fast as the stream takes it: the response generator
yields one chunk at a time, and grpcio asks for the next one only when the
previous one was handed to HTTP/2, whose flow control follows pplex's reads.
The worker never holds more than one chunk, whatever COUNT x SIZE is.

stdout carries one JSON line per event, `t` being CLOCK_MONOTONIC (the same
clock in every process of the machine, so the harness can compare it with
its own `time.monotonic()`):
    {"event": "listening", "port": N}
    {"event": "push_start", "t": ..., "count": C, "size": S}   (first chunk handed to grpcio)
    {"event": "push_end", "t": ..., "bytes": B}                (last chunk handed to grpcio)
"""
import argparse
import concurrent.futures
import json
import queue
import signal
import sys
import threading
import time

import grpc

from pplex._proto import upstream_pb2, upstream_pb2_grpc

MAX_PUSH_BYTES = 64 * 1024 ** 3   # a push is bounded: at most 64 GiB in all
MAX_CHUNK_BYTES = 4 * 1024 ** 2   # and each chunk within gRPC's default message limit
_Out = upstream_pb2.OutputStreamRequest


def event(name, **fields):
    sys.stdout.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stdout.flush()


def parse_push(payload):
    """`push COUNT SIZE` -> (count, size), or None for anything else (echoed)."""
    if not payload.startswith(b"push "):
        return None
    try:
        count, size = (int(x) for x in payload.split()[1:3])
    except ValueError:
        return None
    if not (0 < count and 0 < size <= MAX_CHUNK_BYTES and count * size <= MAX_PUSH_BYTES):
        return None
    return count, size


class PushServicer(upstream_pb2_grpc.UpstreamPeerServiceServicer):
    def bidirectionalStreaming(self, request_iterator, context):
        inbox = queue.SimpleQueue()   # echo replies and push orders, in arrival order; None ends it
        threading.Thread(target=self._read, args=(request_iterator, inbox), daemon=True).start()
        push_left, chunk, pushed = 0, None, 0
        while True:
            if push_left:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    if pushed == 0:
                        event("push_start", t=time.monotonic(), count=push_left, size=len(chunk.payload))
                    yield chunk
                    pushed += len(chunk.payload)
                    push_left -= 1
                    if not push_left:
                        event("push_end", t=time.monotonic(), bytes=pushed)
                    continue
            else:
                item = inbox.get()
            if item is None:
                return
            if item.__class__ is tuple:
                uuid, (count, size) = item
                push_left, pushed = count, 0
                chunk = _Out(client_uuid=uuid, payload=b"p" * size)
            else:
                yield item

    @staticmethod
    def _read(request_iterator, inbox):
        try:
            for request in request_iterator:
                order = parse_push(request.payload)
                if order is None:
                    inbox.put(_Out(client_uuid=request.client_uuid, payload=request.payload))
                else:
                    inbox.put((request.client_uuid, order))
        except grpc.RpcError:
            pass
        finally:
            inbox.put(None)

    def ready(self, request, context):
        return upstream_pb2.ReadyResult(ready=True)

    def live(self, request_iterator, context):
        for _ in request_iterator:
            yield upstream_pb2.LiveResult(live=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.reliability.pushworker", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_send_message_length", MAX_CHUNK_BYTES + 1024)])
    upstream_pb2_grpc.add_UpstreamPeerServiceServicer_to_server(PushServicer(), server)
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    event("listening", port=port)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=0.5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
