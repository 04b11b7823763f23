"""Every limit and tunable of pplex, in one place: default, unit, range, and why.

Two kinds live here:

- **Settings** a user may change, declared with `setting(section, key, ...)`.
  The config schema (`pplex.config`), the admin API (`POST /upstream/add`) and
  the README table are built from these declarations, so a value is checked
  the same way wherever it comes from: a number must be finite (no NaN, no
  Infinity, whatever the parser let through) and inside its documented range,
  and a bad one is a one-line error naming its path.
- **Constants** nobody should need to tune, as plain names with their reason.

Units: seconds (`s`) may be fractions; bytes and counts are integers.
"""
import math

import voluptuous as vol

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
YEAR_SECONDS = 365 * 24 * 3600


class Setting:
    """One tunable: `section.key`, default, unit, closed range [low, high] (or (low, high] when
    `low_open`), integer or number, and the reason it exists."""

    __slots__ = ("section", "key", "default", "unit", "low", "high", "integer", "low_open", "why")

    def __init__(self, section, key, default, unit, low, high, why, integer=False, low_open=False):
        self.section = section
        self.key = key
        self.default = default
        self.unit = unit
        self.low = low
        self.high = high
        self.integer = integer
        self.low_open = low_open
        self.why = why

    @property
    def path(self):
        return f"{self.section}.{self.key}"

    def range_text(self):
        low = f"greater than {_number(self.low)}" if self.low_open else f"at least {_number(self.low)}"
        return f"{low} and at most {_number(self.high)}"

    def __call__(self, value):
        """The voluptuous validator: the value, or `vol.Invalid` with a one-line reason."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise vol.Invalid("expected an integer" if self.integer else "expected a number")
        if self.integer and not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                value = int(value)
            else:
                raise vol.Invalid("expected an integer")
        if isinstance(value, int) and not -2 ** 63 < value < 2 ** 63:  # compared as an int: no float overflow
            raise vol.Invalid(f"must be {self.range_text()}")
        if not math.isfinite(value):
            raise vol.Invalid("must be a finite number")
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            raise vol.Invalid(f"must be {self.range_text()}")
        return value


SETTINGS = []


def _number(value):
    """A range bound as a person writes it: 31536000, not 3.1536e+07; 0.5 stays 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(section, key, default, unit, low, high, why, integer=False, low_open=False):
    declared = Setting(section, key, default, unit, low, high, why, integer, low_open)
    SETTINGS.append(declared)
    return declared


def section_schema(section):
    """The voluptuous entries (`Optional(key, default)` -> validator) of one section's settings."""
    return {vol.Optional(s.key, default=s.default): s for s in SETTINGS if s.section == section}


def by_path(path):
    for declared in SETTINGS:
        if declared.path == path:
            return declared
    raise KeyError(path)


# -- server: the client listener and every client connection ---------------------------------
IDLE_TIMEOUT = setting(
    "server", "idle_timeout", 0, "s", 0, YEAR_SECONDS,
    "client silence after which pplex closes it; 0 keeps quiet clients forever")
ACTIVE_WINDOW = setting(
    "server", "active_window", 30, "s", 0, YEAR_SECONDS,
    "a client that sent bytes this recently is active (BROADCAST_ACTIVE / NOT_ACTIVE)")
MAX_PENDING_BYTES = setting(
    "server", "max_pending_bytes", 1 * MiB, "bytes", 1, 1 * GiB,
    "bytes a client may have waiting while no worker is ready; past it, it is closed", integer=True)
MAX_CONNECTIONS = setting(
    "server", "max_connections", 100_000, "connections", 1, 10_000_000,
    "open client connections; pplex stops accepting at the limit and resumes below it", integer=True)
CLIENT_BUFFER_HIGH = setting(
    "server", "client_buffer_high", 1 * MiB, "bytes", 4 * KiB, 1 * GiB,
    "a client with more than this unread is behind: its slow-consumer clock starts", integer=True)
CLIENT_BUFFER_LOW = setting(
    "server", "client_buffer_low", 256 * KiB, "bytes", 0, 1 * GiB,
    "a client that was behind is caught up again once its unread bytes fall to this", integer=True)
CLIENT_BUFFER_LIMIT = setting(
    "server", "client_buffer_limit", 16 * MiB, "bytes", 64 * KiB, 4 * GiB,
    "unread bytes a client may have at most; past it, it is closed at once (slow_consumer). "
    "Must hold the largest reply (upstream max_message_bytes)", integer=True)
SLOW_CONSUMER_TIMEOUT = setting(
    "server", "slow_consumer_timeout", 10, "s", 0, 3600,
    "a client that stays behind (above client_buffer_high) this long is closed (slow_consumer)",
    low_open=True)
OUTPUT_BUDGET = setting(
    "server", "output_budget", 64 * MiB, "bytes", 1 * MiB, 64 * GiB,
    "unread bytes of all clients together above which pplex stops taking replies from workers "
    "(HTTP/2 flow control pushes back on them) until half of it is written", integer=True)
EOF_LINGER = setting(
    "server", "eof_linger", 0.5, "s", 0, 3600,
    "after a client half-closes, replies to what it sent last still reach it for this long")
EOF_STALL_TIMEOUT = setting(
    "server", "eof_stall_timeout", 5, "s", 0, 3600,
    "after the linger, pplex keeps writing to a half-closed client while it reads; "
    "this long without progress and it gives up with a reset (RST), never a clean close",
    low_open=True)
TCP_KEEPALIVE_IDLE = setting(
    "server", "tcp_keepalive_idle", 60, "s", 0, 24 * 3600,
    "TCP keepalive on client sockets: probes start after this much silence (0 turns keepalive off); "
    "a peer gone without FIN or RST is closed (client_reset) instead of holding its slot",
    integer=True)
TCP_KEEPALIVE_INTERVAL = setting(
    "server", "tcp_keepalive_interval", 10, "s", 1, 3600, "seconds between keepalive probes", integer=True)
TCP_KEEPALIVE_COUNT = setting(
    "server", "tcp_keepalive_count", 6, "probes", 1, 127,
    "unanswered keepalive probes after which the peer is declared gone", integer=True)
SHUTDOWN_GRACE = setting(
    "server", "shutdown_grace", 5, "s", 0, 3600,
    "on SIGTERM, how long pplex keeps delivering what is in flight to a client being closed "
    "before it gives up on it (with a reset)")
SHUTDOWN_SPREAD = setting(
    "server", "shutdown_spread", 10, "s", 0, 3600,
    "on SIGTERM, clients are closed spread evenly (with jitter) over this many seconds, so they do "
    "not all reconnect in the same instant; 0 closes them all at once")
PROXY_PROTOCOL_TIMEOUT = setting(
    "server", "proxy_protocol_timeout", 5, "s", 0, 300,
    "a client must send its whole PROXY header within this (the spec asks for at least 3 s, a TCP "
    "retransmit); past it, it is closed", low_open=True)
TLS_HANDSHAKE_TIMEOUT = setting(
    "server", "tls_handshake_timeout", 10, "s", 0, 300,
    "with server.tls, a client must finish its TLS handshake within this; past it, it is closed "
    "(a client that connects and says nothing must not hold its slot)", low_open=True)


# -- server: sessions (lifecycle events and groups, README "Sessions") ---------------------------
# (server.lifecycle, "routed" or "all", is not a number: it is declared in pplex.config.)
MAX_GROUPS_PER_CLIENT = setting(
    "server", "max_groups_per_client", 64, "groups", 1, 65535,
    "groups one client may be in; a JOIN beyond it is refused (counted and logged), never fatal",
    integer=True)
MAX_GROUP_NAME_BYTES = setting(
    "server", "max_group_name_bytes", 256, "bytes", 1, 65535,
    "longest group name (UTF-8 bytes) a worker may use; an action naming a longer one is refused",
    integer=True)
MAX_GROUPS = setting(
    "server", "max_groups", 1_000_000, "groups", 1, 100_000_000,
    "groups that may exist at once on this node (a group is made by its first JOIN and forgotten when "
    "its last member leaves); a JOIN that would make more is refused", integer=True)


# -- upstream: each worker ---------------------------------------------------------------------
ALIVE_TIMEOUT = setting(
    "upstream", "alive_timeout", 30, "s", 0, 24 * 3600,
    "seconds between live heartbeats; no answer within 1.5x ejects the worker", low_open=True)
READY_TIMEOUT = setting(
    "upstream", "ready_timeout", 5, "s", 0, 3600,
    "how long a ready probe may take before the worker counts as not ready", low_open=True)
MAX_MESSAGE_BYTES = setting(
    "upstream", "max_message_bytes", 4 * MiB, "bytes", 64 * KiB, 64 * MiB,
    "largest gRPC message either way (gRPC's default receive limit is 4 MiB); a client frame above "
    "it closes that client (protocol_error) instead of breaking the stream every client shares",
    integer=True)
STALL_TIMEOUT = setting(
    "upstream", "stall_timeout", 10, "s", 0, 3600,
    "a data stream that takes nothing this long while messages wait (flow-control window or "
    "socket stuck: a worker that stopped reading) ejects the worker; what it never took is re-routed",
    low_open=True)
DRAIN_TIMEOUT = setting(
    "upstream", "drain_timeout", 30, "s", 0, 24 * 3600,
    "a draining worker that does not end its stream within this long is cut off", low_open=True)
RISE = setting(
    "upstream", "rise", 1, "answers", 1, 100,
    "consecutive ready=true answers a worker needs to enter rotation (HAProxy's rise)", integer=True)
FALL = setting(
    "upstream", "fall", 1, "heartbeats", 1, 100,
    "consecutive failed heartbeats (live=false or no answer in time) that eject it (HAProxy's fall); "
    "a broken or stalled data stream ejects at once", integer=True)
EJECTION_TIME = setting(
    "upstream", "ejection_time", 0.5, "s", 0, 3600,
    "base ejection time: after its n-th ejection in a row a worker stays out at least "
    "ejection_time x 2^(n-1), capped by max_ejection_time; each ejection-free decay period "
    "in rotation takes one off n (Envoy's outlier detection)")
MAX_EJECTION_TIME = setting(
    "upstream", "max_ejection_time", 60, "s", 0, 24 * 3600, "the cap of the ejection time")


# -- management_server: the admin API ------------------------------------------------------------
# (host, port and token are not numbers; they are declared in pplex.config.)
ADMIN_MAX_BODY_BYTES = setting(
    "management_server", "max_body_bytes", 64 * KiB, "bytes", 1 * KiB, 16 * MiB,
    "largest admin request body; a larger one is refused (413) before it is read", integer=True)
ADMIN_THREADS = setting(
    "management_server", "threads", 4, "threads", 1, 64,
    "threads serving admin requests", integer=True)
ADMIN_CONNECTION_LIMIT = setting(
    "management_server", "connection_limit", 1000, "connections", 10, 100_000,
    "admin connections open at once; past it new ones wait in the listen backlog (waitress's default, 100, "
    "let a hundred half-sent requests lock out /healthz)", integer=True)
ADMIN_IDLE_TIMEOUT = setting(
    "management_server", "idle_timeout", 10, "s", 1, 3600,
    "an admin connection with no request in progress and nothing received for this long is closed "
    "(half-sent requests included), so idle or slow peers cannot hold the connection limit", integer=True)


# -- constants ------------------------------------------------------------------------------------
# Raw bytes a busy client sends while its last message waits merge into it up to this size
# (raw TCP has no boundaries to keep); never above the upstream's max_message_bytes.
MERGE_LIMIT_BYTES = 256 * KiB
# An upstream batch above this stops reading the clients that feed it until the stream takes it.
UPSTREAM_BATCH_HIGH = 8 * MiB
# Accepts per readiness event: new clients cannot starve old ones.
ACCEPT_PER_EVENT = 64
# Bytes a client may send before it is open (its PROXY header and its side of the TLS handshake,
# client certificates included): a client that has not finished arriving holds little.
FRONT_DOOR_MAX_BYTES = 64 * KiB
# Bytes read per recv() from a client that is still arriving.
FRONT_DOOR_RECV_BYTES = 16 * KiB
# After EMFILE and friends, accepting resumes after this pause (logged once per episode).
ACCEPT_RETRY_SECONDS = 0.25
# Calls handed over from other threads run at most this many per reactor pass; the rest wait
# for the next pass, so a flood of worker events cannot starve sockets and timers.
THREADSAFE_CALLS_PER_PASS = 20_000
# Each ejection-free period of this length in rotation takes one off the ejection count.
EJECTION_DECAY_SECONDS = 10.0
# Ready probes after a failure: first retry after this, doubling to the cap, jittered.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
# A heartbeat answer may be late by half an interval before it counts as failed.
LIVE_GRACE = 1.5
# Messages written to a stream that may have to be re-sent (redeliver_unconfirmed) are kept
# up to this many bytes per worker; older ones fall back to at-most-once (counted).
REDELIVER_KEEP_BYTES = 8 * MiB


# Lifecycle events (DISCONNECTED) that wait while no lifecycle worker is ready; past this the oldest
# are dropped (counted: drops "lifecycle_event_overflow"). Each holds its closed client's record.
MAX_PENDING_EVENTS = 65_536
# When pplex stops gracefully, how long it waits, after its last client is closed, for every lifecycle
# worker's data stream to take the events queued for it and end (the worker ends it once it read them).
EVENTS_FLUSH_SECONDS = 2.0
# How often that wait looks at the streams.
EVENTS_FLUSH_CHECK_SECONDS = 0.01


# -- cluster: many pplex processes acting as one, over a broker (pplex.cluster) ---------------------
HEARTBEAT = setting(
    "cluster", "heartbeat", 2, "s", 0.05, 60,
    "seconds between a node's heartbeats on the broker (how /cluster learns who is alive)")
DEAD_AFTER = setting(
    "cluster", "dead_after", 6, "s", 0.1, 3600,
    "a node not heard from for this long is dropped from the live-node table (at least 2 heartbeats)")
CLUSTER_ADMIN_TIMEOUT = setting(
    "cluster", "admin_timeout", 2, "s", 0.05, 60,
    "how long an admin request acting on another node (or on all) waits for their answers")
PROCESSES = setting(
    "server", "processes", 1, "processes", 1, 256,
    "reactor processes sharing the client port (SO_REUSEPORT); more than 1 needs cluster.broker",
    integer=True)
# Relays of one pass for one subject go out as one frame, cut at this size (below NATS's 1 MiB default
# max_payload); one relay larger than the broker's max_payload is counted unrelayed (too_large).
RELAY_FRAME_BYTES = 256 * KiB
# Frames waiting for the broker thread; past this, relays are counted unrelayed (backlog).
RELAY_OUTGOING_BYTES = 16 * MiB
# Frames read from the broker waiting for the reactor; past this they are dropped and counted.
RELAY_INBOUND_BYTES = 16 * MiB
BROKER_CONNECT_TIMEOUT_SECONDS = 2.0
BROKER_RETRY_FIRST_SECONDS = 0.1
BROKER_RETRY_MAX_SECONDS = 2.0
# Nodes kept in the live-node table; heartbeats from more are ignored (and logged).
MAX_NODES = 1024
# Admin requests to other nodes waiting for answers at once; more get 503.
MAX_PENDING_ASKS = 256
# Upstreams listed in one heartbeat (the rest are only counted).
HEARTBEAT_UPSTREAMS = 64
# A heartbeat from another node larger than this is dropped (each live node's latest is kept).
HEARTBEAT_MAX_BYTES = 64 * KiB
# Connections listed per node by GET /connections?scope=cluster (offset + limit).
CLUSTER_PAGE_MAX = 1000


# -- upstream entries found by DNS (pplex.discovery) -------------------------------------------
DNS_REFRESH = setting(
    "upstream_dns", "refresh", 5, "s", 0.05, 24 * 3600,
    "seconds between lookups of a DNS upstream entry's name")
# Addresses one DNS name may bring; the rest of an answer is ignored (and logged).
DNS_MAX_ADDRESSES = 256


# -- the README's table ----------------------------------------------------------------------------
def markdown_table():
    """Every setting as a Markdown table (README "Every limit"); tests keep the README equal to it."""
    rows = ["| setting | default | unit | range | why |", "| --- | --- | --- | --- | --- |"]
    for declared in SETTINGS:
        path = declared.path.replace("upstream.", "upstream[].").replace("upstream_dns.", "upstream[] (dns).")
        low = ("(" if declared.low_open else "[") + _number(declared.low)
        rows.append(f"| `{path}` | {_number(declared.default)} | {declared.unit} | "
                    f"{low}, {_number(declared.high)}] | {declared.why} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m pplex.limits: the table to paste into the README
    print(markdown_table(), end="")
