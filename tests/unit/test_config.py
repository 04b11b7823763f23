"""Config validation: defaults, and one-line errors that name the path of the bad value."""
import datetime
import os

import pytest

from pplex import limits
from pplex.config import SCHEMA, load_file, parse_address, validate
from pplex.errors import ConfigError
from tests.helpers import ROOT


def test_defaults_fill_every_section_from_the_limits_table():
    config = validate({})
    server_settings = {s.key: s.default for s in limits.SETTINGS if s.section == "server"}
    assert config["server"] == {"host": "0.0.0.0", "port": 7999, "redeliver_unconfirmed": False,
                                "proxy_protocol": "off", "proxy_protocol_from": [], "lifecycle": "routed",
                                **server_settings}
    assert config["server"]["max_connections"] == 100000 and config["server"]["idle_timeout"] == 0
    assert config["server"]["processes"] == 1
    assert config["management_server"] == {"host": "127.0.0.1", "port": 8000, "max_body_bytes": 65536,
                                           "threads": 4, "connection_limit": 1000, "idle_timeout": 10}
    assert config["upstream"] == [] and config["plugins"] == {}
    assert config["cluster"] == {"name": "pplex", "heartbeat": 2, "dead_after": 6, "admin_timeout": 2}


def test_upstream_timeouts_default_and_dns_names_are_hosts():
    config = validate({"upstream": [{"host": "worker-1.internal", "port": 50051}]})
    [upstream] = config["upstream"]
    assert upstream["host"] == "worker-1.internal" and upstream["port"] == 50051
    assert upstream["alive_timeout"] == 30 and upstream["ready_timeout"] == 5
    assert upstream["max_message_bytes"] == 4 * 1024 * 1024


def test_every_setting_is_documented_with_a_range_that_holds_its_default():
    for setting in limits.SETTINGS:
        assert setting.why and setting.unit
        assert setting(setting.default) == setting.default, setting.path
        with pytest.raises(Exception):
            setting(setting.high * 2 + 1)


def test_settings_that_must_agree_name_the_one_to_change():
    with pytest.raises(ConfigError, match=r"^pplex.json: server.client_buffer_low: must not be above"):
        validate({"server": {"client_buffer_low": 2_000_000, "client_buffer_high": 1_000_000}}, "pplex.json")
    with pytest.raises(ConfigError, match=r"^pplex.json: upstream\[0\].max_message_bytes: must not be above "
                                          r"server.client_buffer_limit"):
        validate({"server": {"client_buffer_limit": 1_000_000},
                  "upstream": [{"host": "a", "port": 1, "max_message_bytes": 2_000_000}]}, "pplex.json")


def test_the_original_config_toml_with_its_admin_tls_and_log_level_is_accepted(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    path = tmp_path / "config.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = 7999

[[upstream]]
host = "127.0.0.1"
port = 45888
alive_timeout = 60

[management_server]
host = "127.0.0.1"
port = 8000
log_level = "normal"

[management_server.tls]
cert_path = "{cert}"
key_path = "{key}"
""")
    config = validate(load_file(str(path)), str(path))
    assert config["management_server"]["log_level"] == "normal"
    assert config["management_server"]["tls"] == {"cert_path": str(cert), "key_path": str(key)}
    assert config["upstream"][0]["alive_timeout"] == 60
    # The other spelling of the TLS table, and a missing certificate file named by its path.
    raw = load_file(str(path))
    raw["management_server_tls"] = raw["management_server"].pop("tls")
    assert validate(raw, "c")["management_server"]["tls"]["key_path"] == str(key)
    raw["management_server_tls"]["key_path"] = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"^c: management_server.tls.key_path: cannot read .*missing.pem"):
        validate(raw, "c")


@pytest.mark.parametrize("raw, message", [
    ({"upstream": [{"host": "a", "port": 1}, {"host": "b", "port": 70000}]},
     "pplex.json: upstream[1].port: port must be between 1 and 65535 (got 70000)"),
    ({"server": {"port": True}}, "pplex.json: server.port: expected an integer port (got true)"),
    ({"server": {"host": "not a host!"}}, 'pplex.json: server.host: expected a host name or IP address (got "not a host!")'),
    ({"upstream": [{"host": "a", "port": 1, "alive_timeout": 0}]},
     "pplex.json: upstream[0].alive_timeout: must be greater than 0 and at most 86400 (got 0)"),
    ({"upstream": [{"host": "a", "port": 1, "alive_timeout": float("nan")}]},
     "pplex.json: upstream[0].alive_timeout: must be a finite number (got NaN)"),
    ({"upstream": [{"host": "a", "port": 1, "ready_timeout": float("inf")}]},
     "pplex.json: upstream[0].ready_timeout: must be a finite number (got Infinity)"),
    ({"server": {"idle_timeout": -float("inf")}},
     "pplex.json: server.idle_timeout: must be a finite number (got -Infinity)"),
    ({"server": {"max_connections": 1.5}}, "pplex.json: server.max_connections: expected an integer (got 1.5)"),
    ({"surprise": 1}, "pplex.json: surprise: unknown key (got 1)"),
    ({"plugins": "rr"}, 'pplex.json: plugins: expected a list of plugin names or an object of name -> settings (got "rr")'),
])
def test_errors_name_the_path(raw, message):
    with pytest.raises(ConfigError) as error:
        validate(raw, "pplex.json")
    assert str(error.value) == message


@pytest.mark.parametrize("text", ['{"server": {"idle_timeout": NaN}}', '{"server": {"idle_timeout": Infinity}}',
                                  '{"server": {"idle_timeout": -Infinity}}'])
def test_json_non_finite_constants_are_refused_with_the_file_name(tmp_path, text):
    path = tmp_path / "pplex.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"pplex.json: not valid JSON: .*Infinity|NaN"):
        load_file(str(path))


@pytest.mark.parametrize("text, message", [("nan", "must be a finite number (got NaN)"),
                                           ("inf", "must be a finite number (got Infinity)")])
def test_toml_non_finite_numbers_are_refused_with_the_path(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(f"[[upstream]]\nhost = \"a\"\nport = 1\nalive_timeout = {text}\n")
    with pytest.raises(ConfigError) as error:
        validate(load_file(str(path)), str(path))
    assert str(error.value) == f"{path}: upstream[0].alive_timeout: {message}"


@pytest.mark.parametrize("value, shown", [
    (datetime.date(1979, 5, 27), "1979-05-27"), (datetime.time(7, 32), "07:32:00"),
    (datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc), "1979-05-27T07:32:00+00:00"),
    (10 ** 400, "1" + "0" * 296 + "..."), ("x" * 1000, '"' + "x" * 296 + "..."),
])
def test_any_value_a_parser_makes_is_shown_in_the_error_line(value, shown):
    """TOML dates and times (which json.dumps refuses), huge numbers and long strings: one short line."""
    with pytest.raises(ConfigError) as error:
        validate({"server": {"idle_timeout": value}}, "config.toml")
    assert str(error.value).endswith(f"(got {shown})")
    assert str(error.value).startswith("config.toml: server.idle_timeout: ")


def test_plugins_may_be_a_list_of_names():
    assert validate({"plugins": ["framing_len", "rr"]})["plugins"] == {"framing_len": {}, "rr": {}}


@pytest.mark.parametrize("text, expected", [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:7999", ("::1", 7999)),
                                            ("example.org:1", ("example.org", 1))])
def test_parse_address(text, expected):
    assert parse_address(text, "--listen") == expected


@pytest.mark.parametrize("text", ["7999", ":80", "host:port", "host:\u00b2", "host:\u0663", "host:65536",
                                  "host:" + "1" * 5000, "host:-1", "host:+1", "host: 1", "host:1_0"])
def test_parse_address_rejects(text):
    with pytest.raises(ConfigError, match="--listen"):
        parse_address(text, "--listen")


def test_the_documented_example_config_is_valid_and_shows_every_section():
    path = os.path.join(ROOT, "pplex.json")
    raw = load_file(path)
    config = validate(raw, path)
    assert set(raw) == {str(key) for key in SCHEMA.schema}, "pplex.json must document every top-level key"
    assert config["server"]["port"] == 7999 and config["transport"] == "h2"


@pytest.mark.parametrize("raw, message", [
    ({"server": {"processes": 2}}, "config: server.processes: more than one process needs cluster.broker "
                                   "(nats://host:port or redis://host:port) to act as one proxy (got 2)"),
    ({"cluster": {"broker": "nats://host"}}, 'config: cluster.broker: the broker URL needs a port '
                                             '(nats: 4222, redis: 6379) (got "nats://host")'),
    ({"cluster": {"broker": "amqp://h:1"}}, 'config: cluster.broker: expected a nats://, tls://, redis:// or '
                                           'rediss:// URL (got "amqp://h:1")'),
    ({"cluster": {"heartbeat": 1, "dead_after": 1.5}}, "config: cluster.dead_after: must be at least 2 "
                                                       "heartbeats (2 s) (got 1.5)"),
    ({"cluster": {"node": "a b"}}, 'config: cluster.node: expected 1 to 60 of A-Z a-z 0-9 _ - (got "a b")'),
    ({"cluster": {"name": "a.b"}}, 'config: cluster.name: expected 1 to 64 of A-Z a-z 0-9 _ - (got "a.b")'),
    ({"upstream": [{"dns": "w.svc", "port": 1, "refresh": 0}]},
     "config: upstream[0].refresh: must be at least 0.05 and at most 86400 (got 0)"),
    ({"upstream": [{"host": "w", "port": 1, "refresh": 5}]}, "config: upstream[0].refresh: unknown key (got 5)"),
])
def test_cluster_and_dns_settings_are_checked(raw, message):
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    assert str(caught.value) == message


def test_cluster_and_dns_entries_validate():
    config = validate({"cluster": {"broker": "redis://:secret@10.0.0.9:6379", "node": "edge-1"},
                       "server": {"processes": 4},
                       "upstream": [{"dns": "workers.game.svc.cluster.local", "port": 50051, "refresh": 5}]})
    assert config["server"]["processes"] == 4 and config["cluster"]["node"] == "edge-1"
    [entry] = config["upstream"]
    assert (entry["dns"], entry["port"], entry["refresh"], entry["alive_timeout"], entry["ready_timeout"]) == (
        "workers.game.svc.cluster.local", 50051, 5, 30, 5)


def test_the_readme_table_of_limits_is_the_one_limits_py_makes():
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("<!-- limits:begin -->\n") + len("<!-- limits:begin -->\n")
    end = readme.index("<!-- limits:end -->")
    assert readme[start:end] == limits.markdown_table(), "run python -m pplex.limits and paste it into README.md"
