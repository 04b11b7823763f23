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
        low = f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{low} and at most {self.high:g}"

    def __call__(self, value):
        """The voluptuous validator: the value, or `vol.Invalid` with a one-line reason."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise vol.Invalid("expected an integer" if self.integer else "expected a number")
        if self.integer and not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                value = int(value)
            else:
                raise vol.Invalid("expected an integer")
        if not math.isfinite(value):
            raise vol.Invalid("must be a finite number")
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            raise vol.Invalid(f"must be {self.range_text()}")
        return value


SETTINGS = []


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


# -- upstream: each worker ---------------------------------------------------------------------
ALIVE_TIMEOUT = setting(
    "upstream", "alive_timeout", 30, "s", 0, 24 * 3600,
    "seconds between live heartbeats; no answer within 1.5x ejects the worker", low_open=True)
READY_TIMEOUT = setting(
    "upstream", "ready_timeout", 5, "s", 0, 3600,
    "how long a ready probe may take before the worker counts as not ready", low_open=True)


# -- management_server: the admin API ------------------------------------------------------------
# (host, port and token are not numbers; they are declared in pplex.config.)


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
