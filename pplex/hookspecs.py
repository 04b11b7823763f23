"""Every hook pplex calls, in one place: the contract between pplex and its plugins.

A plugin is a module (or object) with functions named after these specs and
marked with `pplex.hookimpl`. An implementation may accept any subset of the
parameters, by name, so adding a parameter later breaks no plugin.

Which hooks run per message: `pplex_authenticate`, `pplex_route`,
`pplex_balance` and the methods of the framing object; `pplex_broadcast` runs
per broadcast. pplex resolves them into direct calls once at startup (see
`pplex.manager.PluginSet`), so a message never pays pluggy's dispatch. The
slot hooks (framing, route, balance, broadcast) are exclusive: exactly one
enabled plugin fills each, a default one unless you enable another.

Semantics chosen per hook:
- firstresult ("first non-None wins"): a decision with one answer, where a
  plugin may also decline (return None) and let the next one decide;
- plain (every implementation runs, results ignored): observers;
- wrappers: any hook accepts a `@hookimpl(wrapper=True)` generator that runs
  before and after the others and sees (or replaces) their result, for a
  plugin that must see both sides (timing a routing decision, overriding a
  balancer's choice). A wrapper on a per-message hook makes pplex call that
  hook through pluggy, with pluggy's cost, instead of a direct call.

What an exception raised by an implementation means (the caller is the fault
boundary; every contained error is counted in `pplex_errors_total{where}` and
logged with its traceback, rate limited, and pplex goes on):
- startup hooks (`pplex_settings_schema`, `pplex_configure`): startup stops
  with a one-line error naming the plugin (exit 2);
- per-client hooks (`pplex_accept`, `pplex_authenticate`, `pplex_route`,
  `pplex_balance`, the framing object's `decode`): that client alone is closed
  (reason `internal_error`; `pplex_accept` refuses it); a `FrameError` from
  `decode` is the client's fault instead (reason `protocol_error`);
- the framing object's `encode`: that reply is dropped and counted
  (`drops{reason="reply_not_encodable"}`); the client and every other reply go on;
- `pplex_broadcast`: that broadcast is dropped and counted (`broadcast_failed`);
- observers (`pplex_connection_*`, `pplex_upstream_*`): ignored; the other
  implementations still run, and the state change they observe is already
  complete (a worker leaving rotation has left it).
"""
import pluggy

hookspec = pluggy.HookspecMarker("pplex")


# -- startup -----------------------------------------------------------------
@hookspec(firstresult=True)
def pplex_settings_schema():
    """Return the voluptuous schema (a dict or `voluptuous.Schema`) of this plugin's settings.

    Asked once per plugin at startup, for its own settings only: the object
    under `"plugins": {"NAME": {...}}` in pplex.json. The validated settings
    are passed to `pplex_configure`. A plugin without settings needs no impl;
    it then accepts only an empty object.
    """


@hookspec
def pplex_configure(settings, context):
    """Called once per plugin at startup, before any connection, with its own validated settings.

    :param settings: this plugin's validated settings (a dict, maybe empty).
    :param context: a `pplex.manager.Context`: the reactor (`context.reactor`,
        for timers), the whole validated config (`context.config`) and the
        proxy's public view (`context.proxy`: connections, upstreams, stats).
    """


# -- slot: framing -----------------------------------------------------------
@hookspec(firstresult=True)
def pplex_framing():
    """Return the framing object that cuts client bytes into messages and encodes replies.

    The object has:
    - `decode(conn, data) -> list of bytes`: the messages completed by `data`
      (keep partial input in `conn.framing_state`); raise `pplex.FrameError`
      to close that client with the error's text as the reason.
    - `encode(payload) -> bytes`: what to write to the client for a reply.
    - `merges` (bool): True when the byte stream has no boundaries to keep, so
      bytes a client sends while its previous message still waits for its
      stream may join that message (raw framing).
    Called once at startup.
    """


# -- auth --------------------------------------------------------------------
@hookspec(firstresult=True)
def pplex_accept(address):
    """May a connection from `address` (host, port) open? Called once, before it opens.

    `address` is the client's: with the PROXY protocol, the one its header
    carries. It runs after the front door's steps (PROXY header, TLS handshake).

    Return False to close it at once (its reason is logged), True to accept,
    None for no opinion. First non-None wins; with no opinion it is accepted.
    """


@hookspec(firstresult=True)
def pplex_authenticate(conn, payload):
    """Called for each message of a connection that is not yet authenticated.

    Only called when some enabled plugin implements it; connections then start
    unauthenticated. Return True: authenticated (this message is consumed, not
    forwarded); False: close the client (nothing reached a worker); None: keep
    waiting (the message is dropped). First non-None wins.
    """


# -- slot: routing and balancing -----------------------------------------------
@hookspec(firstresult=True)
def pplex_route(conn, payload, ready):
    """Return the candidate workers for one message (a sequence of upstreams).

    :param ready: the live list of workers in rotation (do not mutate it).
    Return an empty sequence to hold the message until a candidate is ready
    (it waits in the client's bounded queue). First non-None wins.

    Also asked where a client's lifecycle event goes (README, "Sessions"):
    then `payload` is b"", `ready` the workers in rotation that asked for
    events, and `conn` may be closed already (a DISCONNECTED); an empty answer
    leaves the choice to the balancer among all of them.
    """


@hookspec(firstresult=True)
def pplex_balance(conn, payload, candidates):
    """Pick one upstream among `candidates` (non-empty) for one message. First non-None wins.

    Also asked for a client's lifecycle event, with `payload` b"" (see `pplex_route`); an answer
    outside `candidates` is replaced by the first of them."""


# -- slot: broadcast -----------------------------------------------------------
@hookspec(firstresult=True)
def pplex_broadcast(kind, connections, now):
    """Turn a broadcast target into the connections that receive it.

    :param kind: 0 ALL, 1 ACTIVE, 2 NOT_ACTIVE (`OutputStreamRequest.Broadcast`).
    :param connections: every open connection (a dict view; do not mutate).
    :param now: the reactor clock (monotonic seconds), to compare with `conn.last_read`.
    Return an iterable of connections; None means "unknown kind" (counted and logged).
    """


# -- lifecycle (observers) -----------------------------------------------------
@hookspec
def pplex_connection_opened(conn):
    """A client connection was accepted and got its UUID."""


@hookspec
def pplex_connection_authenticated(conn):
    """A connection passed `pplex_authenticate`."""


@hookspec
def pplex_connection_closed(conn, reason):
    """A client connection closed; `reason` says why, in words."""


@hookspec
def pplex_upstream_added(upstream):
    """An upstream worker was registered (config, CLI or admin API)."""


@hookspec
def pplex_upstream_ready(upstream):
    """An upstream worker entered rotation."""


@hookspec
def pplex_upstream_lost(upstream, reason):
    """An upstream worker left rotation (stream broke, live failed, drained, removed)."""
