"""Enabling built-in plugins: startup errors (exit 2, one line), listings, and the access log."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from pplex.manager import DEFAULT_PLUGINS
from tests.helpers import ROOT, wait_for

BUILTINS = {
    "framing_len": ["pplex_configure", "pplex_framing", "pplex_settings_schema"],
    "framing_line": ["pplex_configure", "pplex_framing", "pplex_settings_schema"],
    "auth_allow": ["pplex_accept", "pplex_configure", "pplex_settings_schema"],
    "auth_token": ["pplex_authenticate", "pplex_configure", "pplex_connection_authenticated",
                   "pplex_connection_closed", "pplex_connection_opened", "pplex_settings_schema"],
    "route_sticky": ["pplex_route"],
    "route_prefix": ["pplex_configure", "pplex_route", "pplex_settings_schema"],
    "least_pending": ["pplex_balance", "pplex_configure"],
    "hash": ["pplex_balance"],
    "access_log": ["pplex_configure", "pplex_connection_authenticated", "pplex_connection_closed",
                   "pplex_connection_opened", "pplex_upstream_added", "pplex_upstream_lost",
                   "pplex_upstream_ready"],
}


def run_pplex(tmp_path, *args, config=None, env=None):
    command = [sys.executable, "-m", "pplex", *args]
    if config is not None:
        path = tmp_path / "pplex.json"
        path.write_text(json.dumps(config))
        command += ["--config", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)


@pytest.mark.parametrize("args, config, expected", [
    (["--plugins", "framing_len"], {"plugins": {"framing_len": {"width": 3}}},
     r"^plugins\.framing_len\.width: must be 1, 2, 4 or 8 .*\(got 3\)$"),
    ([], {"plugins": {"framing_len": {"width": [1]}}},
     r"^plugins\.framing_len\.width: must be 1, 2, 4 or 8 .*\(got \[1\]\)$"),
    ([], {"plugins": {"framing_len": {"width": {"a": 1}}}}, r"^plugins\.framing_len\.width: must be 1, 2, 4 or 8 "),
    ([], {"plugins": {"auth_allow": {"allow": [["10.0.0.0/8"]]}}}, r"^plugins\.auth_allow\.allow\[0\]: expected a CIDR"),
    ([], {"plugins": {"route_prefix": {"routes": {"a": ["h:1"]}, "default": ["any"]}}},
     r"^plugins\.route_prefix\.default: expected \"any\" or \"hold\""),
    ([], {"plugins": {"route_prefix": {"routes": {"a": ["h:\u00b2"]}}}},
     r"^plugins\.route_prefix\.routes\.a\[0\]: expected a worker address \"host:port\" \(got \"h:\\u00b2\"\)$"),
    ([], {"plugins": {"auth_token": {"tokens": ["t"], "auth_timeout": 1e300}}},
     r"^plugins\.auth_token\.auth_timeout: expected a number of seconds greater than 0 and at most 300 "),
    ([], {"plugins": {"framing_line": {"delimiter": ""}}}, r"^plugins\.framing_line\.delimiter: "),
    ([], {"plugins": {"auth_token": {"tokens": []}}}, r"^plugins\.auth_token\.tokens: "),
    ([], {"plugins": {"route_prefix": {"routes": {"a": ["nowhere"]}}}},
     r"^plugins\.route_prefix\.routes\.a\[0\]: "),
    (["--plugins", "framing_len,framing_line"], None,
     r"^plugins: framing_len and framing_line both fill the framing slot; enable only one$"),
    (["--plugins", "hash,least_pending"], None, r"^plugins: hash and least_pending both fill the balance slot"),
    (["--plugins", "route_sticky,route_prefix"], {"plugins": {"route_prefix": {"routes": {"a": ["h:1"]}}}},
     r"^plugins: route_sticky and route_prefix both fill the route slot"),
    (["--plugins", "framing_lenn"], None, r"^plugins: unknown plugin 'framing_lenn'; valid names: .*framing_len"),
], ids=["bad-width", "width-list", "width-object", "cidr-list", "default-list", "address-superscript",
        "huge-auth-timeout", "bad-delimiter", "no-tokens", "bad-address", "two-framings", "two-balancers",
        "two-routers", "unknown-name"])
def test_bad_plugin_choice_or_setting_exits_2_with_one_line(tmp_path, args, config, expected):
    result = run_pplex(tmp_path, *args, config=config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    source = str(tmp_path / "pplex.json") if config is not None else "config"
    assert lines[0].startswith(f"{source}: "), lines[0]  # as every config error: the file, then the path
    assert re.search(expected, lines[0][len(source) + 2:]), lines[0]


# Third-party plugins (installed as a distribution on PYTHONPATH) whose settings checks have bugs.
BUGGY_PLUGINS = {
    "buggy_size": textwrap.dedent('''
        import voluptuous as vol
        from pplex import hookimpl

        def Size(value):
            return {1: "one"}[value]  # KeyError for 2, TypeError for a list

        def Note(value):
            raise vol.Invalid("first line\\nsecond line")

        @hookimpl
        def pplex_settings_schema():
            return {vol.Optional("size"): Size, vol.Optional("note"): Note}
    '''),
    "buggy_whole": textwrap.dedent('''
        from pplex import hookimpl

        def check(value):
            raise RuntimeError("boom")

        @hookimpl
        def pplex_settings_schema():
            return check
    '''),
    "buggy_configure": textwrap.dedent('''
        from pplex import hookimpl

        @hookimpl
        def pplex_configure(settings, context):
            raise OSError("cannot open\\nthe table")
    '''),
}


@pytest.mark.parametrize("settings, line", [
    ({"buggy_size": {"size": 2}}, "plugins.buggy_size.size: the plugin's settings check failed: KeyError: 2"),
    ({"buggy_size": {"size": [1]}},
     "plugins.buggy_size.size: the plugin's settings check failed: TypeError: unhashable type: 'list'"),
    ({"buggy_size": {"note": 1}}, "plugins.buggy_size.note: first line second line"),
    ({"buggy_whole": {"any": 1}}, "plugins.buggy_whole: the plugin's settings check failed: RuntimeError: boom"),
    ({"buggy_configure": {}}, "plugins.buggy_configure: pplex_configure failed: OSError: cannot open the table"),
], ids=["raises-keyerror", "raises-typeerror", "two-line-message", "whole-schema-raises", "configure-raises"])
def test_a_plugin_whose_settings_check_raises_is_a_config_error_naming_the_setting(tmp_path, settings, line):
    """Plugin settings validation is a fault boundary: whatever a plugin's schema raises is one line."""
    info = tmp_path / "buggy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: buggy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pplex.plugins]\n" + "".join(f"{n} = {n}\n" for n in BUGGY_PLUGINS))
    for name, source in BUGGY_PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    config = {"plugins": settings}
    for command in ([], ["check"]):
        result = run_pplex(tmp_path, *command, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                           config=config, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"{tmp_path / 'pplex.json'}: {line}"]


def test_unknown_name_lists_every_valid_name(tmp_path):
    result = run_pplex(tmp_path, "--plugins", "nope")
    names = result.stderr.strip().split("valid names: ")[1].split(", ")
    assert set(BUILTINS) | set(DEFAULT_PLUGINS) <= set(names)


def test_pplex_plugins_lists_every_builtin_with_hooks_and_settings(tmp_path):
    result = run_pplex(tmp_path, "plugins", "--plugins", "framing_len,hash")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        if not line.startswith(" "):
            name, rest = line.split(None, 1)
            rows[name] = rest
    for name, hooks in BUILTINS.items():
        assert rows[name].endswith(", ".join(hooks)), (name, rows[name])
    assert rows["framing_len"].startswith("enabled") and rows["hash"].startswith("enabled")
    assert rows["rr"].startswith("default")  # replaced by hash in the balance slot
    assert "'width (optional, default 4)': '1, 2, 4 or 8 (bytes of the length prefix)'" in result.stdout
    assert "'tokens': 'a non-empty list of non-empty strings'" in result.stdout
    assert " at 0x" not in result.stdout  # validators are described, not printed as objects


def test_admin_plugins_shows_enabled_builtins_and_their_settings(start_pplex):
    pplex = start_pplex("--plugins", "framing_line,least_pending,access_log",
                        config={"plugins": {"auth_allow": {"allow": ["127.0.0.0/8"]}}})
    status, body = pplex.admin("GET", "/plugins")
    assert status == 200
    rows = {row["name"]: row for row in body["plugins"]}
    assert set(BUILTINS) <= set(rows)
    for name, hooks in BUILTINS.items():
        assert rows[name]["hooks"] == hooks
    enabled = {name for name, row in rows.items() if row["enabled"]}
    assert enabled == {"framing_line", "least_pending", "access_log", "auth_allow", "route_any",
                       "broadcast_activity"}
    assert rows["framing_line"]["slot"] == ["framing"]
    assert rows["auth_allow"]["settings"] == {
        "allow (optional, default [])": ["an IPv4 or IPv6 network (CIDR), e.g. 10.0.0.0/8"],
        "deny (optional, default [])": ["an IPv4 or IPv6 network (CIDR), e.g. 10.0.0.0/8"]}
    assert rows["route_prefix"]["settings"]["routes"] == \
        "an object of prefix -> list of worker addresses host:port"


def test_access_log_lines_for_a_connection_and_an_upstream(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--plugins", "framing_line,access_log", "--upstream", f"127.0.0.1:{worker.port}")
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"hello\n")
    assert client.recv_line() == b"hello"
    local_port = client.sock.getsockname()[1]
    client.close()
    wait_for(lambda: re.search(r"pplex\.access: close uuid=\S+ .*reason=\"client_closed\"", pplex.log()),
             message="the close line")
    log = pplex.log()
    opened = re.search(r"INFO pplex\.access: open uuid=(\S+) remote=127\.0\.0\.1:(\d+)", log)
    assert opened.group(2) == str(local_port)
    closed = re.search(r"INFO pplex\.access: close uuid=(\S+) remote=127\.0\.0\.1:(\d+) duration=([\d.]+)s "
                       r"bytes_in=(\d+) bytes_out=(\d+) reason=\"client_closed\"", log)
    assert closed.group(1) == opened.group(1) and closed.group(2) == opened.group(2)
    assert (closed.group(4), closed.group(5)) == ("6", "6")
    assert f"pplex.access: upstream added id=u1 address=127.0.0.1:{worker.port}" in log
    assert f"pplex.access: upstream ready id=u1 address=127.0.0.1:{worker.port}" in log
    pplex.admin("DELETE", "/upstreams/u1")
    wait_for(lambda: re.search(r"pplex\.access: upstream lost id=u1 .*reason=\"removed through the admin API\"",
                               pplex.log()), message="the lost line")
