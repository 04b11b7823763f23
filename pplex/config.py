"""The configuration: its schema, its defaults, and one-line errors naming the bad value's path.

pplex.json (or the original proxy's config.toml, same layout) is validated
with voluptuous; command-line flags are applied on top before validation.
Every default sits in the schema below with its unit and reason.
"""
import ipaddress
import json
import re
import tomllib

import voluptuous as vol

from pplex import limits
from pplex.errors import ConfigError
from pplex.tls import validate_upstream_tls

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


def Host(value):
    """An IP literal (v4 or v6) or a DNS name."""
    if not isinstance(value, str) or not value:
        raise vol.Invalid("expected a host name or IP address")
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise vol.Invalid("expected a host name or IP address")
    return value


def _port(low):
    def Port(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise vol.Invalid("expected an integer port")
        if not low <= value <= 65535:
            raise vol.Invalid(f"port must be between {low} and 65535")
        return value
    return Port


UPSTREAM = {
    vol.Required("host"): Host,
    vol.Required("port"): _port(1),
    # TLS to the worker: true (system roots) or {ca_file, cert_file, key_file, server_name}; see pplex.tls
    vol.Optional("tls"): validate_upstream_tls,
    **limits.section_schema("upstream"),
}

SERVER = {
    vol.Optional("host", default="0.0.0.0"): Host,
    vol.Optional("port", default=7999): _port(0),  # 0: any free port (tests)
    **limits.section_schema("server"),
}

MANAGEMENT = {
    vol.Optional("host", default="127.0.0.1"): Host,
    vol.Optional("port", default=8000): _port(0),
    # bearer token for every admin route but /healthz; also PPLEX_ADMIN_TOKEN
    vol.Optional("token"): vol.All(str, vol.Length(min=1)),
}


def _plugins(value):
    """`"plugins"`: a list of names, or an object of name -> settings object."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise vol.Invalid("expected plugin names (strings)")
        return {name: {} for name in value}
    if isinstance(value, dict):
        for name, settings in value.items():
            if settings is not None and not isinstance(settings, dict):
                raise vol.Invalid("expected a settings object", path=[name])
        return {name: settings or {} for name, settings in value.items()}
    raise vol.Invalid("expected a list of plugin names or an object of name -> settings")


SCHEMA = vol.Schema({
    vol.Optional("server", default={}): SERVER,
    vol.Optional("upstream", default=[]): [UPSTREAM],
    vol.Optional("management_server", default={}): MANAGEMENT,
    vol.Optional("plugins", default={}): _plugins,
    # how pplex speaks gRPC to workers: "grpcio" (its threads) or "h2" (HTTP/2 in the reactor thread)
    vol.Optional("transport", default="grpcio"): vol.In(("grpcio", "h2")),
})

UPSTREAM_SCHEMA = vol.Schema(UPSTREAM)


def describe_invalid(error, prefix=()):
    """One line: `path: message (got value)`."""
    path = list(prefix) + list(error.path)
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    message = error.error_message or str(error)
    if message == "extra keys not allowed":
        message = "unknown key"
    elif message == "required key not provided":
        message = "required key is missing"
    return f"{text or '(top level)'}: {message}"


def validate(raw, source="config"):
    """Validate a raw dict; raise ConfigError naming the first bad value's path."""
    try:
        return SCHEMA(raw)
    except vol.MultipleInvalid as error:
        first = sorted(error.errors, key=lambda e: [str(p) for p in e.path])[0]
        raise ConfigError(f"{source}: {describe_invalid(first)}{_got(raw, first.path)}") from None


def validate_upstream(raw):
    """Validate one upstream definition (admin API); raise vol.MultipleInvalid."""
    return UPSTREAM_SCHEMA(raw)


def _got(raw, path):
    value = raw
    try:
        for part in path:
            value = value[part]
    except (KeyError, IndexError, TypeError):
        return ""
    if isinstance(value, (dict, list)):
        return ""
    return f" (got {json.dumps(value)})"


def load_file(path):
    """Read pplex.json, or a .toml file in the original proxy's layout; no validation yet."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    if path.endswith(".toml"):
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    else:
        try:
            raw = loads_json(data)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from None
        except ValueError as error:  # NaN / Infinity
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: (top level): expected an object")
    return raw


def _reject_constant(name):
    """JSON has no NaN or Infinity; Python's parser accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


def loads_json(data):
    """json.loads that refuses NaN, Infinity and -Infinity (raises ValueError)."""
    return json.loads(data, parse_constant=_reject_constant)


def parse_address(text, flag):
    """HOST:PORT or [V6]:PORT -> (host, port) for a command-line flag."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{flag}: expected HOST:PORT (got {text!r})")
    if not port.isdigit():
        raise ConfigError(f"{flag}: port must be a number (got {text!r})")
    return host.strip("[]"), int(port)
