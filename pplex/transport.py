"""The interface between the proxy core and whatever carries messages to workers.

The core (reactor thread) talks to one `Link` per upstream worker; the link
reports back through the `LinkEvents` the core gave it. Every `LinkEvents`
method is called on the reactor thread: a transport that runs its I/O on
threads (the grpcio bridge) hands its events over with
`Reactor.call_soon_threadsafe`; a transport that runs inside the reactor (an
HTTP/2 connection on a nonblocking socket in the same selector) calls them
directly. Nothing here assumes threads or queues.

Messages travel in batches: a batch is a flat list
`[client_uuid, payload, time, client_uuid, payload, time, ...]`, so that
building one costs three appends per message and no tuple. A payload is
bytes (or a bytearray of merged raw reads), or an `Event`: a lifecycle input
(CONNECTED, DISCONNECTED) for a worker that announced "lifecycle". A link
tells them apart by the payload's class, so a message costs no extra test.
"""

# How a data stream the worker ended with status OK is reported (`LinkEvents.on_stream_closed`).
CLEAN_END = "worker ended the data stream"


class Event:
    """A lifecycle input in a batch's payload slot (README, "Sessions").

    `kind`: `CONNECTED` (1) or `DISCONNECTED` (2), `InputStreamRequest.Kind`;
    `metadata`: dict of str to str (the CONNECTED facts, or {"reason": code});
    `conn`: the client it is about (to route it again if its worker leaves);
    `wire`: its encoded protobuf fields 4 and 5, made once by the h2 transport
    (`pplex.grpcwire`), None until then. `len()` is 0: an event carries no
    payload bytes, so batch byte counts stay those of messages.
    """

    __slots__ = ("kind", "metadata", "conn", "wire")
    CONNECTED = 1
    DISCONNECTED = 2

    def __init__(self, kind, metadata, conn=None):
        self.kind = kind
        self.metadata = metadata
        self.conn = conn
        self.wire = None

    def __len__(self):
        return 0

    def __repr__(self):
        return f"<Event {('CONNECTED', 'DISCONNECTED')[self.kind - 1]} {self.metadata}>"


class Link:
    """One worker, as seen by the core. Every method is called on the reactor thread.

    `keep_unconfirmed` (set by the core): keep a copy of what was written after the
    worker's last message, for `stop_stream` to hand back (`server.redeliver_unconfirmed`).
    """

    keep_unconfirmed = False

    def probe_ready(self, timeout):
        """Ask the worker whether it is ready; answer with `events.on_ready(link, ok, detail)`.

        Must answer exactly once, within about `timeout` seconds (a deadline
        counts as not ready).
        """
        raise NotImplementedError

    def open_stream(self):
        """Open the long-lived data stream. Its end is reported by `events.on_stream_closed`."""
        raise NotImplementedError

    def offer(self, batch):
        """Hand a batch of messages to the stream, or refuse it.

        Returns True when the link took the batch (it owns the list from then
        on). Returns False when it still holds an earlier batch it has not
        started writing; it then calls `events.on_drained(link)` once it can
        take another. Refusing is how batches grow under load: the caller keeps
        adding to its batch, and raw bytes from one client merge into one message.
        """
        raise NotImplementedError

    def start_live(self, interval):
        """Send a liveness heartbeat every `interval` seconds; answer each with `events.on_live`."""
        raise NotImplementedError

    def progress(self):
        """Messages written to the data stream so far (a count that only grows).

        With `backlog`, how the stall check (`upstream.stall_timeout`) tells a
        stream that takes nothing while messages wait.
        """
        raise NotImplementedError

    def backlog(self):
        """Messages offered to the link and not yet written to the stream."""
        raise NotImplementedError

    def unanswered(self):
        """Messages in flight: offered and not yet followed by any message from the worker
        (the backlog, plus those written after its latest message). For balancing plugins."""
        raise NotImplementedError

    def stop_live(self):
        """Stop the heartbeat; no more `on_live` for it."""
        raise NotImplementedError

    def close_send(self):
        """Half-close the data stream once everything offered so far is written (draining:
        the gRPC way of saying "no more from me"). The worker ends the stream when it is
        done, reported by `events.on_stream_closed`. No `offer` follows."""
        raise NotImplementedError

    def pause_replies(self):
        """Take no more messages from the worker for now (clients are behind: `output_budget`).

        The stream's flow control then pushes back on the worker; heartbeats go on.
        """
        raise NotImplementedError

    def resume_replies(self):
        raise NotImplementedError

    def stop_stream(self):
        """End the data stream (if open) and return `(unsent, unconfirmed, resend)`.

        `unsent`: a batch of the messages it was given and never wrote, which
        the caller may route elsewhere. `unconfirmed`: how many it wrote after
        the worker's last message, which cannot be known to have been read.
        `resend`: when `keep_unconfirmed` is set, those unconfirmed messages
        themselves as a batch (the oldest may be missing past
        `limits.REDELIVER_KEEP_BYTES`); else empty.
        """
        raise NotImplementedError

    def close(self):
        """Release everything; no event is reported afterwards."""
        raise NotImplementedError


class LinkEvents:
    """What a link reports, always on the reactor thread."""

    def on_ready(self, link, ok, detail, features=()):
        """The answer to `probe_ready`: ok is True only for an answer `ready=true`; `features`: the
        answer's `ReadyResult.features` (strings; e.g. "lifecycle"), empty when it gave none or failed.
        A link written before features existed calls it with three arguments: that means none."""

    def on_stream_closed(self, link, detail):
        """The data stream ended by itself (not by `stop_stream`); `detail` says how."""

    def on_drained(self, link):
        """The link can take a batch again (after `offer` returned False)."""

    def on_reply(self, link, client_uuid, payload):
        """The worker sent payload to one client."""

    def on_broadcast(self, link, kind, payload):
        """The worker sent payload to a set of clients (a BROADCAST_* value)."""

    def on_action(self, link, action, which, target, payload, groups):
        """A worker message beyond the base contract: an `OutputStreamRequest.Action` other than SEND
        (CLOSE 1, JOIN 2, LEAVE 3), or any action on a group.

        `which` names the target field set ("client_uuid", "broadcast" or "group") and `target` is
        its value (str, a BROADCAST_* int, str); `payload` bytes; `groups` the names for JOIN and
        LEAVE (a sequence of str). A SEND to a client or a broadcast set is `on_reply` /
        `on_broadcast`, as in the base contract."""

    def on_bad_message(self, link, reason):
        """The worker sent a message pplex cannot deliver (no target, unknown broadcast)."""

    def on_live(self, link, ok, detail):
        """One heartbeat's outcome: ok is False for live=false, a deadline or a broken stream."""

    def on_goaway(self, link, detail):
        """The worker is stopping gracefully (HTTP/2 GOAWAY with no error): its open streams
        go on for a grace period, new calls are refused. The core drains it."""


class Transport:
    """Makes links; one transport serves every upstream."""

    def connect(self, upstream, events):
        """Return a Link to `upstream` (host, port) that reports to `events`."""
        raise NotImplementedError

    def close(self):
        """Release shared resources (thread pools)."""
