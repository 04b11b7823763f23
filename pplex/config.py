"""The configuration: its schema, its defaults, and one-line errors naming the bad value's path.

pplex.json (or the original proxy's config.toml, same layout) is validated
with voluptuous; command-line flags are applied on top before validation.
Every default sits in the schema below with its unit and reason.
"""
import ipaddress
import json
import re
import sys
import tomllib
from urllib.parse import urlsplit

import voluptuous as vol

from pplex import limits, proxyproto
from pplex.errors import ConfigError, shown
from pplex.logs import LOG_FORMATS
from pplex.tls import validate_server_tls, validate_upstream_tls

# Levels of nesting a config may have (pplex's own deepest path, plugins.route_prefix.routes.P[0],
# has 5): deeper ones are refused when read, before a parser, a validator or a printer recurses
# into them and exhausts Python's stack.
MAX_DEPTH = 32

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

def Flag(value):
    """true or false."""
    if not isinstance(value, bool):
        raise vol.Invalid("expected true or false")
    return value

# {"dns": NAME, "port": P, "refresh": S}: one worker per address NAME resolves to (pplex.discovery)
DNS_UPSTREAM = {
    vol.Required("dns"): Host,
    vol.Required("port"): _port(1),
    **limits.section_schema("upstream"),
    **limits.section_schema("upstream_dns"),
}

SERVER = {
    vol.Optional("host", default="0.0.0.0"): Host,
    vol.Optional("port", default=7999): _port(0),  # 0: any free port (tests)
    # re-send what was written to a stream that broke after the worker's last message
    # (at-least-once: a worker may see a message twice); false: count it (at-most-once)
    vol.Optional("redeliver_unconfirmed", default=False): Flag,
    # PROXY protocol header before each client's bytes: off, v1, v2 or any; only from these networks
    vol.Optional("proxy_protocol", default="off"): proxyproto.mode,
    vol.Optional("proxy_protocol_from", default=list): proxyproto.cidr_list,
    # TLS for clients: {cert_file, key_file, ca_file?, min_version?}; with ca_file a client certificate is required
    vol.Optional("tls"): validate_server_tls,
    # which lifecycle workers get a client's CONNECTED / DISCONNECTED: "routed" (default), the one the
    # routing chain picks for the client; "all", every ready one (README, "Sessions")
    vol.Optional("lifecycle", default="routed"): vol.In(("routed", "all"),
                                                        msg="expected \"routed\" or \"all\""),
    **limits.section_schema("server"),
}

# The original proxy's admin log levels (Rocket's) and the usual names, as Python logging levels.
ADMIN_LOG_LEVELS = {"off": 100, "critical": 50, "normal": 20, "debug": 10,
                    "error": 40, "warning": 30, "warn": 30, "info": 20}


def AdminLogLevel(value):
    """off, critical, normal or debug (the original proxy's words), or error, warning, info."""
    if not isinstance(value, str) or value.lower() not in ADMIN_LOG_LEVELS:
        raise vol.Invalid(f"expected one of {', '.join(ADMIN_LOG_LEVELS)}")
    return value.lower()


def TlsFiles(value):
    """The original proxy's admin TLS table: cert_path and key_path, files that exist."""
    if not isinstance(value, dict):
        raise vol.Invalid("expected a table with cert_path and key_path")
    checked = vol.Schema({vol.Required("cert_path"): str, vol.Required("key_path"): str})(value)
    for key in ("cert_path", "key_path"):
        try:
            with open(checked[key], "rb"):
                pass
        except OSError as error:
            raise vol.Invalid(f"cannot read {checked[key]}: {error.strerror or error}", path=[key]) from None
    return checked

MANAGEMENT = {
    vol.Optional("host", default="127.0.0.1"): Host,
    vol.Optional("port", default=8000): _port(0),
    # bearer token for every admin route but /healthz; also PPLEX_ADMIN_TOKEN
    vol.Optional("token"): vol.All(str, vol.Length(min=1)),
    # the original proxy's keys: the admin API's log level, and its TLS certificate
    vol.Optional("log_level"): AdminLogLevel,
    vol.Optional("tls"): TlsFiles,
    **limits.section_schema("management_server"),
}


def BrokerURL(value):
    """`nats://host:port` (or `tls://`), `redis://host:port` (or `rediss://`), credentials allowed."""
    if not isinstance(value, str):
        raise vol.Invalid("expected a broker URL such as nats://127.0.0.1:4222 or redis://127.0.0.1:6379")
    parts = urlsplit(value)
    if parts.scheme not in ("nats", "tls", "redis", "rediss"):
        raise vol.Invalid("expected a nats://, tls://, redis:// or rediss:// URL")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname:
        raise vol.Invalid("the broker URL has no host")
    if port is None:
        raise vol.Invalid("the broker URL needs a port (nats: 4222, redis: 6379)")
    if not 1 <= port <= 65535:  # 0 is no port to connect to
        raise vol.Invalid("the broker URL's port must be between 1 and 65535")
    return value


CLUSTER = {
    vol.Optional("broker"): BrokerURL,
    # the subject prefix: nodes with the same name and broker form one cluster
    vol.Optional("name", default="pplex"): vol.All(str, vol.Match(r"^[A-Za-z0-9_-]{1,64}$",
                                                                  msg="expected 1 to 64 of A-Z a-z 0-9 _ -")),
    # this node's id (random at start when unset); --processes N children append -<index>
    vol.Optional("node"): vol.All(str, vol.Match(r"^[A-Za-z0-9_-]{1,60}$", msg="expected 1 to 60 of A-Z a-z 0-9 _ -")),
    **limits.section_schema("cluster"),
}


def _cluster_rules(config):
    """Rules across sections: more than one process needs a broker; dead_after spans 2 heartbeats."""
    cluster = config["cluster"]
    if config["server"]["processes"] > 1 and not cluster.get("broker"):
        raise vol.MultipleInvalid([vol.Invalid(
            "more than one process needs cluster.broker (nats://host:port or redis://host:port) to act as "
            "one proxy", path=["server", "processes"])])
    if cluster["dead_after"] < 2 * cluster["heartbeat"]:
        raise vol.MultipleInvalid([vol.Invalid(f"must be at least 2 heartbeats ({2 * cluster['heartbeat']:g} s)",
                                               path=["cluster", "dead_after"])])
    return config


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


UPSTREAM_SCHEMA = vol.Schema(UPSTREAM)
DNS_UPSTREAM_SCHEMA = vol.Schema(DNS_UPSTREAM)


def _upstream_entry(value):
    """A worker by address, or a DNS name standing for one worker per address (`"dns"` key)."""
    if isinstance(value, dict) and "dns" in value:
        return DNS_UPSTREAM_SCHEMA(value)
    return UPSTREAM_SCHEMA(value)


SCHEMA = vol.Schema({
    # pplex's own log level (debug, info, warning, error); --log-level wins over it
    vol.Optional("log_level"): vol.All(str, vol.Lower, vol.In(("debug", "info", "warning", "error"))),
    vol.Optional("server", default={}): vol.All(SERVER, proxyproto.check_server),
    vol.Optional("upstream", default=[]): [_upstream_entry],
    vol.Optional("management_server", default={}): MANAGEMENT,
    vol.Optional("plugins", default={}): _plugins,
    # how pplex speaks gRPC to workers: "h2" (HTTP/2 in the reactor thread, the default: the fast one)
    # or "grpcio" (gRPC's own C-core client on its threads)
    vol.Optional("transport", default="h2"): vol.In(("h2", "grpcio")),
    # how log lines are written on stderr: "text" for people, "json" (one object per line) for log systems
    vol.Optional("log_format", default="text"): vol.In(LOG_FORMATS),
    vol.Optional("cluster", default={}): CLUSTER,
})


def path_text(path):
    """("upstream", 1, "port") -> `upstream[1].port`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def describe_invalid(error, prefix=()):
    """One line: `path: message`; a message of several lines (a plugin's) is joined into one."""
    text = path_text(list(prefix) + list(error.path))
    message = " ".join((error.error_message or str(error)).split())
    if message == "extra keys not allowed":
        message = "unknown key"
    elif message == "required key not provided":
        message = "required key is missing"
    return f"{text or '(top level)'}: {message}"


def validate(raw, source="config"):
    """Validate a raw dict; raise ConfigError naming the first bad value's path."""
    config = _validate(raw, source, across=True)
    _check_together(config, source)
    return config


def validate_values(raw, source):
    """Each value of a file on its own, before flags are put on top: a bad one is refused with the line
    the file alone gives, even where a flag would replace it or its section. Rules across sections wait
    for the flags (`--broker` may be what a file's `server.processes` needs)."""
    _validate(raw, source, across=False)


def _validate(raw, source, across):
    _check_tree(raw, source)
    if isinstance(raw, dict) and "management_server_tls" in raw:
        # One version of the original proxy spells the admin TLS table at the top level.
        raw = dict(raw)
        management = dict(raw.get("management_server") or {})
        if "tls" in management:
            raise ConfigError(f"{source}: management_server_tls: given twice (also as management_server.tls)")
        management["tls"] = raw.pop("management_server_tls")
        raw["management_server"] = management
    try:
        config = SCHEMA(raw)
        return _cluster_rules(config) if across else config
    except vol.MultipleInvalid as error:
        first = sorted(error.errors, key=lambda e: [str(p) for p in e.path])[0]
        raise ConfigError(f"{source}: {describe_invalid(first)}{_got(raw, first.path)}") from None


def _check_tree(raw, source):
    """Refuse, with its path, what would fail far from the file: a value nested deeper than MAX_DEPTH;
    a string that is not text (JSON's "\\ud800" escapes make lone surrogates, which have no UTF-8 form:
    a plugin or the admin API encoding one would raise); an integer beyond any float (a range check
    through math.isfinite raises OverflowError). Iterative: deep input must not recurse."""
    stack = [((), raw)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((path + (key,), inner) for key, inner in value.items())
            bad_key = next((key for key in value if not _is_text(key)), None)
            if bad_key is not None:
                raise ConfigError(f"{source}: {path_text(path) or '(top level)'}: a key is not valid Unicode "
                                  f"text (got {shown(bad_key)})")
        elif isinstance(value, list):
            stack.extend((path + (index,), inner) for index, inner in enumerate(value))
        elif not _is_text(value):
            raise ConfigError(f"{source}: {path_text(path)}: not valid Unicode text (got {shown(value)})")
        elif isinstance(value, int) and abs(value) > sys.float_info.max:  # range checks compare as floats
            raise ConfigError(f"{source}: {path_text(path)}: a number too large for any setting (got {shown(value)})")
        if isinstance(value, (dict, list)) and value and len(path) == MAX_DEPTH:
            raise ConfigError(f"{source}: {path_text(path)}: nested more than {MAX_DEPTH} levels deep")


def _is_text(value):
    """False only for a string with a lone surrogate."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_together(config, source):
    """Rules between settings; each error names the path of the value to change."""
    server = config["server"]
    if server["client_buffer_low"] > server["client_buffer_high"]:
        raise ConfigError(f"{source}: server.client_buffer_low: must not be above server.client_buffer_high "
                          f"({server['client_buffer_high']}) (got {server['client_buffer_low']})")
    for index, upstream in enumerate(config["upstream"]):
        if upstream["max_message_bytes"] > server["client_buffer_limit"]:
            raise ConfigError(
                f"{source}: upstream[{index}].max_message_bytes: must not be above server.client_buffer_limit "
                f"({server['client_buffer_limit']}): a reply that large could never be written "
                f"(got {upstream['max_message_bytes']})")
        if upstream["ejection_time"] > upstream["max_ejection_time"]:
            raise ConfigError(f"{source}: upstream[{index}].ejection_time: must not be above max_ejection_time "
                              f"({upstream['max_ejection_time']:g}) (got {upstream['ejection_time']:g})")


def validate_upstream(raw, server=None):
    """Validate one upstream definition (admin API) against the schema and the running server
    settings; raise vol.MultipleInvalid or vol.Invalid naming the field."""
    spec = UPSTREAM_SCHEMA(raw)
    if server is not None and spec["max_message_bytes"] > server["client_buffer_limit"]:
        raise vol.Invalid(f"must not be above server.client_buffer_limit ({server['client_buffer_limit']}): "
                          "a reply that large could never be written", path=["max_message_bytes"])
    if spec["ejection_time"] > spec["max_ejection_time"]:
        raise vol.Invalid(f"must not be above max_ejection_time ({spec['max_ejection_time']:g})",
                          path=["ejection_time"])
    return spec


def _got(raw, path):
    value = raw
    try:
        for part in path:
            value = value[part]
    except (KeyError, IndexError, TypeError):
        return ""
    if isinstance(value, (dict, list)):
        return ""
    return f" (got {shown(value)})"


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
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read (a config has at most {MAX_DEPTH} levels)") from None
        except ValueError as error:  # TOMLDecodeError, UnicodeDecodeError, an integer of too many digits
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    else:
        try:
            raw = loads_json(data)
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read (a config has at most {MAX_DEPTH} levels)") from None
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


def is_number(text, digits):
    """1 to `digits` ASCII digits: str.isdigit() alone takes "²" (which int() refuses) and "٣" (which
    it reads as 3), and int() refuses thousands of digits with a ValueError."""
    return text.isascii() and text.isdigit() and len(text) <= digits


def parse_address(text, flag):
    """HOST:PORT or [V6]:PORT -> (host, port) for a command-line flag."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{flag}: expected HOST:PORT (got {shown(text)})")
    if not is_number(port, 5) or int(port) > 65535:
        raise ConfigError(f"{flag}: port must be a number from 0 to 65535 (got {shown(text)})")
    return host.strip("[]"), int(port)


def parse_count(text, flag):
    """A whole number from a command-line flag; its range is the setting's, checked with the config."""
    if not is_number(text, 9):
        raise ConfigError(f"{flag}: expected a whole number (got {shown(text)})")
    return int(text)
