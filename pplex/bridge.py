"""The grpcio transport: one channel and one long-lived bidi stream per worker.

Owns everything grpcio: channels, the data stream fed from a batch slot, the
reader that turns worker messages into events, the ready probe and the live
heartbeat stream. grpcio's threads do the I/O; every event reaches the core
through `Reactor.call_soon_threadsafe`, so the reactor never blocks on gRPC.

Hand-offs are per batch, not per message: the reactor offers a whole batch
(one lock, one notify), and the request generator turns it into messages on
grpcio's thread.
"""
import concurrent.futures
import logging
import threading
import time

import grpc
from google.protobuf import empty_pb2

from pplex._proto import upstream_pb2, upstream_pb2_grpc
from pplex.grpctls import make_channel, tls_detail
from pplex.transport import Link, Transport

log = logging.getLogger("pplex.bridge")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    # grpc's own reconnect backoff grows to 120 s by default; pplex runs its
    # own retry cycle, so the channel must try again when pplex asks.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A removed and re-added worker must get a fresh connection, not a shared one.
    ("grpc.use_local_subchannel_pool", 1),
]
_EMPTY = empty_pb2.Empty()


def grpc_target(host, port):
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def describe_rpc_error(error, server_name=None):
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return tls_detail(error.details(), server_name) or f"{error.code().name}: {error.details()}"
    return repr(error)


class GrpcTransport(Transport):
    def __init__(self, reactor, max_threads=256):
        self.reactor = reactor
        # Threads are made on demand: two per worker (data and live readers).
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="pplex-bridge")

    def connect(self, upstream, events):
        return GrpcLink(self, upstream.host, upstream.port, events, getattr(upstream, "tls", None))

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class GrpcLink(Link):
    def __init__(self, transport, host, port, events, tls=None):
        self.target = grpc_target(host, port)
        self.server_name = (tls.get("server_name") if isinstance(tls, dict) else None) or host
        self.events = events
        self.closed = False
        self._pool = transport.pool
        self._post = transport.reactor.call_soon_threadsafe
        self._channel = make_channel(self.target, tls, CHANNEL_OPTIONS)
        self._stub = upstream_pb2_grpc.UpstreamPeerServiceStub(self._channel)
        self._stream = None   # the current _StreamState
        self._live = None
        self._live_stop = None
        # Latest round trips in seconds, for metrics (plain floats: read from any thread).
        self.ready_seconds = None
        self.live_seconds = None

    # -- readiness -----------------------------------------------------------
    def probe_ready(self, timeout):
        started = time.monotonic()
        future = self._stub.ready.future(_EMPTY, timeout=timeout)
        future.add_done_callback(lambda done: self._ready_answered(done, started))

    def _ready_answered(self, future, started):
        try:
            ok = future.result().ready
            self.ready_seconds = time.monotonic() - started
            detail = "ready" if ok else "worker answered ready=false"
        except Exception as error:  # grpc.RpcError or cancellation
            ok, detail = False, describe_rpc_error(error, self.server_name)
        self._post(self._emit, self.events.on_ready, ok, detail)

    def _emit(self, handler, *args):
        if not self.closed:
            handler(self, *args)

    # -- data stream ---------------------------------------------------------
    def open_stream(self):
        state = _StreamState()
        state.call = self._stub.bidirectionalStreaming(self._requests(state))
        self._stream = state
        self._pool.submit(self._read, state)

    def offer(self, batch):
        state = self._stream
        if state is None:
            return False
        with state.cond:
            if state.done or state.next is not None:
                state.want_drain = True
                return False
            state.next = batch
            state.cond.notify()
            return True

    def _requests(self, state):
        """The request iterator grpcio's sending thread consumes: batches become messages."""
        make = upstream_pb2.InputStreamRequest
        cond = state.cond
        while True:
            with cond:
                while state.next is None and not state.done:
                    cond.wait()
                if state.done:
                    return
                batch, state.next = state.next, None
                state.current, state.claimed = batch, 0
                drained, state.want_drain = state.want_drain, False
            if drained:
                self._post(self._emit, self.events.on_drained)
            for i in range(0, len(batch), 3):
                # Claim before checking: stop_stream() sets done and then
                # reads claimed, so a claimed message is never handed out twice.
                state.claimed = i + 3
                if state.done:
                    return
                # Written once handed to grpcio, not once it asks for the next one:
                # its answer may come back before that, and a message counted
                # after its answer would look unanswered until the next answer.
                state.written += 1
                payload = batch[i + 1]
                if payload.__class__ is bytearray:  # raw bytes merged by the proxy
                    payload = bytes(payload)
                yield make(client_uuid=batch[i], payload=payload, time=batch[i + 2])
            with cond:
                state.current = None

    def _read(self, state):
        post, emit, events = self._post, self._emit, self.events
        try:
            for out in state.call:
                # Streams keep order: what was written before this answer was read by the worker.
                state.written_at_answer = state.written
                which = out.WhichOneof("target")
                if which == "client_uuid":
                    post(emit, events.on_reply, out.client_uuid, out.payload)
                elif which == "broadcast":
                    post(emit, events.on_broadcast, out.broadcast, out.payload)
                else:
                    post(emit, events.on_bad_message, "message with no target")
            detail = "worker ended the data stream"
        except Exception as error:
            detail = describe_rpc_error(error)
        with state.cond:
            state.done = True
            state.cond.notify_all()
        if self._stream is state:
            post(emit, events.on_stream_closed, detail)

    def unanswered(self):
        state = self._stream
        if state is None:
            return 0
        with state.cond:
            waiting = len(state.next) // 3 if state.next is not None else 0
            if state.current is not None:
                waiting += (len(state.current) - state.claimed) // 3
        return waiting + state.written - state.written_at_answer

    def stop_stream(self):
        state, self._stream = self._stream, None
        if state is None:
            return [], 0
        with state.cond:
            state.done = True
            state.cond.notify_all()
            unsent = []
            if state.current is not None:
                unsent.extend(state.current[state.claimed:])
                state.current = None
            if state.next is not None:
                unsent.extend(state.next)
                state.next = None
        state.call.cancel()
        return unsent, max(0, state.written - state.written_at_answer)

    # -- liveness ------------------------------------------------------------
    def start_live(self, interval):
        self.stop_live()
        stop = threading.Event()
        sent_at = [0.0]

        def heartbeats():
            while not stop.is_set():
                sent_at[0] = time.monotonic()
                yield _EMPTY
                stop.wait(interval)

        call = self._stub.live(heartbeats())
        self._live, self._live_stop = call, stop
        self._pool.submit(self._read_live, call, stop, sent_at)

    def _read_live(self, call, stop, sent_at):
        try:
            for answer in call:
                self.live_seconds = time.monotonic() - sent_at[0]
                self._post(self._emit, self.events.on_live, answer.live,
                           "live" if answer.live else "worker answered live=false")
            detail = "worker ended the live stream"
        except Exception as error:
            detail = describe_rpc_error(error)
        if not stop.is_set():
            self._post(self._emit, self.events.on_live, False, detail)

    def stop_live(self):
        if self._live_stop is not None:
            self._live_stop.set()
            self._live.cancel()
            self._live = self._live_stop = None

    def close(self):
        self.closed = True
        self.stop_live()
        self.stop_stream()
        self._channel.close()


class _StreamState:
    """One data stream's hand-off slot; a reopened stream gets a fresh one."""

    __slots__ = ("cond", "call", "next", "want_drain", "current", "claimed", "done",
                 "written", "written_at_answer")

    def __init__(self):
        self.cond = threading.Condition()
        self.call = None
        self.next = None          # the batch offered, not yet taken by the writer
        self.want_drain = False   # an offer was refused: report on_drained
        self.current = None       # the batch being written
        self.claimed = 0          # items of current claimed by the writer
        self.done = False
        self.written = 0          # messages handed to grpcio
        self.written_at_answer = 0  # `written` when the worker's latest message arrived
