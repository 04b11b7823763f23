"""The front door: what happens to a client between accept and open (PROXY header, TLS handshake).

With neither `server.proxy_protocol` nor `server.tls` set, the listener hands
each accepted socket straight to the proxy and nothing here runs. Otherwise
each accepted socket becomes an `Arrival` that goes through, in order:

1. **trust** (PROXY protocol on): a peer outside `server.proxy_protocol_from`
   is closed at once: nobody else may claim another address;
2. **PROXY header** (plaintext): parsed as its bytes come
   (`proxyproto.HeaderParser`), whole within `proxy_protocol_timeout`; the
   address it carries becomes the client's; the bytes after it go on untouched;
3. **TLS handshake** (`server.tls`): within `tls_handshake_timeout`, the bytes
   after the header being its first; with `ca_file` the client must present a
   certificate that CA signed;
4. **open**: the proxy runs the accept rules (`pplex_accept`) on the client's
   address, then opens it (UUID, counters, `pplex_connection_opened`) with
   what the stages learnt: `conn.peer`, `conn.proxy_header` (`conn.proxy_facts`), `conn.tls_facts`,
   the TLS engine, and the plaintext that came with the last bytes read.

An arrival holds at most `limits.FRONT_DOOR_MAX_BYTES` of what its client
sent, is bounded in time by the stages' deadlines, and counts against
`max_connections`. A failure closes that client alone, is counted by kind
(`/stats` `front_door`, `pplex_front_door_failures_total{kind}`) and logged,
rate limited per kind. `reload_tls()` (SIGHUP) reads the certificate again
for new connections; open ones keep theirs.
"""
import logging

from pplex import limits
from pplex.bufsock import BufferedSocket
from pplex.connection import format_peer
from pplex.errors import ConfigError
from pplex.logs import FAULTS, RateLimited
from pplex.proxyproto import HeaderParser, ProxyHeaderError, TrustedSources
from pplex.reactor import READ, WRITE
from pplex.tls import ServerTls, TlsError, TlsFileError, TlsTimeout
from pplex.tlssock import TlsSocket

log = logging.getLogger("pplex.frontdoor")
_limited = RateLimited()

# Kinds of failure at the front door (the keys of the `front_door` counters).
PROXY_UNTRUSTED = "proxy_untrusted"    # a PROXY header is expected and the peer is not a trusted source
PROXY_MALFORMED = "proxy_malformed"    # the bytes are not a valid PROXY header
PROXY_TIMEOUT = "proxy_timeout"        # no whole header within proxy_protocol_timeout
TLS_HANDSHAKE = "tls_handshake"        # the handshake failed (no, or a bad, client certificate included)
TLS_TIMEOUT = "tls_timeout"            # no finished handshake within tls_handshake_timeout
TOO_LARGE = "too_large"                # more than FRONT_DOOR_MAX_BYTES before it was open
CLIENT_LEFT = "client_left"            # it closed or reset its connection before it was open
INTERNAL_ERROR = "internal_error"      # pplex failed while it arrived (a bug: counted as a contained error too)
KINDS = (PROXY_UNTRUSTED, PROXY_MALFORMED, PROXY_TIMEOUT, TLS_HANDSHAKE, TLS_TIMEOUT, TOO_LARGE, CLIENT_LEFT,
         INTERNAL_ERROR)


def tls_facts(engine):
    """What a finished handshake agreed, as CONNECTED metadata: tls_version, tls_cipher, and when
    known tls_sni and tls_client_subject ("CN=...,O=..."), all strings."""
    info = engine.info()
    facts = {}
    for key, name in (("version", "tls_version"), ("cipher", "tls_cipher"), ("sni", "tls_sni"),
                      ("peer_subject", "tls_client_subject")):
        if info[key]:
            facts[name] = info[key]
    return facts


class FrontDoor:
    """The stages between accept and open for the client listener; every method runs on the reactor thread.

    :param server: the validated `server` config section.
    :param client_class: the proxy's plaintext client class; the door derives
        from it the classes of clients that came with a PROXY header or TLS.
    :param open_client: `open_client(sock, peer, arrival=None) -> conn or None`
        (the proxy's; None: its accept rules refused the client).
    :param stats: the proxy's `Stats` (refusals are counted in `stats.front_door`).
    Raises ConfigError when `server.tls` no longer loads.
    """

    def __init__(self, reactor, server, client_class, open_client, stats):
        self.reactor = reactor
        self.open_client = open_client
        self.stats = stats
        self.mode = server.get("proxy_protocol", "off")
        self.trusted = TrustedSources(server.get("proxy_protocol_from", ())) if self.mode != "off" else None
        self.header_timeout = server.get("proxy_protocol_timeout", limits.PROXY_PROTOCOL_TIMEOUT.default)
        self.handshake_timeout = server.get("tls_handshake_timeout", limits.TLS_HANDSHAKE_TIMEOUT.default)
        self.tls = None
        if server.get("tls"):
            try:
                self.tls = ServerTls(server["tls"])
            except TlsFileError as error:
                raise ConfigError(f"server.tls.{error}") from None
        self.arriving = {}      # Arrival -> None: clients between accept and open (an ordered set)
        self.listener = None    # told when an arrival leaves without opening (a slot is free again)
        self.proxied_class = type("ProxiedClient", (client_class,), {"__slots__": ("proxy_header",)})
        self.tls_class = type("TlsClient", (TlsSocket, client_class),
                              {"__slots__": ("tls", "tls_timer", "tls_facts", "proxy_header")})
        self.staged = self.mode != "off" or self.tls is not None
        # What the listener calls per accepted socket: with nothing to do here, the proxy itself.
        self.on_accept = self._arrive if self.staged else open_client

    def counter(self, conns):
        """The listener's count of open clients: `conns`, plus those still arriving."""
        if not self.staged:
            return conns.__len__
        arriving = self.arriving
        return lambda: len(conns) + len(arriving)

    # -- arriving -----------------------------------------------------------------------------
    def _arrive(self, sock, peer):
        if self.trusted is not None and not self.trusted.trusts(peer[0]):
            self.count(PROXY_UNTRUSTED, peer, "a PROXY header is accepted only from server.proxy_protocol_from")
            sock.close()
            return
        sock.setblocking(False)
        arrival = Arrival(self, sock, peer)
        self.arriving[arrival] = None
        arrival.set_events(READ)
        if self.mode != "off":
            arrival.parser = HeaderParser(self.mode)
            arrival.timer = self.reactor.call_later(self.header_timeout, arrival.header_deadline)
        else:
            arrival.begin_tls(b"")

    def left(self, arrival):
        """An arrival is gone (opened, refused or failed): its slot counts no more."""
        self.arriving.pop(arrival, None)
        if self.listener is not None:
            self.listener.client_left()

    def count(self, kind, peer, detail):
        failures = self.stats.front_door
        failures[kind] = failures.get(kind, 0) + 1
        if kind == CLIENT_LEFT:
            log.debug("client %s left before it was open: %s", format_peer(peer), detail)
            return
        _limited.warning(log, ("front door", kind), "client %s closed before it was open (%s): %s",
                         format_peer(peer), kind, detail)

    def close_all(self):
        """Close every client still arriving (shutdown); none of them was open."""
        for arrival in list(self.arriving):
            arrival.close_socket(reset=True)
            self.arriving.pop(arrival, None)

    # -- the certificate ---------------------------------------------------------------------------
    def reload_tls(self):
        """Read server.tls's files again (SIGHUP): new connections get the new certificate; logged.
        A failed reload keeps the current one and says why."""
        if self.tls is None:
            log.info("SIGHUP: server.tls is not set, nothing to reload")
            return False
        spec = self.tls.spec
        try:
            self.tls.reload()
        except TlsError as error:
            log.error("server.tls: reload failed, still serving the previous certificate: %s", error)
            return False
        log.info("server.tls: reloaded %s: new connections get it, open ones keep theirs", spec["cert_file"])
        return True


class Arrival(TlsSocket, BufferedSocket):
    """One client between accept and open: its PROXY header, then its TLS handshake (see the module)."""

    __slots__ = ("door", "peer", "parser", "timer", "got", "header", "early", "eof", "tls", "tls_timer")

    tls_recv_bytes = limits.FRONT_DOOR_RECV_BYTES

    def __init__(self, door, sock, peer):
        BufferedSocket.__init__(self, door.reactor, sock)
        self.door = door
        self.peer = peer
        self.parser = None        # a HeaderParser while the PROXY header is due
        self.timer = None         # the PROXY header's deadline
        self.got = 0              # bytes read from the client so far
        self.header = None        # the PROXY header, once parsed
        self.early = b""          # plaintext that came before the client was open
        self.eof = False          # the client closed cleanly right after its handshake
        self.tls = None
        self.tls_timer = None

    def __repr__(self):
        return f"<Arrival {format_peer(self.peer)}>"

    @property
    def client_class(self):
        return self.door.tls_class if self.tls is not None else self.door.proxied_class

    # -- reading ----------------------------------------------------------------------------------
    def on_readable(self):
        if self.closed:
            return
        try:
            self._read()
        except Exception:
            # The fault boundary of one arriving client: it alone is closed.
            FAULTS.report("front door", "a client arriving from %s; closing it", format_peer(self.peer), logger=log)
            self.fail(INTERNAL_ERROR, "internal error while it arrived", reset=True)

    def _read(self):
        try:
            data = self.sock.recv(limits.FRONT_DOOR_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.read_failed(error)
            return
        self.got += len(data)
        if self.got > limits.FRONT_DOOR_MAX_BYTES:
            self.fail(TOO_LARGE, f"sent more than {limits.FRONT_DOOR_MAX_BYTES} bytes before it was open",
                      reset=True)
        elif self.parser is not None:
            self._header_bytes(data)
        else:
            self.tls_feed(data)
            self._open_if_ready()

    def _header_bytes(self, data):
        if not data:
            self.fail(CLIENT_LEFT, "it closed before its PROXY header was whole")
            return
        try:
            header = self.parser.feed(data)
        except ProxyHeaderError as error:
            self.fail(PROXY_MALFORMED, f"bad PROXY header: {error}")
            return
        if header is None:
            return
        self.parser = None
        self._cancel_timer()
        address = header.client_address()
        if address is not None:
            self.peer = address
        rest, header.rest = header.rest, b""   # the client's bytes go on; the header keeps its facts
        self.header = header
        if self.door.tls is None:
            self.early = rest
            self._open()
        else:
            self.begin_tls(rest)

    def header_deadline(self):
        self.timer = None
        if not self.closed and self.parser is not None:
            self.fail(PROXY_TIMEOUT, f"no whole PROXY header within {self.door.header_timeout:g} s")

    def begin_tls(self, data):
        door = self.door
        self.start_tls(door.tls.engine(), door.handshake_timeout, data)
        self._open_if_ready()

    def _open_if_ready(self):
        if not self.closed and self.tls is not None and self.tls.established:
            self._open()

    # TlsSocket hooks
    def tls_received(self, data):
        self.early += data   # at most one read's worth: the handshake's last bytes end the arrival

    def tls_closed(self):
        if self.tls.established:
            self.eof = True   # it sent something and closed at once: open it, deliver, then close
        else:
            self.fail(CLIENT_LEFT, "it closed during the TLS handshake")

    def tls_failed(self, error):
        kind = TLS_TIMEOUT if isinstance(error, TlsTimeout) else TLS_HANDSHAKE
        if str(error) == "the connection closed during the TLS handshake":
            kind = CLIENT_LEFT
        self.fail(kind, f"TLS: {error}")

    def read_failed(self, error):
        self.fail(CLIENT_LEFT, f"read error: {error.strerror or error}", reset=True)

    def write_failed(self, error):
        self.fail(CLIENT_LEFT, f"write error: {error.strerror or error}", reset=True)

    # -- leaving -----------------------------------------------------------------------------------
    def _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def fail(self, kind, detail, reset=False):
        """Close this client alone: counted, logged (rate limited)."""
        if self.closed:
            return
        self._cancel_timer()
        self.close_socket(reset=reset)
        self.door.count(kind, self.peer, detail)
        self.door.left(self)

    def _open(self):
        """Every stage passed: hand the socket to the proxy (which may still refuse it by its rules)."""
        self._cancel_timer()
        self._settled()
        sock = self.sock
        self.set_events(0)       # the connection registers it anew, as its own
        self.closed = True       # this object is done; the socket lives on in the connection
        door = self.door
        door.arriving.pop(self, None)
        try:
            conn = door.open_client(sock, self.peer, self)
        except Exception:
            FAULTS.report("front door", "opening a client from %s; closing it", format_peer(self.peer), logger=log)
            door.count(INTERNAL_ERROR, self.peer, "internal error while it was opened")
            sock.close()
            conn = None
        if conn is None and door.listener is not None:
            door.listener.client_left()

    def hand_over(self, conn):
        """Called by the proxy with the new connection: give it what was learnt, and the socket's interest."""
        conn.proxy_header = self.header
        events = READ
        tls = self.tls
        if tls is not None:
            conn.tls = tls
            conn.tls_timer = None
            conn.tls_facts = tls_facts(tls)
            buf, self.wbuf = self.wbuf, None
            if buf:   # handshake bytes (session tickets) the kernel has not taken yet
                conn.wbuf = buf
                conn.buffered_changed(len(buf))
                events |= WRITE
        conn.set_events(events)

    def deliver(self, conn):
        """Called by the proxy once the connection is open: what the client sent with its last bytes."""
        early, self.early = self.early, b""
        if early and not conn.closed:
            conn.deliver(early)
        if self.eof and not conn.closed:
            conn.tls_closed()
