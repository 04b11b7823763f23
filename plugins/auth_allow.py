"""Accept rules by client address: `allow` and `deny` lists of networks (IPv4 and IPv6).

Checked once per connection, before it opens (`pplex_accept`), on the
client's address (behind a load balancer speaking the PROXY protocol, the one
its header carries): a refused client is closed at once, counted
(`connections_refused`) and logged; it never gets a UUID nor reaches a worker.

- `deny` wins: an address in any `deny` network is refused.
- When `allow` is non-empty, only addresses in an `allow` network are accepted;
  when it is empty, every address not denied is.
- An IPv4 client seen by a dual-stack listener as `::ffff:a.b.c.d` is matched
  as `a.b.c.d` too.

Settings (`"plugins": {"auth_allow": {...}}`):
- `allow` (default []): CIDRs, e.g. ["10.0.0.0/8", "fd00::/8"]; a bare
  address means that one host (/32 or /128). Host bits may be set
  ("10.1.2.3/8" is 10.0.0.0/8).
- `deny` (default []): CIDRs, same form.

A bad CIDR stops startup with one line naming it, e.g.
`plugins.auth_allow.allow[0]: not an IPv4 or IPv6 network ...`.
"""
import ipaddress

import voluptuous as vol

from pplex import hookimpl
from pplex.errors import shown

_allow = []
_deny = []


def Cidr(value):
    """an IPv4 or IPv6 network (CIDR), e.g. 10.0.0.0/8"""
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a CIDR string like \"10.0.0.0/8\" (got {shown(value)})")
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise vol.Invalid(f"not an IPv4 or IPv6 network like \"10.0.0.0/8\" or \"fd00::/8\" "
                          f"(got {shown(value)})") from None
    return value.strip()


@hookimpl
def pplex_settings_schema():
    return {
        vol.Optional("allow", default=list): [Cidr],
        vol.Optional("deny", default=list): [Cidr],
    }


@hookimpl
def pplex_configure(settings):
    _allow[:] = [ipaddress.ip_network(c, strict=False) for c in settings["allow"]]
    _deny[:] = [ipaddress.ip_network(c, strict=False) for c in settings["deny"]]


def _addresses(host):
    """The address to match, and its IPv4 form when it is an IPv4-mapped IPv6 one."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ()
    mapped = getattr(address, "ipv4_mapped", None)
    return (address, mapped) if mapped is not None else (address,)


def _matches(addresses, networks):
    # `in` is False across versions (an IPv4 address is never in an IPv6 network).
    return any(address in network for address in addresses for network in networks)


@hookimpl
def pplex_accept(address):
    addresses = _addresses(address[0])
    if not addresses:
        return False if _allow else None  # not an IP address (a Unix socket?): only allow lists refuse it
    if _deny and _matches(addresses, _deny):
        return False
    if _allow:
        return _matches(addresses, _allow)
    return None
