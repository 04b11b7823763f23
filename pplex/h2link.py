"""The h2 transport: gRPC over HTTP/2 inside the reactor thread, h2c (prior knowledge) or TLS.

One nonblocking TCP connection per worker, registered in pplex's own selector
and driven by the `h2` state machine; no threads, no queues. With the
upstream's `tls` set, the connection runs TLS (`pplex.tlssock`, ALPN `h2`
required, `:scheme https`; see `_TlsConnection`). Every
`LinkEvents` call happens directly on the reactor thread, but never from
inside a method the core called (`offer`, `probe_ready`, ...): those defer
with `Reactor.call_soon`.

Why: the grpcio transport costs one trip through grpcio per message. Here a
whole batch becomes one buffer of gRPC messages (flag 0, 4-byte big-endian
length, protobuf bytes), written in as few DATA frames as the peer's flow
control windows and frame size allow, and usually one send().

The data stream's replies skip h2's frame objects: once its response headers
are in, `FrameScanner` hands its plain DATA frames straight to the call's
message reader, a run of them at a time (usually one message each), and the link gives their flow-control window back itself
(WINDOW_UPDATE for the connection and the stream). Every other frame, the
data stream's trailers included, goes through h2 in order. This halves the
cost of a reply in the reactor thread.

Calls on the connection:
  ready   a unary call on its own stream; deadline by `grpc-timeout` and a reactor timer
  data    the long-lived bidi stream: batches out, OutputStreamRequest in
  live    a bidi stream; an empty message every interval (reactor timer), LiveResult in

Connection policy: a link keeps one connection while the worker is in
rotation. It makes a fresh one for a probe when there is none, and drops it
when the data stream stops (`stop_stream`) or a ready probe times out, so a
worker that left rotation (frozen, half-dead) is always probed on a new
connection.

GOAWAY: h2 treats a received GOAWAY as the end of the connection and raises on
any later frame, losing the events of the frames before it in the same read.
gRPC servers stop gracefully with GOAWAY, PING, then serve their open streams
until a grace period ends. So the link finds GOAWAY frames in the byte stream
itself (`FrameScanner`) and keeps them from h2: after a graceful GOAWAY the
open streams go on (as with grpcio) while new calls get a new connection; a
GOAWAY with an error code ends every stream with its code and debug text.
"""
import bisect
import collections
import errno
import logging
import os
import socket
import threading
from urllib.parse import unquote_to_bytes

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from pplex import __version__, limits, node
from pplex._proto import upstream_pb2
from pplex.bufsock import BufferedSocket
from pplex.grpcwire import (
    EMPTY_MESSAGE, FrameScanner, FramingError, MessageReader, call_outcome, describe_reset, encode_batch,
    grpc_timeout, window_update)
from pplex.logs import FAULTS
from pplex.reactor import READ, WRITE
from pplex.tls import TlsError, upstream_context
from pplex.tlssock import TlsSocket
from pplex.transport import CLEAN_END, Link, Transport

log = logging.getLogger("pplex.h2link")

MiB = 1024 * 1024
# Our receive windows (stream and connection): the worker never waits for us
# to hand window back under any sane load; h2 returns window as we consume it.
RECEIVE_WINDOW = 16 * MiB
RECV_BYTES = 256 * 1024           # one recv() at most; a few per readiness event
RECV_PER_EVENT = 4
# DATA bytes that bypassed h2 after which they are given back (WINDOW_UPDATE);
# far below RECEIVE_WINDOW, so the worker never waits for it.
WINDOW_RETURN_BYTES = 256 * 1024
# Replies held while clients were behind are delivered this many bytes per reactor pass.
RELEASE_BYTES_PER_PASS = 256 * 1024
# Bytes waiting for the socket above which offer() refuses (on_drained follows once under the low mark).
OUT_HIGH_WATER = 1 * MiB
OUT_LOW_WATER = 256 * 1024

SERVICE = "/upstream.grpc.service.UpstreamPeerService/"
DATA_PATH = (SERVICE + "bidirectionalStreaming").encode()
READY_PATH = (SERVICE + "ready").encode()
LIVE_PATH = (SERVICE + "live").encode()
USER_AGENT = f"pplex-h2/{__version__}".encode()

# -- calls -----------------------------------------------------------------------
class _Call:
    """One gRPC call on the connection: response headers, messages, trailers, end."""

    __slots__ = ("link", "conn", "stream_id", "reader", "http_status", "grpc_status", "grpc_message",
                 "finished", "stopped")

    def __init__(self, link):
        self.link = link
        self.conn = None
        self.stream_id = None
        self.reader = MessageReader(link.max_message_bytes)
        self.http_status = None
        self.grpc_status = None
        self.grpc_message = ""
        self.finished = False
        self.stopped = False   # the core no longer wants to hear about it

    def headers(self, headers):
        for name, value in headers:
            if name == b":status":
                try:
                    self.http_status = int(value)
                except ValueError:
                    self.http_status = -1
            elif name == b"grpc-status":
                try:
                    self.grpc_status = int(value)
                except ValueError:
                    self.grpc_status = 2  # UNKNOWN
            elif name == b"grpc-message":
                self.grpc_message = unquote_to_bytes(value).decode("utf-8", "replace")

    def data(self, payloads):
        """DATA frame payloads, in order: from h2 one at a time, from the fast path a run at a time."""
        try:
            messages = self.reader.feed_frames(payloads)
        except FramingError as error:
            self.conn.reset(self, ErrorCodes.CANCEL)
            self.finish(f"INTERNAL: bad gRPC framing from the worker: {error}")
            return
        if messages:
            self.messages(messages)

    def ended(self):
        detail = call_outcome(self.http_status, self.grpc_status, self.grpc_message)
        if detail is None and self.reader.pending():
            detail = f"INTERNAL: the stream ended inside a message ({self.reader.pending()} bytes left over)"
        self.finish(detail)

    def messages(self, messages):
        raise NotImplementedError

    def finish(self, detail):
        """The call is over: detail None for status OK, else why."""
        raise NotImplementedError


class _ReadyCall(_Call):
    __slots__ = ("started", "timeout", "timer", "answer")

    def __init__(self, link, started, timeout):
        super().__init__(link)
        self.started = started
        self.timeout = timeout
        self.timer = None
        self.answer = None

    def messages(self, messages):
        if self.answer is None:
            try:
                self.answer = upstream_pb2.ReadyResult.FromString(messages[0])
            except Exception as error:  # protobuf DecodeError
                self.conn.reset(self, ErrorCodes.CANCEL)
                self.finish(f"INTERNAL: cannot decode the ready answer: {error}")

    def finish(self, detail):
        if self.finished:
            return
        self.finished = True
        if detail is None:
            if self.answer is None:
                detail = "INTERNAL: the worker answered ready with no message"
            else:
                self.link.ready_seconds = self.link.reactor.clock() - self.started
        self.link._ready_done(self, detail)


class _DataCall(_Call):
    """The data stream. Which messages the worker has read is known from its flow control: gRPC
    servers give a stream's window back as their handler reads the stream (grpc-go does it in the
    handler's Recv, gRPC C-core as the application pulls), so the bytes the worker acknowledged are
    `window - initial window + bytes sent`. A message ending within them was read; one past them is
    unconfirmed if the stream breaks (and re-sent with `keep_unconfirmed`). Replies prove less: a
    worker with a backlog answers message k while k+1.. still wait unread in its buffers."""

    __slots__ = ("batch", "wire", "ends", "sent", "started_msgs", "written", "written_at_answer",
                 "want_drain", "closing", "half_closed", "ended_ok", "base", "inflight", "acked", "held",
                 "held_bytes")

    def __init__(self, link):
        super().__init__(link)
        self.batch = None       # the batch being written (None: nothing waits)
        self.wire = b""         # its encoded messages
        self.ends = None        # end offset of each message in wire
        self.sent = 0           # bytes of wire handed to h2
        self.started_msgs = 0   # messages of batch with at least one byte handed to h2
        self.written = 0        # messages handed to h2, over the stream's life
        self.written_at_answer = 0  # `written` when the worker's latest message came (balancing)
        self.want_drain = False
        self.closing = False    # close_send asked: END_STREAM once the batch is written
        self.half_closed = False  # END_STREAM sent: no more from us
        self.ended_ok = False   # the worker ended the call with status OK
        self.base = 0           # stream offset of the batch's first byte (bytes of the batches before)
        # Batches written in full and not yet acknowledged in full: (stream offset of their first
        # byte, their message ends, the batch itself when keep_unconfirmed else None).
        self.inflight = collections.deque()
        self.acked = 0          # the latest acknowledged(): kept, since a dead connection can no longer say
        self.held = None        # DATA received while replies are paused, in order (runs of payloads)
        self.held_bytes = 0     # their size

    def data(self, payloads):
        """While replies are paused (clients are behind), what arrives is held, not delivered: at most
        the stream's receive window, since its window is not given back until they resume. A worker
        that sends past it breaks HTTP/2 flow control (RFC 9113 section 6.9.1): the connection fails
        with FLOW_CONTROL_ERROR and the worker is ejected, so held bytes never exceed the window."""
        if self.held is not None or self.link.replies_paused:
            if self.held is None:
                self.held = []
            self.held.append(payloads)
            self.held_bytes += sum(map(len, payloads))
            if self.held_bytes > RECEIVE_WINDOW and self.conn is not None:
                self.conn.fail(f"INTERNAL: FLOW_CONTROL_ERROR: the worker sent {self.held_bytes} bytes on the "
                               f"data stream past its {RECEIVE_WINDOW}-byte window")
            return
        _Call.data(self, payloads)

    def release(self, budget):
        """Deliver held DATA, about `budget` bytes of it; True while some is still held."""
        held = self.held
        while held and budget > 0 and not self.finished:
            payloads = held.pop(0)
            size = sum(map(len, payloads))
            budget -= size
            self.held_bytes -= size
            _Call.data(self, payloads)
        if held:
            return True
        self.held = None
        self.held_bytes = 0
        return False

    def ended(self):
        if self.held:  # the stream's end comes after everything it sent
            self.release(1 << 62)
        _Call.ended(self)

    def messages(self, messages):
        if self.stopped:
            return
        link = self.link
        if link.closed:
            return
        self.written_at_answer = self.written
        events = link.events
        parse = upstream_pb2.OutputStreamRequest.FromString
        for raw in messages:
            try:
                out = parse(raw)
            except Exception as error:  # protobuf DecodeError: grpcio ends the stream too
                self.conn.reset(self, ErrorCodes.CANCEL)
                self.finish(f"INTERNAL: cannot decode a message from the worker: {error}")
                return
            try:
                # SEND (action 0) to a client or a set is the base contract; anything else is an action.
                # Kept in step with bridge.py GrpcLink._deliver: inline in both, not a shared function, since it
                # runs once per worker message on the hot path.
                which = out.WhichOneof("target")
                if which == "client_uuid":
                    if out.action:
                        events.on_action(link, out.action, which, out.client_uuid, out.payload, out.groups)
                    else:
                        events.on_reply(link, out.client_uuid, out.payload)
                elif which == "broadcast":
                    if out.action:
                        events.on_action(link, out.action, which, out.broadcast, out.payload, out.groups)
                    else:
                        events.on_broadcast(link, out.broadcast, out.payload)
                elif which == "group":
                    events.on_action(link, out.action, which, out.group, out.payload, out.groups)
                else:
                    events.on_bad_message(link, "message with no target")
            except Exception:
                # The fault boundary of one worker message: the next ones of this read still go.
                FAULTS.report("link event", "a message from upstream %s", link.authority.decode(), logger=log)
            if self.stopped or link.closed:  # a handler stopped the stream
                return

    def finish(self, detail):
        if self.finished:
            return
        self.finished = True
        self.ended_ok = detail is None
        if not self.stopped:
            self.link._emit(self.link.events.on_stream_closed,
                            CLEAN_END if detail is None else detail)

    def push(self):
        """Hand as much of the waiting batch to h2 as the windows allow; END_STREAM once asked and done."""
        if self.finished:
            return
        if self.batch is not None:
            self._push_batch()
        if self.closing and self.batch is None:
            self.closing = False
            try:
                self.conn.h2.end_stream(self.stream_id)
                self.half_closed = True
            except h2.exceptions.H2Error as error:
                log.debug("cannot half-close stream %s: %s", self.stream_id, error)

    def _push_batch(self):
        h2conn = self.conn.h2
        sid = self.stream_id
        wire = self.wire
        total = len(wire)
        sent = self.sent
        try:
            while sent < total:
                window = h2conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                size = min(window, h2conn.max_outbound_frame_size, total - sent)
                h2conn.send_data(sid, wire[sent:sent + size] if size < total else wire)
                sent += size
        except h2.exceptions.H2Error as error:  # the stream is closed on the h2 side
            log.debug("cannot write to stream %s: %s", sid, error)
        self.sent = sent
        started = len(self.ends) if sent >= total else (bisect.bisect_left(self.ends, sent) + (sent > 0))
        self.written += started - self.started_msgs
        self.started_msgs = started
        if sent >= total:
            inflight = self.inflight
            inflight.append((self.base, self.ends, self.batch if self.link.keep_unconfirmed else None))
            self.base += total
            self.batch = self.ends = None
            self.wire = b""
            self.sent = self.started_msgs = 0
            # Forget what the worker has read; keep at most REDELIVER_KEEP_BYTES of the rest.
            acked = self.acknowledged()
            self.acked = acked
            while inflight and (inflight[0][0] + inflight[0][1][-1] <= acked
                                or self.base - inflight[0][0] > limits.REDELIVER_KEEP_BYTES):
                inflight.popleft()

    def acknowledged(self):
        """Stream bytes the worker has read: the window it gave back (h2 tracks our send window)."""
        conn = self.conn
        stream = conn.h2.streams.get(self.stream_id) if conn is not None and not conn.closed else None
        if stream is None:
            return self.acked   # the stream is gone on the h2 side: what it said last
        acked = stream.outbound_flow_control_window - conn.h2.remote_settings.initial_window_size
        return max(self.acked, acked + self.base + self.sent)

    def window_updated(self):
        """The worker gave window back (or changed its settings): it has read more."""
        self.acked = self.acknowledged()

    def take_back(self):
        """(unsent, unconfirmed, resend): the waiting batch's messages not one byte of which was
        written; how many written ones the worker did not acknowledge reading; and, with
        keep_unconfirmed, those messages themselves (a flat batch, oldest first)."""
        # A worker that ended the call with OK after reading our end of stream read everything.
        acked = 1 << 62 if self.half_closed and self.ended_ok else self.acknowledged()
        keep = self.link.keep_unconfirmed
        unconfirmed = 0
        resend = []
        for base, ends, batch in self.inflight:
            first = bisect.bisect_right(ends, acked - base)  # ends[i] <= acked - base: read
            count = len(ends) - first
            if batch is not None:
                resend += batch[3 * first:]
            else:
                unconfirmed += count
        self.inflight.clear()
        unsent = []
        if self.batch is not None:
            first = min(bisect.bisect_right(self.ends, acked - self.base), self.started_msgs)
            if keep:
                resend += self.batch[3 * first:3 * self.started_msgs]
            else:
                unconfirmed += self.started_msgs - first
            unsent = self.batch[3 * self.started_msgs:]
            self.batch = self.ends = None
            self.wire = b""
        return unsent, unconfirmed, resend

    def waiting(self):
        if self.batch is None:
            return 0
        return len(self.ends) - self.started_msgs


class _LiveCall(_Call):
    __slots__ = ("interval", "timer", "sent_at")

    def __init__(self, link, interval):
        super().__init__(link)
        self.interval = interval
        self.timer = None
        self.sent_at = 0.0

    def messages(self, messages):
        link = self.link
        for raw in messages:
            if self.stopped or link.closed:
                return
            try:
                answer = upstream_pb2.LiveResult.FromString(raw)
            except Exception as error:
                self.conn.reset(self, ErrorCodes.CANCEL)
                self.finish(f"INTERNAL: cannot decode a live answer: {error}")
                return
            link.live_seconds = link.reactor.clock() - self.sent_at
            link._emit(link.events.on_live, answer.live, "live" if answer.live else "worker answered live=false")

    def finish(self, detail):
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.stopped:
            self.link._emit(self.link.events.on_live, False,
                            "worker ended the live stream" if detail is None else detail)


# -- the connection ----------------------------------------------------------------
class _Connection(BufferedSocket):
    """One h2c connection: a nonblocking buffered socket in the reactor's selector, an h2 state machine.

    Until the connect completes, what h2 produces stays in h2's own buffer.
    """

    write_high = OUT_HIGH_WATER
    write_low = OUT_LOW_WATER
    scheme = b"http"

    def __init__(self, link):
        BufferedSocket.__init__(self, link.reactor, None)
        self.link = link
        self.addresses = []        # resolved (family, sockaddr) not tried yet
        self.address = None        # the (family, sockaddr) being tried, or connected to
        self.budget = None         # seconds the ready probe gives the connect (start)
        self.attempt_seconds = None  # deadline of one address's attempt while others wait
        self.attempt_timer = None
        self.connected = False
        self.flush_pending = False  # a flush_now is due at the end of this pass
        self.calls = {}            # stream id -> _Call
        self.scanner = FrameScanner()
        # DATA bytes that bypassed h2, not yet given back by WINDOW_UPDATE: the connection's
        # (always given back, so heartbeats flow) and the data stream's (held while replies are paused)
        self.conn_owed = 0
        self.stream_owed = 0
        self.goaway = None         # "GOAWAY (CODE: debug)" once the worker said it is going
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
                                 SettingCodes.ENABLE_PUSH: 0})
        self.h2.increment_flow_control_window(RECEIVE_WINDOW - 65535)

    def start(self, budget=None):
        """Begin connecting; return None, or why it failed at once.

        An IP literal connects at once. A DNS name is resolved again for every
        new connection, on a short-lived thread (getaddrinfo blocks and the
        reactor thread must not); calls opened meanwhile wait in `out` like
        those of a pending connect. `budget` (seconds, the ready probe's
        deadline) is shared among the addresses: see `_connect_next`.
        """
        self.budget = budget
        link = self.link
        try:
            infos = socket.getaddrinfo(link.host, link.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            try:
                threading.Thread(target=self._resolve, name="pplex-h2-resolve", daemon=True).start()
            except RuntimeError as error:  # no thread to be had: this connection fails, pplex goes on
                return f"UNAVAILABLE: cannot resolve {link.authority.decode()}: {error}"
            return None
        return self._use([(info[0], info[4]) for info in infos])

    def _resolve(self):
        """On the resolver thread: the name's addresses, handed to the reactor thread."""
        link = self.link
        try:
            addresses = list(link.resolve(link.host, link.port))
            if not addresses:
                raise OSError("the name has no address")
        except (OSError, UnicodeError) as error:
            why = getattr(error, "strerror", None) or error
            self.reactor.call_soon_threadsafe(
                self._resolved, None, f"UNAVAILABLE: cannot resolve {link.authority.decode()}: {why}")
            return
        except Exception as error:  # a resolver seam's bug must not leave the probe hanging
            self.reactor.call_soon_threadsafe(
                self._resolved, None, f"UNAVAILABLE: cannot resolve {link.authority.decode()}: {error!r}")
            return
        self.reactor.call_soon_threadsafe(self._resolved, addresses, None)

    def _resolved(self, addresses, detail):
        if self.closed:
            return
        if detail is None:
            detail = self._use(addresses)
        if detail is not None:
            self.fail(detail)

    def _use(self, addresses):
        """Connect to `addresses` in order, the one this link last reached first."""
        last = self.link.last_address
        if last is not None and last in addresses and addresses[0] != last:
            addresses.remove(last)
            addresses.insert(0, last)
        self.addresses = addresses
        self.attempt_seconds = self.budget / len(addresses) if self.budget and len(addresses) > 1 else None
        return self._connect_next()

    def _connect_next(self):
        """Connect to the next address the name resolved to (IPv6 and IPv4 alike).

        While other addresses wait behind it, an attempt gets its share of the
        probe's budget as a deadline (a reactor timer): an address that never
        answers (a blackhole) costs that share, not the whole probe. An error
        at socket creation (too many open files) fails this attempt like a
        refused connect.
        """
        code = 0
        while self.addresses:
            family, address = self.addresses.pop(0)
            sock = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex(address)
            except OSError as error:   # EMFILE, ENFILE, ENOBUFS, an address of the wrong family
                code = error.errno or errno.EIO
            if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EINTR):
                break
            if sock is not None:
                sock.close()
        else:
            why = os.strerror(code) if code else "the name has no address"
            return f"UNAVAILABLE: cannot connect to {self.link.authority.decode()}: {why}"
        self.sock = sock
        self.address = (family, address)
        self.connected = code == 0
        if self.connected:
            self.link.last_address = self.address
        elif self.addresses and self.attempt_seconds:
            self.attempt_timer = self.reactor.call_later(self.attempt_seconds, self._attempt_expired, sock)
        # Writable once connected: then what h2 holds goes.
        self.events = 0
        self.set_events(READ | WRITE)
        return None

    def _attempt_expired(self, sock):
        """An address did not answer within its share of the budget: on to the next one."""
        if self.closed or self.connected or self.sock is not sock:
            return
        self.attempt_timer = None
        self._next_address()

    def _next_address(self):
        self.set_events(0)
        self.sock.close()
        self.sock = None
        detail = self._connect_next()
        if detail is not None:
            self.fail(detail)

    # -- streams -------------------------------------------------------------
    def open_call(self, call, path, extra=(), body=None, end_stream=False):
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", self.scheme), (b":path", path),
                   (b":authority", self.link.authority), (b"content-type", b"application/grpc"),
                   (b"te", b"trailers"), (b"user-agent", USER_AGENT), *node.current.headers, *extra]
        self.h2.send_headers(sid, headers, end_stream=end_stream and body is None)
        call.conn = self
        call.stream_id = sid
        self.calls[sid] = call
        if body is not None:
            self.send_small(call, body, end_stream)

    def send_small(self, call, body, end_stream=False):
        """A short request message (ready, heartbeat); False when the windows cannot take it now."""
        sid = call.stream_id
        if self.h2.local_flow_control_window(sid) < len(body):
            return False
        self.h2.send_data(sid, body, end_stream=end_stream)
        return True

    def reset(self, call, code=ErrorCodes.CANCEL):
        """Abandon a call (RST_STREAM); its later frames are ignored."""
        self.calls.pop(call.stream_id, None)
        if not self.closed:
            try:
                self.h2.reset_stream(call.stream_id, code)
            except h2.exceptions.H2Error:
                pass   # already closed on the h2 side

    def idle(self):
        return not self.calls

    def handshaking(self):
        """True while a TLS handshake is under way (never for h2c)."""
        return False

    # -- I/O -----------------------------------------------------------------
    def flush(self):
        """Write what h2 wants to send, once, at the end of this reactor pass: a pass that reads the
        worker's replies (window updates, acks) and offers it a batch costs one send(), not two.
        Never reports events (it may run in offer)."""
        if not self.flush_pending and not self.closed:
            self.flush_pending = True
            self.reactor.call_at_pass_end(self.flush_now)

    def flush_now(self):
        """Move what h2 wants to send into the socket now."""
        self.flush_pending = False
        if self.closed or not self.connected:
            return
        data = self.h2.data_to_send()
        if data:
            self.write(data)

    # BufferedSocket hooks
    def write_failed(self, error):
        self._fail_soon(f"UNAVAILABLE: writing to the worker failed: {error.strerror or error}")

    def resume_writing(self):
        self.link._writable_again(self)

    def _fail_soon(self, detail):
        self.reactor.call_soon(self.fail, detail)

    def _connect_done(self):
        """The nonblocking connect finished (the socket is readable or writable): did it work?"""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if self.attempt_timer is not None:
            self.attempt_timer.cancel()
            self.attempt_timer = None
        if code and self.addresses:
            self._next_address()
            return False
        if code:
            self.fail(f"UNAVAILABLE: cannot connect to {self.link.authority.decode()}: {os.strerror(code)}")
            return False
        self.connected = True
        self.link.last_address = self.address
        return True

    def on_writable(self):
        if self.closed:
            return
        if not self.connected:
            if not self._connect_done():
                return
            self.set_events(READ)  # from now on, WRITE interest only while bytes are buffered
            self.flush()
            return
        BufferedSocket.on_writable(self)
        self.flush()

    def on_readable(self):
        if self.closed:
            return
        if not self.connected:
            if not self._connect_done():
                return
            self.set_events(READ)
            self.flush()
        try:
            for _ in range(RECV_PER_EVENT):
                try:
                    data = self.sock.recv(RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    self.fail(f"UNAVAILABLE: connection to the worker broke: {error.strerror or error}")
                    return
                if not data:
                    after = f" after {self.goaway}" if self.goaway else ""
                    self.fail(f"UNAVAILABLE: the worker closed the connection{after}")
                    return
                self.received(data)
                if self.closed or len(data) < RECV_BYTES:
                    break
        finally:
            self.flush()  # window updates, ping and settings acks, what handlers wrote

    def received(self, data):
        """Sort the bytes (h2's, the data stream's DATA, GOAWAYs), act on each in order, GOAWAYs last."""
        goaways = self.scanner.feed(data, self._receive, self._fast_data)
        if (self.conn_owed >= WINDOW_RETURN_BYTES or self.stream_owed >= WINDOW_RETURN_BYTES) and not self.closed:
            self.return_window()
        for goaway in goaways:
            if self.closed:
                return
            self._goaway(*goaway)

    def _goaway(self, last_stream_id, code, debug):
        try:
            name = ErrorCodes(code).name
        except ValueError:
            name = f"error {code}"
        text = debug.decode("utf-8", "replace")
        self.goaway = f"GOAWAY ({name}{': ' + text if text else ''})"
        if code != ErrorCodes.NO_ERROR:
            self.fail(f"UNAVAILABLE: the worker sent {self.goaway}")
            return
        # Graceful: streams it took go on; the ones it did not will never be served.
        self.link._connection_closed(self)  # new calls go to a new connection
        for sid in [sid for sid in self.calls if sid > last_stream_id]:
            call = self.calls.pop(sid)
            call.finish(f"UNAVAILABLE: the worker is going away ({self.goaway}) and did not take the call")
        self.link._going_away(self, self.goaway)
        if self.idle() and not self.closed:
            self.close()

    def _fast_data(self, payloads):
        """Plain DATA frames of the data stream, which h2 never sees: their window is ours to give back."""
        size = sum(map(len, payloads))
        self.conn_owed += size
        self.stream_owed += size
        call = self.calls.get(self.scanner.fast)
        if call is not None:
            try:
                call.data(payloads)
            except Exception:  # a backstop: the call handles its own messages' errors
                FAULTS.report("link event", "data from upstream %s", self.link.authority.decode(), logger=log)
        return self.closed

    def return_window(self):
        """WINDOW_UPDATE for the DATA that bypassed h2: the connection's always, so heartbeats and
        probes flow; the data stream's unless replies are paused (then the worker must wait)."""
        frames = b""
        if self.conn_owed:
            frames = window_update(0, self.conn_owed)
            self.conn_owed = 0
        if self.stream_owed and not self.link.replies_paused:
            if self.scanner.fast in self.calls:
                frames += window_update(self.scanner.fast, self.stream_owed)
            self.stream_owed = 0
        if frames:
            # Whole frames after whole frames: what h2 queued so far goes first.
            self.write(self.h2.data_to_send() + frames)

    def _receive(self, data):
        """Feed bytes to h2 and act on its events; True when the connection is gone."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            self.flush_now()  # h2 queued a GOAWAY naming the error: it goes before the close
            self.fail(f"INTERNAL: HTTP/2 protocol error from the worker: {error}")
            return True
        DataReceived = h2.events.DataReceived
        # Hand window back first, whatever the handlers below do.
        acked = None
        for event in events:
            if event.__class__ is DataReceived and event.flow_controlled_length:
                if acked is None:
                    acked = {}
                acked[event.stream_id] = acked.get(event.stream_id, 0) + event.flow_controlled_length
        if acked:
            for sid, size in acked.items():
                self.h2.acknowledge_received_data(size, sid)
        calls = self.calls
        window_opened = False
        for event in events:
            cls = event.__class__
            if cls is DataReceived:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.data((event.data,))
            elif cls is h2.events.ResponseReceived or cls is h2.events.TrailersReceived:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.headers(event.headers)
                    if call.__class__ is _DataCall and cls is h2.events.ResponseReceived:
                        # From here its plain DATA frames skip h2 (FrameScanner).
                        self.scanner.fast = event.stream_id
            elif cls is h2.events.StreamEnded:
                call = calls.pop(event.stream_id, None)
                if call is not None:
                    call.ended()
            elif cls is h2.events.StreamReset:
                call = calls.pop(event.stream_id, None)
                if call is not None:
                    call.finish(describe_reset(event.error_code))
            elif cls is h2.events.WindowUpdated or cls is h2.events.RemoteSettingsChanged:
                window_opened = True
            elif cls is h2.events.ConnectionTerminated:  # not seen: FrameScanner keeps them from h2
                self.fail(f"UNAVAILABLE: the worker sent GOAWAY ({event.error_code})")
                return True
            if self.closed:
                return True
        if window_opened:
            self.link._window_opened(self)
        if self.goaway is not None and self.idle():
            self.close()  # going away and nothing left on it
        return self.closed

    def fail(self, detail):
        """The connection is gone: end every call on it with `detail`."""
        if self.closed:
            return
        self.close()
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.finish(detail)

    def close(self):
        """Drop the connection without reporting anything (a GOAWAY goes out if the socket takes it)."""
        if self.closed:
            return
        if self.connected:
            try:
                self.h2.close_connection()
                self.send_last(self.h2.data_to_send())
            except h2.exceptions.H2Error:
                pass
        self.link._connection_closed(self)
        if self.sock is None:
            self.closed = True
        else:
            self.close_socket()


class _TlsConnection(TlsSocket, _Connection):
    """One h2 connection over TLS (the upstream's `tls`): `:scheme https`, ALPN `h2` required.

    The handshake starts once TCP connects; what h2 writes meanwhile waits in
    the engine. Its deadline is the ready probe's, whose timer opened the
    connection: a handshake still under way then is reported as such. A
    certificate the worker's CA did not sign, a name it does not carry, a
    worker that refuses pplex's certificate: the one line of `pplex.tls` ends
    every call, so it becomes the upstream's `last_error`.
    """

    scheme = b"https"
    tls_recv_bytes = RECV_BYTES
    tls_reads_per_event = RECV_PER_EVENT

    def __init__(self, link):
        _Connection.__init__(self, link)
        self.tls = None
        self.tls_timer = None

    def handshaking(self):
        return self.connected and (self.tls is None or not self.tls.established)

    def _connect_done(self):
        if not _Connection._connect_done(self):
            return False
        self.start_tls(self.link.tls.engine())
        return not self.closed

    def on_readable(self):
        if self.closed:
            return
        if not self.connected:
            if not self._connect_done():
                return
            self.set_events(READ)
        try:
            TlsSocket.on_readable(self)
        finally:
            self.flush()  # window updates, ping and settings acks, what handlers wrote

    # TlsSocket hooks
    def tls_received(self, data):
        self.received(data)

    def tls_closed(self):
        after = f" after {self.goaway}" if self.goaway else ""
        self.fail(f"UNAVAILABLE: the worker closed the connection{after}")

    def tls_failed(self, error):
        self.fail(str(error))

    def read_failed(self, error):
        self.fail(f"UNAVAILABLE: connection to the worker broke: {error.strerror or error}")


# -- the link ----------------------------------------------------------------------
def resolve_address(host, port):
    """A DNS name's TCP addresses as [(family, sockaddr)], in the order the system prefers (RFC 6724)."""
    return [(info[0], info[4]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


class H2Transport(Transport):
    def __init__(self, reactor, resolve=resolve_address):
        """`resolve(host, port) -> [(family, sockaddr)]` runs on a short-lived thread (tests give their own)."""
        self.reactor = reactor
        self.resolve = resolve

    def connect(self, upstream, events):
        link = H2Link(self.reactor, upstream.host, upstream.port, events,
                      max_message_bytes=upstream.max_message_bytes, tls=getattr(upstream, "tls", None))
        link.resolve = self.resolve
        return link

    def close(self):
        pass


class H2Link(Link):
    def __init__(self, reactor, host, port, events, max_message_bytes=limits.MAX_MESSAGE_BYTES.default,
                 tls=None):
        """`tls`: the upstream's setting (None: h2c; True or the dict of `pplex.tls.upstream_context`)."""
        self.reactor = reactor
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes   # the largest message the worker may send us
        self.replies_paused = False
        self.authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self.events = events
        self.closed = False
        self.resolve = resolve_address
        self.last_address = None   # the address the last connection reached: tried first next time
        self._conn = None
        self._ready = None
        self._data = None
        self._live = None
        # Latest round trips in seconds, for metrics.
        self.ready_seconds = None
        self.live_seconds = None
        self.tls = None            # pplex.tls.UpstreamTls
        self.tls_error = None      # why it could not be built (a file gone since startup): every probe says it
        if tls:
            try:
                self.tls = upstream_context(tls, host)
            except TlsError as error:
                self.tls_error = f"UNAVAILABLE: {error}"

    def _emit(self, handler, *args):
        if not self.closed:
            handler(self, *args)

    def _emit_soon(self, handler, *args):
        self.reactor.call_soon(self._emit, handler, *args)

    def _connection(self, budget=None):
        """The open connection, or a new one; (connection, None) or (None, why not)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn, None
        if self.tls_error is not None:
            return None, self.tls_error
        conn = _Connection(self) if self.tls is None else _TlsConnection(self)
        detail = conn.start(budget)
        if detail is not None:
            return None, detail
        self._conn = conn
        return conn, None

    def _connection_closed(self, conn):
        if self._conn is conn:
            self._conn = None

    # -- readiness -----------------------------------------------------------
    def probe_ready(self, timeout):
        if self.closed:
            return
        if self._ready is not None:  # a probe still out: the new one replaces it
            old, self._ready = self._ready, None
            old.stopped = True
            if old.timer is not None:
                old.timer.cancel()
        conn, detail = self._connection(timeout)
        call = _ReadyCall(self, self.reactor.clock(), timeout)
        self._ready = call
        if conn is None:
            call.finished = True
            self.reactor.call_soon(self._ready_done, call, detail)
            return
        call.timer = self.reactor.call_later(timeout, self._ready_deadline, call)
        conn.open_call(call, READY_PATH, extra=((b"grpc-timeout", grpc_timeout(timeout)),),
                       body=EMPTY_MESSAGE, end_stream=True)
        conn.flush()

    def _ready_deadline(self, call):
        call.timer = None
        if call.finished:
            return
        conn = call.conn
        state = "connecting" if not conn.connected else "TLS handshake" if conn.handshaking() else "connected"
        call.finish(f"DEADLINE_EXCEEDED: no ready answer within {call.timeout:g} s ({state})")
        # A worker that does not answer gets a fresh connection for the next probe.
        conn.reset(call)
        if conn.idle() or not conn.connected:
            conn.close()
        else:
            conn.flush()

    def _ready_done(self, call, detail):
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if self._ready is not call or call.stopped:
            return
        self._ready = None
        features = ()
        if detail is None:
            ok = bool(call.answer.ready)
            features = tuple(call.answer.features)
            detail = "ready" if ok else "worker answered ready=false"
        else:
            ok = False
        self._emit(self.events.on_ready, ok, detail, features)

    # -- data stream ---------------------------------------------------------
    def open_stream(self):
        call = _DataCall(self)
        self._data = call
        conn = self._conn
        if conn is None or conn.closed:
            call.finished = True
            self._emit_soon(self.events.on_stream_closed, "UNAVAILABLE: the connection closed before the stream opened")
            return
        conn.open_call(call, DATA_PATH)
        conn.flush()

    def offer(self, batch):
        call = self._data
        if call is None or call.finished or call.closing:
            return False
        conn = call.conn
        if call.batch is not None or conn.writing_paused:
            call.want_drain = True
            return False
        call.wire, call.ends = encode_batch(batch)
        call.batch = batch
        call.push()
        conn.flush()
        return True

    def _window_opened(self, conn):
        call = self._data
        if call is not None and call.conn is conn:
            call.window_updated()
            if call.batch is not None or call.closing:
                call.push()
                # The worker's window, not pplex, was holding these back: they go now, not at the
                # end of this pass (a window update comes once per quarter window, not per message).
                conn.flush_now()
        self._maybe_drained(conn)

    def _writable_again(self, conn):
        self._maybe_drained(conn)

    def _maybe_drained(self, conn):
        call = self._data
        if (call is not None and call.conn is conn and call.want_drain and call.batch is None
                and not call.finished and not conn.writing_paused):
            call.want_drain = False
            self._emit(self.events.on_drained)

    def _going_away(self, conn, detail):
        """A graceful GOAWAY on `conn`: if the data stream lives there, the worker is draining."""
        call = self._data
        if call is not None and call.conn is conn and not call.finished:
            self._emit(self.events.on_goaway, detail)

    def progress(self):
        call = self._data
        return call.written if call is not None else 0

    def backlog(self):
        call = self._data
        return call.waiting() if call is not None else 0

    def unanswered(self):
        call = self._data
        if call is None:
            return 0
        return call.waiting() + call.written - call.written_at_answer

    def close_send(self):
        call = self._data
        if call is None or call.finished or call.conn is None or call.conn.closed:
            return
        call.closing = True
        call.push()
        call.conn.flush()

    def pause_replies(self):
        self.replies_paused = True

    def resume_replies(self):
        self.replies_paused = False
        self._release_held()

    def _release_held(self):
        """Held replies go out a slice per reactor pass, so the end of each pass can pause them again."""
        call = self._data
        if self.replies_paused or call is None or call.conn is None or call.conn.closed:
            return
        if call.held and call.release(RELEASE_BYTES_PER_PASS):
            self.reactor.call_soon(self._release_held)
            return
        call.conn.return_window()
        call.conn.flush()

    def stop_stream(self):
        call, self._data = self._data, None
        if call is None:
            return [], 0, []
        call.stopped = True
        unsent, unconfirmed, resend = call.take_back()
        conn = call.conn
        if conn is not None and not conn.closed:
            conn.reset(call)
            # The stream is what the connection was for: the next probe gets a fresh one.
            if self._live is None or self._live.conn is not conn:
                conn.close()
            else:
                conn.flush()
        return unsent, unconfirmed, resend

    # -- liveness ------------------------------------------------------------
    def start_live(self, interval):
        self.stop_live()
        call = _LiveCall(self, interval)
        self._live = call
        conn = self._conn
        if conn is None or conn.closed:
            call.finished = True
            self._emit_soon(self.events.on_live, False, "UNAVAILABLE: no connection to the worker")
            return
        conn.open_call(call, LIVE_PATH)
        self._heartbeat(call)

    def _heartbeat(self, call):
        call.timer = None
        if call.finished or call.stopped:
            return
        call.sent_at = self.reactor.clock()
        # A heartbeat the windows cannot take now is skipped; the live deadline judges.
        call.conn.send_small(call, EMPTY_MESSAGE)
        call.conn.flush()
        call.timer = self.reactor.call_later(call.interval, self._heartbeat, call)

    def stop_live(self):
        call, self._live = self._live, None
        if call is None:
            return
        call.stopped = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        conn = call.conn
        if conn is not None and not conn.closed and not call.finished:
            conn.reset(call)
            conn.flush()

    def close(self):
        self.closed = True
        self.stop_live()
        self.stop_stream()
        if self._ready is not None:
            self._ready.stopped = True
            if self._ready.timer is not None:
                self._ready.timer.cancel()
            self._ready = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
