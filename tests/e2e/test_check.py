"""`pplex check`: exit 0 with the effective config on the example, and on every bad config the
existing tests use, exit 2 with the very line `pplex` itself prints (both are run, real processes).
The same for hostile input (deep nesting, TOML dates, non-ASCII digits, flags over a bad file), each
of which once gave a traceback."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from pplex.config import load_file, validate
from tests.e2e import test_core, test_plugins_config
from tests.helpers import ROOT, free_port
from tests.unit import test_config


def parametrized(function):
    """The argument values of a test's @pytest.mark.parametrize: the cases, not a copy of them."""
    return [mark.args[1] for mark in function.pytestmark if mark.name == "parametrize"][0]


def _json_case(config):
    return ("pplex.json", json.dumps(config), [])


BAD = (
    [_json_case(config) for config, _ in parametrized(test_core.test_bad_config_exits_2_with_one_line_naming_the_path)]
    + [_json_case(raw) for raw, _ in parametrized(test_config.test_errors_name_the_path)]
    + [("pplex.json", text, []) for text in
       parametrized(test_config.test_json_non_finite_constants_are_refused_with_the_file_name)]
    + [("config.toml", f"[[upstream]]\nhost = \"a\"\nport = 1\nalive_timeout = {text}\n", []) for text, _ in
       parametrized(test_config.test_toml_non_finite_numbers_are_refused_with_the_path)]
    + [("pplex.json", json.dumps(config) if config is not None else None, args) for args, config, _ in
       parametrized(test_plugins_config.test_bad_plugin_choice_or_setting_exits_2_with_one_line)]
    + [("broken.json", '{"server": {', []), ("absent.json", None, ["--config-absent"])]
)


def run(*args):
    return subprocess.run([sys.executable, "-m", "pplex", *args], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)


@pytest.mark.parametrize("name, text, args", BAD)
def test_a_bad_config_gives_exit_2_and_the_same_line_as_pplex(tmp_path, name, text, args):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    if "--config-absent" in args:
        args = ["--config", str(path)]
    elif text is not None:
        args = [*args, "--config", str(path)]
    started = run(*args)
    checked = run("check", *args)
    assert started.returncode == 2 and checked.returncode == 2
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and lines == started.stderr.strip().splitlines()
    assert checked.stdout == ""


def test_the_example_config_passes_and_prints_the_effective_config():
    example = os.path.join(ROOT, "pplex.json")
    result = run("check", "--config", example)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == validate(load_file(example), example)


def test_flags_apply_and_secrets_are_redacted(tmp_path):
    path = tmp_path / "pplex.json"
    path.write_text(json.dumps({"management_server": {"token": "hunter2"},
                                "plugins": {"auth_token": {"tokens": ["letmein"]}}}))
    result = run("check", "--config", str(path), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                 "--log-format", "json", "--transport", "h2", "--upstream", "localhost:50051", "--resolve")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["log_format"] == "json" and config["transport"] == "h2"
    [upstream] = config["upstream"]
    assert (upstream["host"], upstream["port"], upstream["alive_timeout"], upstream["ready_timeout"]) == (
        "localhost", 50051, 30, 5)
    assert upstream["max_message_bytes"] == 4 * 1024 * 1024  # every effective value is shown
    assert config["management_server"]["token"] == "<redacted>"
    assert config["plugins"]["auth_token"]["tokens"] == ["<redacted>"]
    assert "hunter2" not in result.stdout and "letmein" not in result.stdout


def test_an_address_in_use_is_the_line_pplex_gives_and_check_never_listens():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, line in (
                (["--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"],
                 f"pplex: cannot listen on 127.0.0.1:{port}: Address already in use"),
                (["--listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}"],
                 f"pplex: admin API cannot listen on 127.0.0.1:{port}: Address already in use")):
            checked, started = run("check", *args), run(*args)
            assert (checked.returncode, started.returncode) == (2, 1)
            assert checked.stderr.strip() == line and started.stderr.strip().splitlines()[-1] == line
    same = free_port()
    checked = run("check", "--listen", f"0.0.0.0:{same}", "--admin", f"127.0.0.1:{same}")
    assert checked.returncode == 2
    assert checked.stderr.strip() == f"pplex: admin API cannot listen on 127.0.0.1:{same}: Address already in use"
    free = free_port()
    assert run("check", "--listen", f"127.0.0.1:{free}", "--admin", "127.0.0.1:0").returncode == 0
    with socket.socket() as again:  # bound and closed, never listened on: the port is free at once
        again.bind(("127.0.0.1", free))


def test_resolve_names_the_upstream_that_does_not_resolve():
    args = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
            "--upstream", "no-such-worker.invalid:50051"]
    assert run("check", *args).returncode == 0  # names are resolved only when asked
    result = run("check", *args, "--resolve")
    assert result.returncode == 2
    assert result.stderr.startswith("config: upstream[1].host: cannot resolve 'no-such-worker.invalid': ")
    assert len(result.stderr.strip().splitlines()) == 1


# -- hostile input: each of these once gave a traceback (exit 1) or a start ------------------------
LOCAL = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
TOO_DEEP = r"FILE: nested too deeply to read \(a config has at most 32 levels\)"
HOSTILE = [
    # (file name, its text (None: no file), flags, the one line as a regex; FILE stands for the file)
    ("deep.json", "[" * 100_000 + "]" * 100_000, [], TOO_DEEP),
    ("deep.json", '{"a":' * 100_000 + "1" + "}" * 100_000, [], TOO_DEEP),
    ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000, [], TOO_DEEP),
    ("deep.json", json.dumps({"plugins": {"framing_len": json.loads('{"a":' * 40 + "1" + "}" * 40)}}), LOCAL,
     r"FILE: plugins\.framing_len(\.a){30}: nested more than 32 levels deep"),
    ("date.toml", "[server]\nidle_timeout = 1979-05-27\n", LOCAL,
     r"FILE: server\.idle_timeout: expected a number \(got 1979-05-27\)"),
    ("time.toml", "[server]\nidle_timeout = 07:32:00\n", LOCAL,
     r"FILE: server\.idle_timeout: expected a number \(got 07:32:00\)"),
    ("datetime.toml", "[server]\nidle_timeout = 1979-05-27T07:32:00Z\n", LOCAL,
     r"FILE: server\.idle_timeout: expected a number \(got 1979-05-27T07:32:00\+00:00\)"),
    ("date.toml", "[plugins.framing_len]\nwidth = 1979-05-27\n", LOCAL,
     r"FILE: plugins\.framing_len\.width: must be 1, 2, 4 or 8 \(bytes of length prefix\) \(got 1979-05-27\)"),
    ("date.toml", "[plugins.auth_token]\ntokens = [1979-05-27]\n", LOCAL,
     r"FILE: plugins\.auth_token\.tokens\[0\]: expected a non-empty string \(got 1979-05-27\)"),
    ("inf.toml", "[plugins.auth_token]\ntokens = [\"t\"]\nauth_timeout = inf\n", LOCAL,
     r"FILE: plugins\.auth_token\.auth_timeout: expected a number of seconds greater than 0 and at most 300 "
     r"\(got Infinity\)"),
    ("nan.toml", "[plugins.auth_token]\ntokens = [\"t\"]\nauth_timeout = nan\n", LOCAL,
     r"FILE: plugins\.auth_token\.auth_timeout: .* \(got NaN\)"),
    ("huge.toml", "[server]\nport = " + "9" * 5000 + "\n", LOCAL, r"FILE: not valid TOML: .*digits.*"),
    ("huge.json", '{"server": {"idle_timeout": ' + "9" * 400 + "}}", LOCAL,
     r"FILE: server\.idle_timeout: a number too large for any setting \(got 9{297}\.\.\.\)"),
    ("surrogate.json", '{"plugins": {"framing_line": {"delimiter": "\\ud800"}}}', LOCAL,
     r"FILE: plugins\.framing_line\.delimiter: not valid Unicode text \(got \"\\ud800\"\)"),
    ("surrogate.json", '{"plugins": {"route_prefix": {"routes": {"\\udfff": ["h:1"]}}}}', LOCAL,
     r"FILE: plugins\.route_prefix\.routes: a key is not valid Unicode text \(got \"\\udfff\"\)"),
    ("pplex.json", '{"cluster": {"broker": "nats://127.0.0.1:0"}}', LOCAL,
     r"FILE: cluster\.broker: the broker URL's port must be between 1 and 65535 \(got \"nats://127\.0\.0\.1:0\"\)"),
    ("pplex.json", '{"cluster": {"broker": "nats://127.0.0.1:\\u00b2"}}', LOCAL,
     r"FILE: cluster\.broker: the broker URL's port must be between 1 and 65535 .*"),
    (None, None, [*LOCAL, "--broker", "nats://127.0.0.1:0"],
     r"config: cluster\.broker: the broker URL's port must be between 1 and 65535 \(got \"nats://127\.0\.0\.1:0\"\)"),
    (None, None, [*LOCAL, "--broker", "redis://127.0.0.1:0"], r"config: cluster\.broker: the broker URL's port .*"),
    (None, None, ["--listen", "127.0.0.1:²", "--admin", "127.0.0.1:0"],
     r"--listen: port must be a number from 0 to 65535 \(got \"127\.0\.0\.1:\\u00b2\"\)"),
    (None, None, ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:٣"],
     r"--admin: port must be a number from 0 to 65535 \(got \"127\.0\.0\.1:\\u0663\"\)"),
    (None, None, [*LOCAL, "--upstream", "127.0.0.1:²"], r"--upstream: port must be a number from 0 to 65535 .*"),
    (None, None, [*LOCAL, "--upstream", "127.0.0.1:" + "1" * 5000],
     r"--upstream: port must be a number from 0 to 65535 \(got \"127\.0\.0\.1:1{286}\.\.\.\)"),
    (None, None, [*LOCAL, "--processes", "٣"], r"--processes: expected a whole number \(got \"\\u0663\"\)"),
]


@pytest.mark.parametrize("name, text, args, expected", HOSTILE, ids=[
    "deep-array", "deep-object", "deep-toml", "40-levels", "toml-date", "toml-time", "toml-datetime",
    "toml-date-plugin", "toml-date-in-list", "toml-inf-plugin", "toml-nan-plugin", "toml-5000-digits",
    "json-400-digits", "surrogate-value", "surrogate-key", "broker-port-0", "broker-superscript-port",
    "flag-nats-port-0", "flag-redis-port-0", "listen-superscript", "admin-arabic-digit", "upstream-superscript",
    "upstream-5000-digits", "processes-arabic-digit"])
def test_hostile_input_gives_exit_2_and_one_line_naming_it(tmp_path, name, text, args, expected):
    if text is not None:
        path = tmp_path / name
        path.write_text(text)
        args = [*args, "--config", str(path)]
        expected = expected.replace("FILE", re.escape(str(path)))
    started, checked = run(*args), run("check", *args)
    assert (started.returncode, checked.returncode) == (2, 2), checked.stderr[-2000:]
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and lines == started.stderr.strip().splitlines()
    assert re.fullmatch(expected, lines[0]), lines[0]


@pytest.mark.parametrize("raw, flags", [
    ({"server": [1]}, ["--listen", "127.0.0.1:0"]),
    ({"server": "x"}, ["--processes", "1"]),
    ({"server": None}, ["--listen", "127.0.0.1:0"]),
    ({"server": {"port": True}}, ["--listen", "127.0.0.1:0"]),
    ({"management_server": [1]}, ["--admin", "127.0.0.1:0"]),
    ({"management_server": {"port": "x"}}, ["--admin", "127.0.0.1:0"]),
    ({"cluster": [1]}, ["--broker", "nats://127.0.0.1:4222"]),
    ({"cluster": {"broker": "nats://h:0"}}, ["--broker", "nats://127.0.0.1:4222"]),
    ({"plugins": [[1]]}, ["--plugins", "rr"]),
    ({"plugins": 5}, ["--plugins", "rr"]),
    ({"upstream": {"host": "a"}}, ["--upstream", "127.0.0.1:1"]),
    ({"transport": "x"}, ["--transport", "h2"]),
])
def test_flags_on_a_bad_file_give_the_line_the_file_alone_gives(tmp_path, raw, flags):
    path = tmp_path / "pplex.json"
    path.write_text(json.dumps(raw))
    alone = run("check", "--config", str(path), *LOCAL)
    assert alone.returncode == 2 and len(alone.stderr.strip().splitlines()) == 1, alone.stderr
    assert alone.stderr.startswith(f"{path}: ")
    for command in ([], ["check"]):
        result = run(*command, "--config", str(path), *LOCAL, *flags)
        assert (result.returncode, result.stderr) == (2, alone.stderr)


@pytest.mark.parametrize("broker", ["nats", "redis"])
def test_a_valid_broker_passes_check_without_a_broker_running(tmp_path, broker):
    url = f"{broker}://127.0.0.1:{free_port()}"   # nothing listens there: check never connects
    path = tmp_path / "pplex.json"
    path.write_text(json.dumps({"cluster": {"broker": url}}))
    for args in (["--broker", url], ["--config", str(path)], ["--broker", url, "--processes", "2"]):
        result = run("check", *LOCAL, *args)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert json.loads(result.stdout)["cluster"]["broker"] == url
