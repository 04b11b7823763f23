"""Routing by payload prefix: messages starting with a prefix go to that prefix's pool of workers.

Settings (`"plugins": {"route_prefix": {...}}`):
- `routes` (required): an object of prefix -> list of worker addresses
  "host:port" (IPv6 as "[::1]:5000"), e.g.
  `{"CHAT ": ["10.0.0.5:5000"], "GAME ": ["10.0.0.6:5000", "10.0.0.7:5000"]}`.
  A prefix is matched as its UTF-8 bytes against the start of the message;
  the longest matching prefix wins ("GAME BOSS " before "GAME "). The empty
  prefix "" matches every message: a catch-all pool.
- `default` (default "any"): where a message matching no prefix goes:
  "any": every worker in rotation; "hold": only workers of some pool, and it
  waits while none of them is ready.

The candidates for a message are the workers in rotation whose address is in
the pool; the balancer picks among them. When none is (its pool's workers are
all down, or not registered yet), the message waits in the client's bounded
queue (`server.max_pending_bytes`) until one is ready; the client's later
messages wait behind it, in order. Addresses are compared as written: use the
same host spelling as the upstream's registration (an IP stays an IP).
"""
import voluptuous as vol

from pplex import hookimpl
from pplex.config import is_number
from pplex.errors import shown

# [(length, {prefix bytes: frozenset of (host, port)})], longest first
_tables = []
_state = {"default": "any", "pooled": frozenset()}


def parse_address(value):
    """'host:port' or '[v6]:port' -> (host, port), the form upstreams are registered in."""
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a worker address \"host:port\" (got {shown(value)})")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    # ASCII digits only: isdigit() alone takes "²", which int() refuses
    if not sep or not host or not is_number(port, 5) or not 1 <= int(port) <= 65535:
        raise vol.Invalid(f"expected a worker address \"host:port\" (got {shown(value)})")
    return host, int(port)


def Address(value):
    """a worker address host:port"""
    parse_address(value)
    return value


def Pool(value):
    """a non-empty list of worker addresses host:port"""
    if not isinstance(value, list) or not value:
        raise vol.Invalid("expected a non-empty list of worker addresses \"host:port\"")
    for index, address in enumerate(value):
        try:
            Address(address)
        except vol.Invalid as error:
            raise vol.Invalid(error.msg, path=[index]) from None
    return value


def Routes(value):
    """an object of prefix -> list of worker addresses host:port"""
    if not isinstance(value, dict) or not value:
        raise vol.Invalid("expected an object of prefix -> list of worker addresses")
    for prefix, pool in value.items():
        try:
            Pool(pool)
        except vol.Invalid as error:
            raise vol.Invalid(error.msg, path=[prefix] + list(error.path)) from None
    return value


@hookimpl
def pplex_settings_schema():
    return {
        vol.Required("routes"): Routes,
        vol.Optional("default", default="any"): vol.In(["any", "hold"], msg="expected \"any\" or \"hold\""),
    }


@hookimpl
def pplex_configure(settings):
    by_length = {}
    for prefix, pool in settings["routes"].items():
        key = prefix.encode("utf-8")
        by_length.setdefault(len(key), {})[key] = frozenset(parse_address(a) for a in pool)
    _tables[:] = sorted(by_length.items(), reverse=True)
    _state["default"] = settings["default"]
    _state["pooled"] = frozenset().union(*(pool for _, table in _tables for pool in table.values()))


def pool_of(payload):
    """The pool of the longest prefix `payload` starts with, or None."""
    for length, table in _tables:
        pool = table.get(payload[:length])
        if pool is not None:
            return pool
    return None


@hookimpl
def pplex_route(payload, ready):
    if payload.__class__ is not bytes:
        payload = bytes(payload)
    pool = pool_of(payload)
    if pool is None:
        if _state["default"] == "any":
            return ready
        pool = _state["pooled"]
    return [up for up in ready if (up.host, up.port) in pool]
