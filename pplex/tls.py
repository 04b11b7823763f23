"""TLS without sockets: one engine per connection, the contexts it runs on, and their config shapes.

Owns everything `ssl` in pplex: a `TlsEngine` is one TLS connection as a
state machine on two `ssl.MemoryBIO`s (`SSLContext.wrap_bio`), so a
nonblocking socket owner (the reactor) feeds it the ciphertext it read and
writes the ciphertext it produces; nothing here blocks, reads a clock or
touches a socket. The owner arms the handshake deadline (to a worker: the
ready probe's) and reports `handshake_timed_out(seconds)`.

    engine = TlsEngine(upstream_context(spec, host).context, server_hostname=..., alpn="h2")
    engine.start(); sock.send(engine.data_to_send())          # ClientHello
    plain = engine.receive(sock.recv(n))                       # TlsError on failure
    engine.send(b"..."); sock.send(engine.data_to_send())      # buffered until the handshake is done

Contexts:
- to workers (`upstream_context`): upstream `tls` = `true` (the system's roots,
  `ssl.create_default_context`) or `{"ca_file", "cert_file", "key_file",
  "server_name"}` (all optional; cert and key together make it mTLS;
  `server_name` is sent as SNI and is the name the certificate must carry,
  else the upstream's host). ALPN offers `h2`; a worker that does not choose
  it is refused. There is no way to skip verification.
- for clients (`ServerTls`): `{"cert_file", "key_file", "ca_file"?, "min_version"?}`;
  with `ca_file` every client must present a certificate it signed.
  `reload()` reads the files again (SIGHUP): new connections get the new
  certificate, open ones keep theirs.

Every failure is one line (`TlsError`), worded after OpenSSL's reason:
`certificate verify failed: <reason>`, `peer did not agree on ALPN h2`,
`handshake timed out after 5 s`, `the connection closed during the TLS handshake`, ...
"""
import os
import ssl

import voluptuous as vol

READ_BYTES = 256 * 1024    # plaintext taken from the engine per SSLObject.read() call
ALPN_H2 = "h2"
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """A TLS failure, as one line fit for `last_error` and the log."""


def describe_ssl_error(error):
    """One line for an `ssl.SSLError` (or a plain OSError) raised by OpenSSL."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLEOFError):
        return "the connection closed during the TLS handshake"
    reason = getattr(error, "reason", None)
    if reason:
        return describe_reason(reason)
    text = str(error.args[1] if len(error.args) > 1 else error).splitlines()[0] if error.args else repr(error)
    return f"TLS error: {text}"


def describe_reason(reason, detail=""):
    """One line for OpenSSL's reason code (`CERTIFICATE_VERIFY_FAILED`, ...) and its detail text.

    Shared with the grpcio transport, whose errors carry the same codes in their text.
    """
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return f"certificate verify failed: {detail}" if detail else "certificate verify failed"
    for prefix in ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_"):
        if reason.startswith(prefix):
            # An alert the peer sent: it refused us (our certificate, our version, ...).
            return f"the peer refused the TLS handshake: {_words(reason[len(prefix):])}"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the peer sent no certificate and one is required"
    if reason == "WRONG_VERSION_NUMBER":
        return "the peer does not speak TLS (wrong version number)"
    return f"TLS error: {_words(reason)}"


def hostname_mismatch(name):
    """The wording of Python's ssl module for a certificate that does not carry `name`."""
    return f"certificate verify failed: Hostname mismatch, certificate is not valid for '{name}'."


def _words(reason):
    return reason.replace("_", " ").lower()


class TlsTimeout(TlsError):
    """The handshake did not end within its deadline."""


def handshake_timed_out(seconds):
    """The error an owner reports when its handshake deadline passes."""
    return TlsTimeout(f"handshake timed out after {seconds:g} s")


class TlsEngine:
    """One TLS connection (client or server side) between a socket owner and plaintext.

    Ciphertext in: `receive(data)` (returns the plaintext it decrypted),
    `receive_eof()` when the socket reads EOF. Plaintext in: `send(data)`.
    Ciphertext out: `data_to_send()`, after every call. `close()` queues a
    close_notify. Raises `TlsError` (one line) from `start`, `receive` and
    `receive_eof`; after one, the engine is `failed` and takes nothing more.
    """

    __slots__ = ("_in", "_out", "_obj", "_waiting", "_waiting_bytes", "alpn", "server_side",
                 "server_hostname", "established", "peer_closed", "closing", "failed")

    def __init__(self, context, server_side=False, server_hostname=None, alpn=None):
        """`context`: an SSLContext. `alpn`: the protocol the peer must choose (client side), or None."""
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None if server_side else server_hostname)
        self._waiting = []          # plaintext sent before the handshake finished
        self._waiting_bytes = 0
        self.alpn = alpn
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.established = False    # the handshake is done (and ALPN agreed when required)
        self.peer_closed = False    # the peer sent close_notify (or EOF after the handshake)
        self.closing = False        # we queued close_notify
        self.failed = None          # the TlsError that ended it

    # -- ciphertext from the socket --------------------------------------------
    def start(self):
        """Begin the handshake (a client's ClientHello goes to `data_to_send()`)."""
        self._handshake()

    def receive(self, data):
        """Feed ciphertext read from the socket; return the plaintext it completes (maybe b"")."""
        if self.failed is not None:
            raise self.failed
        self._in.write(data)
        if not self.established:
            self._handshake()
            if not self.established:
                return b""
        return self._read()

    def receive_eof(self):
        """The socket read EOF. During the handshake that is an error; after it the peer has closed."""
        if self.failed is not None:
            raise self.failed
        self._in.write_eof()
        if not self.established:
            raise self._fail(TlsError("the connection closed during the TLS handshake"))
        self.peer_closed = True

    def _handshake(self):
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except (ssl.SSLError, OSError) as error:
            raise self._fail(TlsError(describe_ssl_error(error))) from None
        if self.alpn is not None and self._obj.selected_alpn_protocol() != self.alpn:
            raise self._fail(TlsError(f"peer did not agree on ALPN {self.alpn}"))
        self.established = True
        if self._waiting:
            waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
            for chunk in waiting:
                self._obj.write(chunk)

    def _read(self):
        obj = self._obj
        chunks = []
        while True:
            try:
                chunk = obj.read(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):   # close_notify; or EOF without it
                self.peer_closed = True
                break
            except (ssl.SSLError, OSError) as error:
                # A post-handshake alert (a TLS 1.3 server refusing our certificate lands here).
                raise self._fail(TlsError(describe_ssl_error(error))) from None
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def _fail(self, error):
        self.failed = error
        return error

    # -- plaintext to the socket -------------------------------------------------
    def send(self, data):
        """Encrypt plaintext (kept until the handshake is done); the ciphertext is in `data_to_send()`."""
        if self.failed is not None:
            raise self.failed
        if self.closing:
            raise TlsError("cannot send after close_notify")
        if not data:
            return
        if not self.established:
            self._waiting.append(bytes(data))
            self._waiting_bytes += len(data)
            return
        self._obj.write(data)

    def data_to_send(self):
        """The ciphertext waiting for the socket (b"" when none); the engine forgets it."""
        return self._out.read()

    def buffered(self):
        """Bytes held inside the engine for the socket: plaintext waiting for the handshake, and ciphertext."""
        return self._waiting_bytes + self._out.pending

    def close(self):
        """Queue close_notify (sent with `data_to_send()`); nothing is sent after it."""
        if self.closing or self.failed is not None:
            return
        self.closing = True
        if not self.established:
            return
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass   # our close_notify is out; the peer's has not come: we do not wait for it
        except (ssl.SSLError, OSError):
            pass

    # -- what was agreed -----------------------------------------------------------
    def info(self):
        """{"version", "cipher", "alpn", "sni", "peer_subject"} once established (None values before)."""
        obj = self._obj
        cipher = obj.cipher() if self.established else None
        sni = self.server_hostname
        if self.server_side:
            sni = getattr(obj, "sni", None)
        peer = obj.getpeercert() if self.established else None
        return {
            "version": obj.version() if self.established else None,
            "cipher": cipher[0] if cipher else None,
            "alpn": obj.selected_alpn_protocol() if self.established else None,
            "sni": sni,
            "peer_subject": format_subject(peer.get("subject")) if peer else None,
        }


def format_subject(subject):
    """`getpeercert()["subject"]` ((("commonName", "x"),), ...) -> "CN=x,O=y"."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
    return ",".join(f"{short.get(key, key)}={value}" for rdn in subject for key, value in rdn)


# -- contexts ---------------------------------------------------------------------------
class UpstreamTls:
    """How pplex speaks TLS to one worker: the SSLContext, and the name the certificate must carry."""

    __slots__ = ("context", "server_name", "spec")

    def __init__(self, context, server_name, spec):
        self.context = context
        self.server_name = server_name
        self.spec = spec

    def engine(self):
        """A fresh client-side engine for one connection, ALPN h2 required."""
        return TlsEngine(self.context, server_hostname=self.server_name, alpn=ALPN_H2)


def upstream_context(spec, host):
    """Build the client context for an upstream `tls` value (True or a dict); raise TlsError naming the file."""
    if spec is True:
        spec = {}
    context = _load(lambda: ssl.create_default_context(cafile=spec.get("ca_file")), spec, "ca_file")
    if spec.get("cert_file"):
        _load(lambda: context.load_cert_chain(spec["cert_file"], spec["key_file"]), spec, "cert_file", "key_file")
    context.set_alpn_protocols([ALPN_H2])
    return UpstreamTls(context, spec.get("server_name") or host.strip("[]"), spec)


class ServerTls:
    """The client-facing server context; `reload()` swaps in a new one built from the same files."""

    def __init__(self, spec):
        self.spec = spec
        self.context = server_context(spec)

    def reload(self):
        """Read the files again. On failure the current context stays and TlsError says why."""
        self.context = server_context(self.spec)
        return self.context

    def engine(self):
        context = self.context
        return TlsEngine(context, server_side=True)


def server_context(spec):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[spec.get("min_version", "TLSv1.2")]
    _load(lambda: context.load_cert_chain(spec["cert_file"], spec["key_file"]), spec, "cert_file", "key_file")
    if spec.get("ca_file"):
        _load(lambda: context.load_verify_locations(cafile=spec["ca_file"]), spec, "ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    context.sni_callback = _remember_sni
    return context


def _remember_sni(ssl_object, server_name, context):
    ssl_object.sni = server_name   # read back by TlsEngine.info()


class TlsFileError(TlsError):
    """A certificate or key file that does not load: `key: cannot load PATH: why`."""

    def __init__(self, key, paths, why, partner=None):
        super().__init__(f"{key}: cannot load {paths}: {why}")
        self.key = key
        self.why = why
        self.partner = partner   # the other file of a cert/key pair that does not fit


def _load(load, spec, *keys):
    """Run a loader; a failure becomes TlsFileError naming the file."""
    try:
        return load()
    except ssl.SSLError as error:
        why = _words(error.reason or str(error))
        given = [k for k in keys if spec.get(k)]
        if len(given) == 2:   # both files read: the pair does not parse or does not match
            raise TlsFileError(given[0], f"{spec[given[0]]} and {spec[given[1]]}", why, given[1]) from None
        key = given[0] if given else keys[0]
        raise TlsFileError(key, spec.get(key), why) from None
    except OSError as error:
        missing = [k for k in keys if spec.get(k) and not os.path.isfile(spec[k])]
        key = (missing or [k for k in keys if spec.get(k)] or keys)[0]
        raise TlsFileError(key, spec.get(key), error.strerror or str(error)) from None


# -- config shapes (voluptuous validators) ------------------------------------------------
def _path(value):
    # The messages leave the path out: config errors add `(got "PATH")`, and the admin API's caller sent it.
    if not isinstance(value, str) or not value:
        raise vol.Invalid("expected a file path")
    if not os.path.isfile(value):
        raise vol.Invalid("no such file")
    return value


def _server_name(value):
    if not isinstance(value, str) or not value or len(value) > 253:
        raise vol.Invalid("expected a host name")
    return value


_UPSTREAM_SHAPE = vol.Schema({
    vol.Optional("ca_file"): _path,
    vol.Optional("cert_file"): _path,
    vol.Optional("key_file"): _path,
    vol.Optional("server_name"): _server_name,
})

_SERVER_SHAPE = vol.Schema({
    vol.Required("cert_file"): _path,
    vol.Required("key_file"): _path,
    vol.Optional("ca_file"): _path,
    vol.Optional("min_version"): vol.In(tuple(MIN_VERSIONS), msg=f"expected one of {', '.join(MIN_VERSIONS)}"),
})


def validate_upstream_tls(value):
    """An upstream's `tls`: False/None (plaintext), True, or the dict; the files must load."""
    if value is None or value is False:
        return None
    if value is True:
        _checked(lambda: upstream_context(True, "localhost"))
        return True
    if not isinstance(value, dict):
        raise vol.Invalid("expected true, false or an object with ca_file, cert_file, key_file, server_name")
    spec = _UPSTREAM_SHAPE(value)
    if ("cert_file" in spec) != ("key_file" in spec):
        missing = "key_file" if "cert_file" in spec else "cert_file"
        raise vol.Invalid("cert_file and key_file go together", path=[missing])
    _checked(lambda: upstream_context(spec, "localhost"))
    return spec


def validate_server_tls(value):
    """The client-facing `tls` object; the files must load."""
    if not isinstance(value, dict):
        raise vol.Invalid("expected an object with cert_file, key_file, ca_file, min_version")
    spec = _SERVER_SHAPE(value)
    _checked(lambda: server_context(spec))
    return spec


def _checked(build):
    try:
        build()
    except TlsFileError as error:
        together = f" with {error.partner}" if error.partner else ""
        raise vol.Invalid(f"cannot load{together}: {error.why}", path=[error.key]) from None
