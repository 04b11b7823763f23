"""`pplex check`: exit 0 with the effective config on the example, and on every bad config the
existing tests use, exit 2 with the very line `pplex` itself prints (both are run, real processes)."""
import json
import os
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
