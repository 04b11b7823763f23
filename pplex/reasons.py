"""Why a client connection ended: the closed set of reason codes, each with its one-line meaning.

The one list of them: the same words appear in the log line of every close,
in `/stats` (`closes` by reason), in `/metrics`
(`pplex_connections_closed_total{reason}`), and to workers that asked for
lifecycle events (DISCONNECTED `metadata["reason"]`, README "Sessions").
A new code needs a line here and a row in README's table, which a test
checks against this list, in this order.
"""
CLIENT_CLOSED = "client_closed"
CLIENT_RESET = "client_reset"
IDLE_TIMEOUT = "idle_timeout"
SLOW_CONSUMER = "slow_consumer"
PROTOCOL_ERROR = "protocol_error"
AUTH_FAILED = "auth_failed"
CLOSED_BY_WORKER = "closed_by_worker"
CLOSED_BY_ADMIN = "closed_by_admin"
SHUTDOWN = "shutdown"
NO_UPSTREAM = "no_upstream"
INTERNAL_ERROR = "internal_error"
CLOSED_BY_PLUGIN = "closed_by_plugin"

REASONS = {
    CLIENT_CLOSED: "the client closed its side (EOF) and pplex delivered what was owed to it, then closed",
    CLIENT_RESET: "the connection broke: reset by the client, a write failed, or TCP keepalive found the peer gone",
    IDLE_TIMEOUT: "the client sent nothing for server.idle_timeout seconds",
    SLOW_CONSUMER: "the client did not read what it was sent: its output buffer stayed above "
                   "server.client_buffer_high for server.slow_consumer_timeout, or passed server.client_buffer_limit",
    PROTOCOL_ERROR: "the client's bytes broke the framing (a bad or oversized frame, a message above "
                    "the upstream's max_message_bytes, a bad PROXY header)",
    AUTH_FAILED: "an auth plugin refused the client",
    CLOSED_BY_WORKER: "a worker closed it (CLOSE action)",
    CLOSED_BY_ADMIN: "closed through the admin API (DELETE /connections/<uuid>)",
    SHUTDOWN: "pplex is shutting down (SIGTERM or POST /shutdown)",
    NO_UPSTREAM: "more than server.max_pending_bytes waited while no worker was ready to take it",
    INTERNAL_ERROR: "a plugin or pplex itself failed while serving this client (logged with a traceback)",
    CLOSED_BY_PLUGIN: "a plugin closed it for a reason of its own (given in the log line)",
}
