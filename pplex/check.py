"""`pplex check`: find what `pplex` would refuse at startup, without starting it.

The caller has loaded and validated the config exactly as `pplex` does (the
schema: same code, same line). From there this module runs what a start runs,
in its order, and stops short of serving:

1. the plugins, their settings and their `pplex_configure` hooks, the transport
   and the proxy: by building the `App` as `pplex` does, then closing it;
2. every file a setting names (any key ending in `_file`, such as TLS
   certificates): it must be readable;
3. the client listener and the admin API addresses: each is bound and closed
   at once (never listened on, so no client is ever accepted);
4. with `resolve`, every upstream host name: it must resolve.

The broker is never connected to (the App is built, never started): a start
waits for it, retrying, so a broker that is down is no config error.

Each failure is a `ConfigError` carrying the one line `pplex` would print
(for 1 and 3 the very same text); the result is the effective config, with
secrets redacted, ready to print as JSON.
"""
import errno
import ipaddress
import os
import socket

from pplex.connection import format_peer
from pplex.errors import ConfigError
from pplex.listener import bind_socket

SECRET_KEYS = {"token", "tokens", "password", "secret"}
REDACTED = "<redacted>"


def check(config, source, token=None, resolve=False):
    """Run every startup check on a validated `config`; return the effective config (redacted).

    `source` names the config in errors (the file, or "config"); `token` is the
    admin token in effect (the config's, else PPLEX_ADMIN_TOKEN's). Raises
    ConfigError with one line.
    """
    from pplex.app import App  # grpc and the reactor are loaded only when a config got this far
    App(config, admin_token=token, source=source).close()
    check_files(config, source)
    check_listeners(config)
    if resolve:
        resolve_upstreams(config, source)
    effective = redact(config)
    if token and not config["management_server"].get("token"):
        effective["management_server"]["token"] = REDACTED + " (PPLEX_ADMIN_TOKEN)"
    return effective


def _path_text(path):
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text


def _walk(value, path=()):
    """(path, key, value) of every mapping entry, depth first."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield path + (key,), key, inner
            yield from _walk(inner, path + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _walk(inner, path + (index,))


def check_files(config, source):
    for path, key, value in _walk(config):
        if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
            try:
                with open(value, "rb"):
                    pass
            except OSError as error:
                raise ConfigError(f"{source}: {_path_text(path)}: cannot read {value}: "
                                  f"{error.strerror or error}") from None


def _overlap(host_a, host_b):
    wildcard = {"0.0.0.0", "::", ""}
    return host_a == host_b or host_a in wildcard or host_b in wildcard


def check_listeners(config):
    """Bind the client listener, then the admin API, as a start would; the same lines on failure."""
    server, admin = config["server"], config["management_server"]
    try:
        client = bind_socket(server["host"], server["port"])
    except OSError as error:
        raise ConfigError(f"pplex: cannot listen on {format_peer((server['host'], server['port']))}: "
                          f"{error.strerror or error}") from None
    try:
        # Both sockets bind with SO_REUSEADDR and neither listens, so the kernel would let them
        # share a port: a start would not (the client listener is listening by then).
        if admin["port"] and admin["port"] == server["port"] and _overlap(admin["host"], server["host"]):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        bind_socket(admin["host"], admin["port"]).close()
    except OSError as error:
        raise ConfigError(f"pplex: admin API cannot listen on {admin['host']}:{admin['port']}: "
                          f"{error.strerror or error}") from None
    finally:
        client.close()


def resolve_upstreams(config, source):
    for index, upstream in enumerate(config["upstream"]):
        host = upstream["host"]
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        try:
            socket.getaddrinfo(host, upstream["port"], type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(f"{source}: upstream[{index}].host: cannot resolve {host!r}: {reason}") from None


def redact(value):
    """A copy of the config with the values of secret keys (tokens, passwords) replaced."""
    if isinstance(value, dict):
        return {key: (_hidden(inner) if key in SECRET_KEYS else redact(inner)) for key, inner in value.items()}
    if isinstance(value, list):
        return [redact(inner) for inner in value]
    return value


def _hidden(value):
    return [REDACTED for _ in value] if isinstance(value, list) else REDACTED
