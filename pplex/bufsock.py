"""A nonblocking socket in the reactor with a bounded output buffer and watermarks.

The one piece through which every connection pplex owns writes, client or
worker: `write()` tries `send()` first and buffers only what the kernel did
not take, in order; WRITE interest is registered only while bytes are
buffered. The buffer has three marks (asyncio's `set_write_buffer_limits`
and waitress's `outbuf_high_watermark` are the models):

- above `write_high` the owner's `pause_writing()` is called once,
- back under `write_low` its `resume_writing()` is called once,
- above `write_limit` (if set) its `buffer_overflow()` is called: the buffer
  must not grow further, and the owner decides what that means (a client is
  closed as a slow consumer; the h2 transport never gets there because it
  stops producing at `write_high`).

The owner (a subclass) implements the policy hooks below; reading is the
owner's too (`recv_into_owner`), because a client and an HTTP/2 connection
read differently. `close_socket(reset=True)` ends the connection with a reset
(RST) instead of a clean close: the way to say "data was lost" to the peer.
`pplex.tlssock.TlsSocket` puts TLS between the socket and the owner (the
`tls_*` hooks below are its); the plaintext classes never meet it.

Every method runs on the reactor thread.
"""
import socket
import struct

from pplex.reactor import READ, WRITE

_LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST, drops unsent data


class BufferedSocket:
    """Base class: a registered nonblocking socket, its output buffer and its selector interest."""

    __slots__ = ("reactor", "sock", "events", "wbuf", "closed", "writing_paused")

    # Marks in bytes; subclasses (or their owners, from config) set them on the class.
    write_high = 64 * 1024
    write_low = 16 * 1024
    write_limit = 0            # 0: no hard limit

    def __init__(self, reactor, sock):
        self.reactor = reactor
        self.sock = sock
        self.events = 0
        self.wbuf = None          # bytearray of unsent bytes, or None when empty
        self.closed = False
        self.writing_paused = False

    # -- hooks for the owner ------------------------------------------------------
    def pause_writing(self):
        """The buffer went above `write_high`."""

    def resume_writing(self):
        """The buffer came back under `write_low` (after a `pause_writing`)."""

    def buffer_overflow(self):
        """The buffer went above `write_limit`; the owner must stop writing or close."""

    def write_drained(self):
        """Everything written so far is in the kernel (called after a write that empties the buffer)."""

    def write_failed(self, error):
        """send() failed (the peer reset, a broken pipe): the connection is unusable."""

    def buffered_changed(self, delta):
        """The buffer grew (delta > 0) or shrank (delta < 0) by delta bytes: for global accounting."""

    # -- hooks of a TLS connection (pplex.tlssock), for owners that speak TLS ----------
    def tls_established(self):
        """The TLS handshake is done."""

    def tls_received(self, data):
        """Plaintext decrypted from what the peer sent."""

    def tls_closed(self):
        """The peer sent close_notify, or EOF after the handshake."""

    def tls_failed(self, error):
        """A `pplex.tls.TlsError` (one line) ended TLS: the connection is unusable."""

    def read_failed(self, error):
        """recv() raised an OSError (a reset): the connection is unusable."""

    # -- interest ---------------------------------------------------------------
    def set_events(self, events):
        old, self.events = self.events, events
        if self.closed or old == events:
            return
        reactor = self.reactor
        # A selector holds no socket without interest: leave it, and come back.
        if not events:
            reactor.unregister(self.sock)
        elif not old:
            reactor.register(self.sock, events, self)
        else:
            reactor.modify(self.sock, events, self)

    def pause_reading(self):
        if self.events & READ:
            self.set_events(self.events & ~READ)

    def resume_reading(self):
        if not self.events & READ:
            self.set_events(self.events | READ)

    # -- writing ------------------------------------------------------------------
    def write(self, data):
        """Send `data` after whatever is buffered, in order; buffer what the kernel does not take."""
        if self.closed or not data:
            return
        buf = self.wbuf
        if buf is not None:
            buf += data
            self.buffered_changed(len(data))
            self._check_marks(len(buf))
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.write_failed(error)
            return
        if sent < len(data):
            rest = len(data) - sent
            self.wbuf = bytearray(memoryview(data)[sent:])
            self.set_events(self.events | WRITE)
            self.buffered_changed(rest)
            self._check_marks(rest)
        else:
            self.write_drained()

    def _check_marks(self, size):
        if size > self.write_high and not self.writing_paused:
            self.writing_paused = True
            self.pause_writing()
        if self.write_limit and size > self.write_limit and not self.closed:
            self.buffer_overflow()

    def on_writable(self):
        buf = self.wbuf
        if buf is None or self.closed:
            self.set_events(self.events & ~WRITE)
            return
        try:
            sent = self.sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.write_failed(error)
            return
        del buf[:sent]   # bytearray: deleting from the front moves an offset, not the bytes
        self.buffered_changed(-sent)
        left = len(buf)
        if self.writing_paused and left <= self.write_low:
            self.writing_paused = False
            self.resume_writing()
            if self.closed:
                return
        if not left:
            self.wbuf = None
            self.set_events(self.events & ~WRITE)
            self.write_drained()

    def buffered(self):
        """Bytes written but not yet taken by the kernel."""
        return len(self.wbuf) if self.wbuf is not None else 0

    # -- ending -------------------------------------------------------------------
    def send_last(self, data=b""):
        """Before a close: what is buffered, then `data`, in one nonblocking send; the rest is dropped."""
        buf = self.wbuf
        if buf is not None:
            self.wbuf = None
            self.buffered_changed(-len(buf))
            data = bytes(buf) + data
        if data and not self.closed:
            try:
                self.sock.send(data)
            except OSError:
                pass

    def close_socket(self, reset=False):
        """Unregister and close; `reset`: send RST and drop what is buffered (data was lost)."""
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.reactor.unregister(self.sock)
        if self.wbuf is not None:
            self.buffered_changed(-len(self.wbuf))
            self.wbuf = None
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.sock.close()
        except OSError:
            pass
