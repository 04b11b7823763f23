"""One client TCP connection: its socket, identity, buffers and deadlines.

Owns the nonblocking reads and writes of one socket: a read goes straight to
the proxy; writes are gathered during a pass and sent once at its end (one
`send` for many replies), with the unsent rest kept in order until the socket
is writable again. It keeps the few facts the proxy and plugins ask about a
client: its UUID, address, activity and byte counts.

Memory per idle connection matters (tens of thousands of idle game clients),
hence `__slots__` and buffers that exist only while they hold data.
"""
from pplex.reactor import READ, WRITE

RECV_BYTES = 65536


class Connection:
    __slots__ = (
        "proxy", "sock", "uuid", "peer", "opened", "last_read",
        "bytes_in", "bytes_out", "messages_in", "messages_out",
        "out", "wbuf", "events", "closed", "eof", "close_reason",
        "framing_state", "authenticated", "upstream",
        "waiting", "waiting_bytes", "last_upstream", "merge_batch", "merge_index",
        "idle_timer", "linger_timer", "attrs", "__weakref__",
    )

    def __init__(self, proxy, sock, uuid, peer, now):
        self.proxy = proxy
        self.sock = sock
        self.uuid = uuid
        self.peer = peer
        self.opened = now
        self.last_read = None     # monotonic time of the last bytes read; None: never sent any
        self.bytes_in = self.bytes_out = 0
        self.messages_in = self.messages_out = 0
        self.out = None           # replies gathered during this pass
        self.wbuf = None          # bytes the socket did not take yet
        self.events = READ
        self.closed = False
        self.eof = 0              # see Proxy.client_eof
        self.close_reason = None
        self.framing_state = None  # owned by the framing plugin
        self.authenticated = True
        self.upstream = None      # the worker a routing plugin pinned this client to
        self.waiting = None       # messages held while no worker is ready (a deque)
        self.waiting_bytes = 0
        self.last_upstream = None  # the worker its last message went to
        self.merge_batch = None   # the batch its last raw message may still wait in
        self.merge_index = 0
        self.idle_timer = None
        self.linger_timer = None
        self.attrs = None         # a dict for plugins, made on first use

    def __repr__(self):
        return f"<Connection {self.uuid} {format_peer(self.peer)}>"

    # -- reading -------------------------------------------------------------
    def on_readable(self):
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.proxy.close(self, f"read error: {error.strerror or error}")
            return
        if data:
            self.bytes_in += len(data)
            try:
                self.proxy.received(self, data)
            except Exception:
                # A plugin failed on this client's input: it alone is closed.
                self.proxy.failed(self, "handling its input")
        else:
            self.proxy.client_eof(self)

    def pause_reading(self):
        if self.events & READ and not self.closed:
            self._set_events(self.events & ~READ)

    def resume_reading(self):
        if not self.events & READ and not self.closed and not self.eof:
            self._set_events(self.events | READ)

    # -- writing -------------------------------------------------------------
    def send(self, data):
        """Queue bytes for this pass's single write (see `flush`)."""
        if self.closed:
            return
        if self.out is None:
            self.out = [data]
            self.proxy.dirty_clients.append(self)
        else:
            self.out.append(data)
        self.messages_out += 1

    def flush(self):
        out, self.out = self.out, None
        if self.closed or out is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        if self.wbuf:  # earlier bytes still wait: keep order
            self.wbuf += data
            return
        self._write(data)

    def _write(self, data):
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.proxy.close(self, f"write error: {error.strerror or error}")
            return
        self.bytes_out += sent
        if sent < len(data):
            self.wbuf = bytearray(memoryview(data)[sent:])
            self._set_events(self.events | WRITE)
        elif self.eof:
            self.proxy.flushed_after_eof(self)

    def on_writable(self):
        buf = self.wbuf
        try:
            sent = self.sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.proxy.close(self, f"write error: {error.strerror or error}")
            return
        self.bytes_out += sent
        del buf[:sent]
        if not buf:
            self.wbuf = None
            self._set_events(self.events & ~WRITE)
            if self.eof:
                self.proxy.flushed_after_eof(self)

    def pending_write_bytes(self):
        return len(self.wbuf) if self.wbuf else 0

    def _set_events(self, events):
        old, self.events = self.events, events
        reactor = self.proxy.reactor
        # A selector holds no socket without interest: leave it, and come back.
        if not events:
            reactor.unregister(self.sock)
        elif not old:
            reactor.register(self.sock, events, self)
        else:
            reactor.modify(self.sock, events, self)

    # -- identity ------------------------------------------------------------
    def is_active(self, now, window):
        """Active: sent data within the last `window` seconds (see README, Broadcasts)."""
        return self.last_read is not None and now - self.last_read <= window

    def plugin_data(self):
        if self.attrs is None:
            self.attrs = {}
        return self.attrs


def format_peer(peer):
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)
