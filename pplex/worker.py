"""The Python worker SDK: write an upstream worker by overriding one method.

    from pplex.worker import Worker

    class Shout(Worker):
        def on_message(self, stream, client_uuid, payload):
            stream.reply(client_uuid, payload.upper())

    Shout().serve(port=50051).wait()

A worker is a gRPC server for `proto/upstream.proto`. Each pplex instance
opens one data stream to it; `on_message` runs for every client message, in
order per stream, on that stream's reader thread. `stream.reply` answers one
client; `stream.broadcast` (or `Worker.broadcast`, for every connected pplex)
reaches a set of clients. Override `is_ready` / `is_live` to drive pplex's
health checks. `python -m pplex.worker --port N` runs the echo worker that
`pplex demo` embeds.
"""
import argparse
import concurrent.futures
import queue
import signal
import sys
import threading

import grpc

from pplex._proto import upstream_pb2, upstream_pb2_grpc
from pplex.timestamps import rfc3339_now

BROADCAST_ALL = upstream_pb2.OutputStreamRequest.BROADCAST_ALL
BROADCAST_ACTIVE = upstream_pb2.OutputStreamRequest.BROADCAST_ACTIVE
BROADCAST_NOT_ACTIVE = upstream_pb2.OutputStreamRequest.BROADCAST_NOT_ACTIVE
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_END = object()


class Stream:
    """One pplex instance's data stream; replies go back on it, in order."""

    def __init__(self):
        self._out = queue.SimpleQueue()

    def reply(self, client_uuid, payload):
        self._out.put(upstream_pb2.OutputStreamRequest(
            time=rfc3339_now(), client_uuid=client_uuid, payload=payload))

    def broadcast(self, payload, kind=BROADCAST_ALL):
        self._out.put(upstream_pb2.OutputStreamRequest(time=rfc3339_now(), broadcast=kind, payload=payload))

    def send_raw(self, message):
        """Send an OutputStreamRequest as it is (tests use it to misbehave on purpose)."""
        self._out.put(message)

    def end(self):
        self._out.put(_END)


class Worker:
    """Base class: override `on_message`; optionally `is_ready`, `is_live`, `on_stream_end`."""

    def __init__(self):
        self._streams = set()
        self._lock = threading.Lock()
        self.server = None
        self.port = None

    # -- what a worker overrides -------------------------------------------
    def on_message(self, stream, client_uuid, payload):
        """One client message. Reply with `stream.reply(client_uuid, data)`."""

    def is_ready(self):
        return True

    def is_live(self):
        return True

    def on_stream_end(self, stream):
        """A pplex data stream ended."""

    # -- tools ---------------------------------------------------------------
    def broadcast(self, payload, kind=BROADCAST_ALL):
        """Broadcast on every open data stream (every pplex connected)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.broadcast(payload, kind)

    def stream_count(self):
        with self._lock:
            return len(self._streams)

    def serve(self, port=0, host="127.0.0.1", max_threads=64, credentials=None):
        """Start serving in background threads; returns self (see `port`, `stop`, `wait`).

        `credentials`: `grpc.ssl_server_credentials(...)` to serve TLS (pplex's
        upstream `tls` setting), or None for plaintext.
        """
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_threads),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0)])
        upstream_pb2_grpc.add_UpstreamPeerServiceServicer_to_server(_Servicer(self), self.server)
        bound_host = f"[{host}]" if ":" in host else host
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{bound_host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{bound_host}:{port}", credentials)
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}")
        self.server.start()
        return self

    def stop(self, grace=None):
        if self.server is not None:
            self.server.stop(grace).wait()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.end()

    def wait(self):
        self.server.wait_for_termination()


class EchoWorker(Worker):
    """Returns each payload to its sender, unchanged."""

    def on_message(self, stream, client_uuid, payload):
        stream.reply(client_uuid, payload)


class _Servicer(upstream_pb2_grpc.UpstreamPeerServiceServicer):
    def __init__(self, worker):
        self.worker = worker

    def bidirectionalStreaming(self, request_iterator, context):
        worker = self.worker
        stream = Stream()
        with worker._lock:
            worker._streams.add(stream)
        context.add_callback(stream.end)
        threading.Thread(target=self._read, args=(stream, request_iterator),
                         name="pplex-worker-reader", daemon=True).start()
        try:
            out = stream._out
            while True:
                message = out.get()
                if message is _END:
                    return
                yield message
        finally:
            with worker._lock:
                worker._streams.discard(stream)
            worker.on_stream_end(stream)

    def _read(self, stream, request_iterator):
        on_message = self.worker.on_message
        try:
            for request in request_iterator:
                on_message(stream, request.client_uuid, request.payload)
        except grpc.RpcError:
            pass
        finally:
            stream.end()

    def ready(self, request, context):
        return upstream_pb2.ReadyResult(time=rfc3339_now(), ready=bool(self.worker.is_ready()))

    def live(self, request_iterator, context):
        for _ in request_iterator:
            yield upstream_pb2.LiveResult(time=rfc3339_now(), live=bool(self.worker.is_live()))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pplex.worker", description="Run the echo worker.")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    worker = EchoWorker().serve(args.port, args.host)
    print(f"listening on {args.host}:{worker.port} mode=echo", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    worker.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
