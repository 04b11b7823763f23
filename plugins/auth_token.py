"""Token authentication: a client's first message must be one of the configured tokens.

The first message (as the framing cut it) is compared with every token, each
comparison in constant time (`hmac.compare_digest`), all of them always made,
so timing tells nothing about which token, or how much of one, matched.
- A match authenticates the connection; the token message is consumed and
  never reaches a worker.
- Anything else closes the client ("authentication failed"); nothing it sent
  reaches a worker.
- A client that sends no token within `auth_timeout` seconds of connecting is
  closed ("no token within N s").

Framing: with `framing_line` the delimiter is already stripped, so the line is
the token; with `framing_len` the frame is. With raw framing (a stream without
boundaries) one trailing "\\r\\n" or "\\n" is stripped before comparing, so
`printf 's3cret\\n' | nc` works; the token must then arrive in one read, alone
(send it, then wait for anything before sending more).

Settings (`"plugins": {"auth_token": {...}}`):
- `tokens` (required): a non-empty list of non-empty strings, compared as UTF-8.
- `auth_timeout` (default 5): seconds a new connection has to send its token, greater than 0 and at
  most 300 (the bound of the front door's own handshake timeouts).
"""
import hmac

import voluptuous as vol

from pplex import hookimpl
from pplex.errors import shown

MAX_AUTH_TIMEOUT = 300
_tokens = []
_state = {"timeout": 5.0, "context": None, "raw": None}
_timers = {}  # conn -> deadline Timer, while the connection is unauthenticated


def Tokens(value):
    """a non-empty list of non-empty strings"""
    if not isinstance(value, list) or not value:
        raise vol.Invalid("expected a non-empty list of token strings")
    for index, token in enumerate(value):
        if not isinstance(token, str) or not token:
            raise vol.Invalid(f"expected a non-empty string (got {shown(token)})", path=[index])
    return value


def Seconds(value):
    """seconds, greater than 0 and at most 300"""
    # `not 0 < value` also refuses NaN; the bound refuses Infinity (TOML has both)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_AUTH_TIMEOUT:
        raise vol.Invalid(f"expected a number of seconds greater than 0 and at most {MAX_AUTH_TIMEOUT} "
                          f"(got {shown(value)})")
    return value


@hookimpl
def pplex_settings_schema():
    return {
        vol.Required("tokens"): Tokens,
        vol.Optional("auth_timeout", default=5): Seconds,
    }


@hookimpl
def pplex_configure(settings, context):
    _tokens[:] = [token.encode("utf-8") for token in settings["tokens"]]
    _state.update(timeout=float(settings["auth_timeout"]), context=context, raw=None)
    for timer in _timers.values():
        timer.cancel()
    _timers.clear()


def _strips_newline():
    """True under a framing without boundaries (raw): then a typed token ends with a newline."""
    raw = _state["raw"]
    if raw is None:
        proxy = _state["context"].proxy if _state["context"] is not None else None
        raw = _state["raw"] = bool(getattr(proxy, "merges", False))
    return raw


def matches(payload, strip_newline=False):
    """Is `payload` one of the tokens? Constant time per token, every token compared."""
    if strip_newline:
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        elif payload.endswith(b"\n"):
            payload = payload[:-1]
    payload = bytes(payload)
    found = False
    for token in _tokens:
        found |= hmac.compare_digest(payload, token)
    return found


@hookimpl
def pplex_connection_opened(conn):
    if conn.authenticated:
        return  # another plugin let it in already
    context = _state["context"]
    _timers[conn] = context.reactor.call_later(_state["timeout"], _deadline, conn)


def _deadline(conn):
    _timers.pop(conn, None)
    if not conn.closed and not conn.authenticated:
        _state["context"].proxy.close(conn, "auth_failed", f"no token within {_state['timeout']:g} s")


def _disarm(conn):
    timer = _timers.pop(conn, None)
    if timer is not None:
        timer.cancel()


@hookimpl
def pplex_authenticate(conn, payload):
    if matches(payload, _strips_newline()):
        _disarm(conn)
        return True
    return False


@hookimpl
def pplex_connection_authenticated(conn):
    _disarm(conn)


@hookimpl
def pplex_connection_closed(conn):
    _disarm(conn)
