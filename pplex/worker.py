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
reaches a set of clients. `stream.node` and `stream.cluster` say which pplex
node opened the stream (its `pplex-node` and `pplex-cluster` headers): nodes
of one cluster relay a broadcast to each other, so `Worker.broadcast` sends it
on one stream per cluster, and on every stream of a pplex that is not in one. Override `is_ready` / `is_live` to drive pplex's
health checks. `python -m pplex.worker --port N` runs the echo worker that
`pplex demo` embeds.

Sessions (README, "Sessions"): override `on_connected` / `on_disconnected`
and the worker announces the "lifecycle" feature in its ready answer, so pplex
tells it when each client arrives and leaves. `stream.close`, `stream.join`,
`stream.leave` and `stream.send_group` act on clients; their first argument
is a client UUID, a `Group("name")` (every member) or a broadcast set
(`BROADCAST_ALL`, `BROADCAST_ACTIVE`, `BROADCAST_NOT_ACTIVE`).

An exception raised by the worker's own code (`on_message`, the lifecycle
methods, `is_ready`, `is_live`, `on_stream_end`) is logged with its traceback
(rate limited, logger `pplex.worker`), counted in `Worker.errors`, and the
stream goes on: one bad message must not cut every client of that pplex.
"""
import argparse
import concurrent.futures
import logging
import queue
import signal
import sys
import threading

import grpc

from pplex._proto import upstream_pb2, upstream_pb2_grpc
from pplex.logs import RateLimited
from pplex.sessions import LIFECYCLE, NODE_HEADER
from pplex.timestamps import rfc3339_now

_Out = upstream_pb2.OutputStreamRequest
_In = upstream_pb2.InputStreamRequest
BROADCAST_ALL = _Out.BROADCAST_ALL
BROADCAST_ACTIVE = _Out.BROADCAST_ACTIVE
BROADCAST_NOT_ACTIVE = _Out.BROADCAST_NOT_ACTIVE
BROADCASTS = (BROADCAST_ALL, BROADCAST_ACTIVE, BROADCAST_NOT_ACTIVE)
MESSAGE, CONNECTED, DISCONNECTED = _In.MESSAGE, _In.CONNECTED, _In.DISCONNECTED
SEND, CLOSE, JOIN, LEAVE = _Out.SEND, _Out.CLOSE, _Out.JOIN, _Out.LEAVE
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_END = object()
log = logging.getLogger("pplex.worker")


class Group(str):
    """A group name as a target: `stream.close(Group("lobby"), b"bye")` acts on every member."""

    __slots__ = ()

    def __repr__(self):
        return f"Group({str.__repr__(self)})"


def _target(to):
    """The OutputStreamRequest target fields for a client UUID, a Group or a broadcast set."""
    if isinstance(to, Group):
        return {"group": to}
    if isinstance(to, str):
        return {"client_uuid": to}
    if isinstance(to, int) and not isinstance(to, bool) and to in BROADCASTS:
        return {"broadcast": to}
    raise TypeError(f"target must be a client UUID (str), a Group or a BROADCAST_* value (got {to!r})")


def _groups(groups):
    if not groups:
        raise ValueError("name at least one group")
    for group in groups:
        if not isinstance(group, str) or not group:
            raise ValueError(f"group names are non-empty strings (got {group!r})")
    return list(groups)


class Stream:
    """One pplex instance's data stream; outputs go back on it, in order.

    `node` is that pplex instance's id (its `pplex-node` request header), or
    None when it sent none; `cluster`: its cluster's name (`pplex-cluster`),
    None when it is not part of one. pplex applies a stream's outputs in the
    order they are sent: a JOIN then a SEND to the group reaches the new member.
    """

    def __init__(self, node=None, cluster=None):
        self._out = queue.SimpleQueue()
        self.node = node
        self.cluster = cluster

    def reply(self, client_uuid, payload):
        self._out.put(_Out(time=rfc3339_now(), client_uuid=client_uuid, payload=payload))

    def broadcast(self, payload, kind=BROADCAST_ALL):
        self._out.put(_Out(time=rfc3339_now(), broadcast=kind, payload=payload))

    def send_group(self, group, payload):
        """`payload` to every member of `group` (on this pplex instance)."""
        self._out.put(_Out(time=rfc3339_now(), group=group, payload=payload))

    def close(self, to, payload=b""):
        """Write `payload` (if any) to the target client(s), then close them once it is flushed.

        `to`: a client UUID, a `Group`, or a BROADCAST_* set. Their DISCONNECTED
        reason is `closed_by_worker`.
        """
        self._out.put(_Out(time=rfc3339_now(), action=CLOSE, payload=payload, **_target(to)))

    def join(self, to, *groups):
        """Add the target client(s) to each of `groups` (ValueError if none)."""
        self._out.put(_Out(time=rfc3339_now(), action=JOIN, groups=_groups(groups), **_target(to)))

    def leave(self, to, *groups):
        """Remove the target client(s) from each of `groups` (ValueError if none)."""
        self._out.put(_Out(time=rfc3339_now(), action=LEAVE, groups=_groups(groups), **_target(to)))

    def send_raw(self, message):
        """Send an OutputStreamRequest as it is (tests use it to misbehave on purpose)."""
        self._out.put(message)

    def end(self):
        self._out.put(_END)


class Worker:
    """Base class: override `on_message`; optionally `on_connected`, `on_disconnected`, `is_ready`,
    `is_live`, `on_stream_end`."""

    def __init__(self):
        self._streams = {}  # Stream -> None: an ordered set
        self._lock = threading.Lock()
        self._errors_log = RateLimited()
        self.errors = 0       # exceptions raised by this worker's own methods, contained
        self.server = None
        self.port = None

    # -- what a worker overrides -------------------------------------------
    def on_message(self, stream, client_uuid, payload):
        """One client message. Reply with `stream.reply(client_uuid, data)`."""

    def on_connected(self, stream, client_uuid, metadata):
        """A client arrived (only with "lifecycle", announced when this or `on_disconnected` is
        overridden). `metadata`: dict of str, see README "Sessions". Comes before its messages."""

    def on_disconnected(self, stream, client_uuid, reason):
        """A client is gone; `reason` is one of README "Sessions"' reasons (e.g. "client_closed").
        At most once: a broken stream means no more news of that node's clients on it."""

    def is_ready(self):
        return True

    def is_live(self):
        return True

    def on_stream_end(self, stream):
        """A pplex data stream ended."""

    # -- tools ---------------------------------------------------------------
    def features(self):
        """ReadyResult.features: "lifecycle" when a lifecycle method is overridden."""
        cls = type(self)
        if cls.on_connected is not Worker.on_connected or cls.on_disconnected is not Worker.on_disconnected:
            return [LIFECYCLE]
        return []

    def broadcast(self, payload, kind=BROADCAST_ALL):
        """Broadcast to every client of every pplex connected: once per cluster, once per lone pplex."""
        for stream in self._one_per_cluster():
            stream.broadcast(payload, kind)

    def send_group(self, group, payload):
        """Send to `group` on every pplex connected (once per cluster: its nodes relay to each other)."""
        for stream in self._one_per_cluster():
            stream.send_group(group, payload)

    def _one_per_cluster(self):
        clusters = set()
        for stream in self.streams():
            if stream.cluster is not None:
                if stream.cluster in clusters:
                    continue  # its nodes relay it to each other
                clusters.add(stream.cluster)
            yield stream

    def streams(self):
        """The open data streams (one per connected pplex node), oldest first."""
        with self._lock:
            return list(self._streams)

    def stream_count(self):
        with self._lock:
            return len(self._streams)

    def contained(self, where, client_uuid=None):
        """Call from an `except` block: count and log (rate limited per `where`) the error, go on."""
        with self._lock:
            self.errors += 1
        who = f" for client {client_uuid}" if client_uuid else ""
        self._errors_log.log(log, logging.ERROR, where, "%s raised%s; the stream goes on", where, who,
                             exc_info=True)

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
        for stream in self.streams():
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
        headers = dict(context.invocation_metadata() or ())
        stream = Stream(headers.get(NODE_HEADER), headers.get("pplex-cluster"))
        with worker._lock:
            worker._streams[stream] = None
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
                worker._streams.pop(stream, None)
            try:
                worker.on_stream_end(stream)
            except Exception:
                worker.contained("on_stream_end")

    def _read(self, stream, request_iterator):
        worker = self.worker
        on_message = worker.on_message
        on_connected = worker.on_connected
        on_disconnected = worker.on_disconnected
        try:
            for request in request_iterator:
                kind = request.kind
                try:
                    if kind == MESSAGE:
                        on_message(stream, request.client_uuid, request.payload)
                    elif kind == CONNECTED:
                        on_connected(stream, request.client_uuid, dict(request.metadata))
                    elif kind == DISCONNECTED:
                        on_disconnected(stream, request.client_uuid, request.metadata.get("reason", ""))
                    else:  # a kind newer than this SDK: nothing to do with it
                        worker._errors_log.warning(log, "kind", "input of unknown kind %d ignored", kind)
                except Exception:
                    worker.contained(_HANDLERS.get(kind, "handler"), request.client_uuid)
        except grpc.RpcError:
            pass
        finally:
            stream.end()

    def ready(self, request, context):
        try:
            ready = bool(self.worker.is_ready())
        except Exception:
            self.worker.contained("is_ready")
            ready = False
        return upstream_pb2.ReadyResult(time=rfc3339_now(), ready=ready, features=self.worker.features())

    def live(self, request_iterator, context):
        for _ in request_iterator:
            try:
                live = bool(self.worker.is_live())
            except Exception:
                self.worker.contained("is_live")
                live = False
            yield upstream_pb2.LiveResult(time=rfc3339_now(), live=live)


_HANDLERS = {MESSAGE: "on_message", CONNECTED: "on_connected", DISCONNECTED: "on_disconnected"}


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
