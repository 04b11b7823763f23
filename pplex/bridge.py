"""The grpcio transport: one channel and one long-lived bidi stream per worker.

Owns everything grpcio: channels, the data stream fed from a batch slot, the
reader that turns worker messages into events, the ready probe and the live
heartbeat stream. grpcio's threads do the I/O; events reach the core only
through `Reactor.call_soon_threadsafe`, so the reactor never blocks on gRPC.

Hand-offs are per batch, both ways: the reactor offers a whole batch (one
lock, one notify), and the request generator turns it into messages on
grpcio's thread; the reader thread puts worker messages in an inbox and wakes
the reactor once per burst, and the reactor takes the whole inbox at once.
The inbox is bounded: when it is full, or while the core paused replies
(clients are behind), the reader stops reading, so grpcio's HTTP/2 flow
control pushes back on the worker instead of memory growing here.

A worker that stops gracefully (grpcio's and grpc-go's `stop(grace)`: HTTP/2
GOAWAY, open streams served until the grace ends) moves the channel to IDLE
while the data stream still works; that is reported as `on_goaway`. A crash
also ends in IDLE, but its stream fails at once, which is reported first.
"""
import concurrent.futures
import logging
import threading
import time

import grpc
from google.protobuf import empty_pb2

from pplex import limits, node
from pplex._proto import upstream_pb2, upstream_pb2_grpc
from pplex.grpctls import make_channel, tls_detail
from pplex.logs import FAULTS, RateLimited
from pplex.transport import CLEAN_END, Event, Link, Transport

log = logging.getLogger("pplex.bridge")

# Bytes of worker messages waiting for the reactor above which the reader stops reading the stream.
INBOX_LIMIT_BYTES = 1024 * 1024
# After the channel goes IDLE, the data stream must still be open this much later to be a GOAWAY.
GOAWAY_CHECK_SECONDS = 0.1
_EMPTY = empty_pb2.Empty()


def channel_options(max_message_bytes):
    return [
        # grpc's own reconnect backoff grows to 120 s by default; pplex runs its
        # own retry cycle, so the channel must try again when pplex asks.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A removed and re-added worker must get a fresh connection, not a shared one.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def grpc_target(host, port):
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def describe_rpc_error(error, server_name=None):
    """One printable line: grpcio's details may span lines and (out of descriptors) carry raw bytes."""
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        details = error.details() or ""
        line = "".join(c for c in (details.splitlines() or [""])[0] if c.isprintable())
        return tls_detail(details, server_name) or f"{error.code().name}: {line}"
    return repr(error)


class _Repeats(logging.Filter):
    """grpcio's own log lines repeat at every failed connect (with a traceback when out of
    descriptors): at most one per message per interval goes through."""

    def __init__(self):
        super().__init__()
        self.limiter = RateLimited()

    def filter(self, record):
        return self.limiter.allow(str(record.msg)[:120])[0]


logging.getLogger("grpc._cython.cygrpc").addFilter(_Repeats())


class GrpcTransport(Transport):
    def __init__(self, reactor, max_threads=256):
        self.reactor = reactor
        # Threads are made on demand: two per worker (data and live readers).
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="pplex-bridge")

    def connect(self, upstream, events):
        return GrpcLink(self, upstream.host, upstream.port, events, upstream.max_message_bytes,
                        getattr(upstream, "tls", None))

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class GrpcLink(Link):
    def __init__(self, transport, host, port, events, max_message_bytes=limits.MAX_MESSAGE_BYTES.default,
                 tls=None):
        self.target = grpc_target(host, port)
        self.server_name = (tls.get("server_name") if isinstance(tls, dict) else None) or host
        self.events = events
        self.closed = False
        self._pool = transport.pool
        self._reactor = transport.reactor
        self._post = transport.reactor.call_soon_threadsafe
        self._channel = make_channel(self.target, tls, channel_options(max_message_bytes))
        self._channel.subscribe(self._connectivity)
        self._stub = upstream_pb2_grpc.UpstreamPeerServiceStub(self._channel)
        self._stream = None   # the current _StreamState
        self._live = None
        self._live_stop = None
        self._replies_paused = False
        # Latest round trips in seconds, for metrics (plain floats: read from any thread).
        self.ready_seconds = None
        self.live_seconds = None

    def _emit(self, handler, *args):
        if not self.closed:
            handler(self, *args)

    # -- readiness -----------------------------------------------------------
    def probe_ready(self, timeout):
        started = time.monotonic()
        future = self._stub.ready.future(_EMPTY, timeout=timeout, metadata=node.current.metadata)
        future.add_done_callback(lambda done: self._ready_answered(done, started))

    def _ready_answered(self, future, started):
        features = ()
        try:
            answer = future.result()
            ok = answer.ready
            features = tuple(answer.features)
            self.ready_seconds = time.monotonic() - started
            detail = "ready" if ok else "worker answered ready=false"
        except Exception as error:  # grpc.RpcError or cancellation
            ok, detail = False, describe_rpc_error(error, self.server_name)
        self._post(self._emit, self.events.on_ready, ok, detail, features)

    # -- data stream ---------------------------------------------------------
    def open_stream(self):
        state = _StreamState(self.keep_unconfirmed, self._replies_paused)
        state.call = self._stub.bidirectionalStreaming(self._requests(state), metadata=node.current.metadata)
        self._stream = state
        self._pool.submit(self._read, state)

    def offer(self, batch):
        state = self._stream
        if state is None:
            return False
        with state.cond:
            if state.done or state.closing or state.next is not None:
                state.want_drain = True
                return False
            state.next = batch
            state.cond.notify_all()
            return True

    def _requests(self, state):
        """The request iterator grpcio's sending thread consumes: batches become messages."""
        make = upstream_pb2.InputStreamRequest
        cond = state.cond
        while True:
            with cond:
                while state.next is None and not state.done and not state.closing:
                    cond.wait()
                if state.done or state.next is None:  # stopped, or half-closed with nothing left
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
                if payload.__class__ is not bytes:
                    if payload.__class__ is Event:  # a lifecycle input: kind and metadata, no payload
                        yield make(client_uuid=batch[i], time=batch[i + 2], kind=payload.kind,
                                   metadata=payload.metadata)
                        continue
                    payload = bytes(payload)  # raw bytes merged by the proxy (a bytearray)
                yield make(client_uuid=batch[i], payload=payload, time=batch[i + 2])
            with cond:
                if state.kept is not None:
                    state.keep(batch)
                state.current = None

    def _read(self, state):
        """The reader thread: worker messages into the inbox, one reactor wake-up per burst."""
        cond = state.cond
        try:
            for out in state.call:
                with cond:
                    # Streams keep order: what was written before this answer was read by the worker.
                    state.answered()
                    while (state.paused or state.inbox_bytes >= INBOX_LIMIT_BYTES) and not state.done:
                        cond.wait()
                    if state.done:
                        break
                    state.inbox.append(out)
                    state.inbox_bytes += len(out.payload) + 64
                    wake = not state.wake_posted
                    state.wake_posted = True
                if wake:
                    self._post(self._deliver, state)
            detail = CLEAN_END
        except Exception as error:
            detail = describe_rpc_error(error)
        with cond:
            state.done = True
            state.reader_done = True
            cond.notify_all()
        if self._stream is state:
            self._post(self._deliver, state, detail)

    def _deliver(self, state, ended=None):
        """Reactor thread: hand the inbox's messages to the core, then the stream's end if it came."""
        if self._replies_paused and ended is None:
            return  # kept (wake_posted stays set): resume_replies delivers it
        with state.cond:
            inbox, state.inbox = state.inbox, []
            state.inbox_bytes = 0
            state.wake_posted = False
            state.cond.notify_all()
        if self.closed or self._stream is not state:
            return
        events = self.events
        for out in inbox:
            try:
                # SEND (action 0) to a client or a set is the base contract; anything else is an action.
                # Kept in step with h2link.py _DataCall.messages: inline in both, not a shared function, since it
                # runs once per worker message on the hot path.
                which = out.WhichOneof("target")
                if which == "client_uuid":
                    if out.action:
                        events.on_action(self, out.action, which, out.client_uuid, out.payload, out.groups)
                    else:
                        events.on_reply(self, out.client_uuid, out.payload)
                elif which == "broadcast":
                    if out.action:
                        events.on_action(self, out.action, which, out.broadcast, out.payload, out.groups)
                    else:
                        events.on_broadcast(self, out.broadcast, out.payload)
                elif which == "group":
                    events.on_action(self, out.action, which, out.group, out.payload, out.groups)
                else:
                    events.on_bad_message(self, "message with no target")
            except Exception:
                FAULTS.report("link event", "a message from upstream %s", self.target, logger=log)
            if self._stream is not state:  # a handler stopped the stream
                return
        if ended is not None:
            events.on_stream_closed(self, ended)

    def _connectivity(self, connectivity):
        """grpcio's thread: the channel's state changed. IDLE under an open stream may be a GOAWAY."""
        if connectivity is grpc.ChannelConnectivity.IDLE and self._stream is not None:
            self._post(self._idle_seen, self._stream)

    def _idle_seen(self, state):
        self._reactor.call_later(GOAWAY_CHECK_SECONDS, self._goaway_check, state)

    def _goaway_check(self, state):
        if self._stream is state and not state.done and not self.closed:
            self.events.on_goaway(self, "GOAWAY (the worker is stopping gracefully)")

    def progress(self):
        state = self._stream
        return state.written if state is not None else 0

    def backlog(self):
        state = self._stream
        if state is None:
            return 0
        with state.cond:
            waiting = len(state.next) // 3 if state.next is not None else 0
            if state.current is not None:
                waiting += (len(state.current) - state.claimed) // 3
        return waiting

    def unanswered(self):
        state = self._stream
        if state is None:
            return 0
        return self.backlog() + state.written - state.written_at_answer

    def close_send(self):
        state = self._stream
        if state is not None:
            with state.cond:
                state.closing = True
                state.cond.notify_all()

    def pause_replies(self):
        self._replies_paused = True
        self._set_paused(True)

    def resume_replies(self):
        self._replies_paused = False
        self._set_paused(False)
        state = self._stream
        if state is not None and state.inbox:
            self._deliver(state)

    def _set_paused(self, paused):
        state = self._stream
        if state is not None:
            with state.cond:
                state.paused = paused
                state.cond.notify_all()

    def stop_stream(self):
        state, self._stream = self._stream, None
        if state is None:
            return [], 0, []
        with state.cond:
            state.done = True
            state.cond.notify_all()
            unsent = []
            resend = state.take_kept()
            if state.current is not None:
                if state.kept is not None:
                    resend.extend(state.current[state.confirmed:state.claimed])
                unsent.extend(state.current[state.claimed:])
                state.current = None
            if state.next is not None:
                unsent.extend(state.next)
                state.next = None
            unconfirmed = max(0, state.written - state.written_at_answer - len(resend) // 3)
        state.call.cancel()
        return unsent, unconfirmed, resend

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

        call = self._stub.live(heartbeats(), metadata=node.current.metadata)
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
        try:
            self._channel.unsubscribe(self._connectivity)
        except ValueError:
            pass
        self._channel.close()


class _StreamState:
    """One data stream's hand-off slots (both ways); a reopened stream gets a fresh one.

    Every field is read and written under `cond`, but `written`, which only the
    request generator changes and the others only read.
    """

    __slots__ = ("cond", "call", "next", "want_drain", "current", "claimed", "done", "closing",
                 "written", "written_at_answer", "confirmed", "kept", "kept_bytes",
                 "inbox", "inbox_bytes", "wake_posted", "paused", "reader_done")

    def __init__(self, keep_unconfirmed, paused):
        self.cond = threading.Condition()
        self.call = None
        self.next = None          # the batch offered, not yet taken by the writer
        self.want_drain = False   # an offer was refused: report on_drained
        self.current = None       # the batch being written
        self.claimed = 0          # items of current claimed by the writer
        self.done = False
        self.closing = False      # close_send: end the request stream once nothing is left
        self.written = 0          # messages handed to grpcio
        self.written_at_answer = 0  # `written` when the worker's latest message arrived
        self.confirmed = 0        # items of current written before the worker's latest message
        self.kept = [] if keep_unconfirmed else None   # written, unconfirmed batches (redeliver)
        self.kept_bytes = 0
        self.inbox = []           # worker messages for the reactor
        self.inbox_bytes = 0      # their payloads' size, about
        self.wake_posted = False
        self.paused = paused
        self.reader_done = False

    def answered(self):
        self.written_at_answer = self.written
        self.confirmed = self.claimed if self.current is not None else 0
        if self.kept:
            self.kept = []
            self.kept_bytes = 0

    def keep(self, batch):
        rest = batch[self.confirmed:]
        self.confirmed = 0
        if not rest:
            return
        self.kept.append(rest)
        self.kept_bytes += sum(len(p) for p in rest[1::3])
        while self.kept_bytes > limits.REDELIVER_KEEP_BYTES and len(self.kept) > 1:
            dropped = self.kept.pop(0)
            self.kept_bytes -= sum(len(p) for p in dropped[1::3])

    def take_kept(self):
        resend = []
        if self.kept:
            for batch in self.kept:
                resend += batch
            self.kept = []
        return resend
