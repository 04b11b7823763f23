"""One client TCP connection: its socket, identity, buffers and deadlines.

A `BufferedSocket` (bounded output buffer with watermarks) plus the few facts
the proxy and plugins ask about a client: its UUID, address, activity and
byte counts. A read goes straight to the proxy; replies are gathered during a
reactor pass and written once at its end (one `send` for many replies).
What the client does not read stays buffered in order, up to the limits the
proxy sets on this class from the config (`client_buffer_*`).

Memory per idle connection matters (tens of thousands of idle game clients),
hence `__slots__` and buffers that exist only while they hold data. A client
that came with a PROXY header or over TLS is an instance of a subclass made by
`pplex.frontdoor` (with the slots `proxy_header`, and `tls`, `tls_facts`), so
a plain client carries none of it: for it those names are the class's None.
"""
from pplex import reasons
from pplex.bufsock import BufferedSocket

RECV_BYTES = 65536


class Connection(BufferedSocket):
    __slots__ = (
        "proxy", "uuid", "peer", "opened", "last_read",
        "bytes_in", "bytes_out", "messages_in", "messages_out",
        "out", "eof", "close_reason",
        "framing_state", "authenticated", "upstream",
        "waiting", "waiting_bytes", "last_upstream", "merge_batch", "merge_index",
        "idle_timer", "linger_timer", "behind_timer", "attrs", "session",
        "__weakref__",
    )

    # Set per instance by the front door's subclasses only (see the module docstring).
    tls = None           # the pplex.tls.TlsEngine of a TLS client
    tls_facts = None     # {"tls_version", "tls_cipher", "tls_sni"?, "tls_client_subject"?}
    proxy_header = None  # the proxyproto.Header it came with

    @property
    def proxy_facts(self):
        """The PROXY header's facts as CONNECTED metadata (`proxyproto.Header.metadata()`, a new
        dict per call), or None without a header. Made when asked: it would cost each client ~700 B."""
        header = self.proxy_header
        return header.metadata() if header is not None else None

    def __init__(self, proxy, sock, uuid, peer, now):
        BufferedSocket.__init__(self, proxy.reactor, sock)
        self.proxy = proxy
        self.uuid = uuid
        self.peer = peer
        self.opened = now
        self.last_read = None     # monotonic time of the last bytes read; None: never sent any
        self.bytes_in = self.bytes_out = 0
        self.messages_in = self.messages_out = 0
        self.out = None           # replies gathered during this pass
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
        self.behind_timer = None  # slow-consumer deadline while above the high watermark
        self.attrs = None         # a dict for plugins, made on first use
        self.session = None       # where its CONNECTED went (the proxy's, README "Sessions"); None: no events

    def __repr__(self):
        return f"<Connection {self.uuid} {format_peer(self.peer)}>"

    # -- reading -------------------------------------------------------------
    def on_readable(self):
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.proxy.close(self, reasons.CLIENT_RESET, f"read error: {error.strerror or error}")
            return
        if data:
            self.bytes_in += len(data)
            try:
                self.proxy.received(self, data)
            except Exception:
                # The fault boundary of one client's input: it alone is closed.
                self.proxy.failed(self, "handling its input")
        else:
            self.proxy.client_eof(self)

    def deliver(self, data):
        """Bytes from the client that came another way than `on_readable` (TLS, the front door)."""
        self.bytes_in += len(data)
        try:
            self.proxy.received(self, data)
        except Exception:
            self.proxy.failed(self, "handling its input")

    def resume_reading(self):
        if not self.eof:
            BufferedSocket.resume_reading(self)

    # pplex.tlssock hooks (TLS clients only)
    tls_received = deliver

    def tls_closed(self):
        self.proxy.client_eof(self)

    def tls_failed(self, error):
        self.proxy.close(self, reasons.PROTOCOL_ERROR, f"TLS: {error}")

    def read_failed(self, error):
        self.proxy.close(self, reasons.CLIENT_RESET, f"read error: {error.strerror or error}")

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
        self.bytes_out += len(data)
        self.write(data)

    # BufferedSocket hooks: the proxy's slow-consumer policy.
    def pause_writing(self):
        self.proxy.client_behind(self)

    def resume_writing(self):
        self.proxy.client_caught_up(self)

    def buffer_overflow(self):
        self.proxy.client_overflow(self)

    def write_drained(self):
        if self.eof:
            self.proxy.flushed_after_eof(self)

    def write_failed(self, error):
        self.proxy.close(self, reasons.CLIENT_RESET, f"write error: {error.strerror or error}")

    def buffered_changed(self, delta):
        self.proxy.client_output_bytes += delta

    def pending_write_bytes(self):
        return self.buffered()

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
