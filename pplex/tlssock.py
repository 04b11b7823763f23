"""TLS on a `BufferedSocket`: the owner reads and writes plaintext, the socket carries ciphertext.

`TlsSocket` is a mixin put before a `BufferedSocket` subclass; a connection
that speaks TLS is an instance of such a subclass, and one that does not never
meets this code. So the plaintext path pays nothing for TLS, not even a check,
and a plaintext connection is exactly as large as before. The concrete class
declares the two slots the mixin uses, `tls` (the `pplex.tls.TlsEngine`) and
`tls_timer` (the handshake deadline), or sets them in `__init__`.

What the mixin does, all on the reactor thread, never blocking:
- `start_tls(engine, timeout, data)` starts the handshake (a client's
  ClientHello goes out at once), with a deadline (a reactor timer), and feeds
  the ciphertext already read, if any (what followed a PROXY header);
- `on_readable` reads ciphertext and hands the plaintext it decrypts to the
  owner; handshake flights, alerts and session tickets go out as they come;
- `write(data)` takes plaintext: before the handshake ends it waits inside
  the engine, then it leaves as ciphertext through the buffered socket;
- `buffered()` counts both the ciphertext in the socket's buffer and what the
  engine holds, and the watermarks (`pause_writing`, `write_limit`) and the
  owner's `buffered_changed` accounting see both;
- `close_socket()` sends close_notify on a clean close (a reset sends nothing).

The owner's hooks (defaults in `BufferedSocket`): `tls_established()` once
the handshake is done; `tls_received(data)` plaintext; `tls_closed()` the
peer sent close_notify (or EOF after the handshake); `tls_failed(error)` a
`TlsError`, one line (a failed or timed-out handshake, a bad record, an alert
from the peer): the alert owed to the peer is already sent;
`read_failed(error)` recv() raised an OSError.
"""
from pplex.bufsock import BufferedSocket
from pplex.reactor import READ
from pplex.tls import TlsError, handshake_timed_out


class TlsSocket:
    """Mixin: TLS between a `BufferedSocket` and its owner (see the module docstring)."""

    __slots__ = ()

    # Ciphertext taken per recv() and recv() calls per readiness event; owners set their own.
    tls_recv_bytes = 65536
    tls_reads_per_event = 1

    def start_tls(self, engine, timeout=None, data=b""):
        """Run TLS on this socket from now on.

        :param engine: a fresh `TlsEngine` (client or server side).
        :param timeout: seconds the handshake may take (a reactor timer), or None.
        :param data: ciphertext already read from the socket (after a PROXY header).
        Returns False when the socket is done (the hooks said why).
        """
        self.tls = engine
        if timeout:
            self.tls_timer = self.reactor.call_later(timeout, self._tls_deadline, timeout)
        try:
            engine.start()
        except TlsError as error:
            return self._tls_error(error)
        self._tls_out()
        if data and not self.closed:
            return self.tls_feed(data)
        return not self.closed

    def _tls_deadline(self, seconds):
        self.tls_timer = None
        if not self.closed and not self.tls.established:
            self.tls_failed(handshake_timed_out(seconds))

    # -- ciphertext in ---------------------------------------------------------------
    def on_readable(self):
        size = self.tls_recv_bytes
        for _ in range(self.tls_reads_per_event):
            try:
                data = self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.read_failed(error)
                return
            if not self.tls_feed(data) or len(data) < size or not self.events & READ:
                return

    def tls_feed(self, data):
        """Ciphertext read from the socket (b"": EOF); False when the socket is done with."""
        tls = self.tls
        was_established = tls.established
        # Plaintext written before the handshake ends waits in the engine (and is counted).
        held = 0 if was_established else tls.buffered()
        try:
            if data:
                plain = tls.receive(data)
            else:
                tls.receive_eof()
                plain = b""
        except TlsError as error:
            return self._tls_error(error)
        if not was_established and tls.established:
            self._settled()
            if held:
                self.buffered_changed(-held)   # it leaves the engine as ciphertext just below
            self._tls_out()
            if self.closed:
                return False
            self.tls_established()
        else:
            self._tls_out()
        if self.closed:
            return False
        if plain:
            self.tls_received(plain)
            if self.closed:
                return False
        if tls.peer_closed:
            self.tls_closed()
            return False
        return True

    def _settled(self):
        timer = self.tls_timer
        if timer is not None:
            timer.cancel()
            self.tls_timer = None

    def _tls_error(self, error):
        self._tls_out()   # the alert that tells the peer why
        self._settled()
        if not self.closed:
            self.tls_failed(error)
        return False

    # -- plaintext out -----------------------------------------------------------------
    def write(self, data):
        """Plaintext from the owner; encrypted at once, or held by the engine until the handshake ends."""
        if self.closed or not data:
            return
        tls = self.tls
        try:
            tls.send(data)
        except TlsError as error:
            self._tls_error(error)
            return
        if tls.established:
            BufferedSocket.write(self, tls.data_to_send())
        else:
            self.buffered_changed(len(data))
            self._check_marks(self.buffered())

    def _tls_out(self):
        data = self.tls.data_to_send()
        if data:
            BufferedSocket.write(self, data)

    def buffered(self):
        """Bytes written but not yet taken by the kernel: ciphertext buffered, and what the engine holds."""
        held = self.tls.buffered() if self.tls is not None else 0
        return (len(self.wbuf) if self.wbuf is not None else 0) + held

    # -- ending ------------------------------------------------------------------------------
    def send_last(self, data=b""):
        """Before a close: `data` (plaintext) and close_notify after what is buffered, one nonblocking send."""
        tls = self.tls
        out = b""
        if tls is not None and tls.established and tls.failed is None and not tls.closing:
            try:
                if data:
                    tls.send(data)
                tls.close()
            except TlsError:
                pass
            out = tls.data_to_send()
        BufferedSocket.send_last(self, out)

    def close_socket(self, reset=False):
        """Close; a clean close sends close_notify first, a reset (`reset`) sends nothing more."""
        if self.closed:
            return
        self._settled()
        tls = self.tls
        if tls is not None:
            if not tls.established:
                held = tls.buffered()
                if held:
                    self.buffered_changed(-held)
            elif not reset:
                self.send_last()
        BufferedSocket.close_socket(self, reset)
