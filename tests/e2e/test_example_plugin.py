"""The example third-party plugin (examples/room_router), installed as a package and found by entry point."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_plugins_routing import TaggedWorker
from tests.helpers import ROOT

EXAMPLE = os.path.join(ROOT, "examples", "room_router")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example into a fresh directory, offline; return that directory."""
    base = tmp_path_factory.mktemp("room_router")
    source = base / "src"
    # Build from a copy: pip builds local projects in place, and the checkout stays clean.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120, cwd=base,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "room_router" / "plugin.py").exists()
    return str(target)


def pplex_command(*args, pythonpath=None):
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "pplex", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env=env)


def test_pplex_plugins_lists_it_only_once_installed(installed):
    listed = pplex_command("plugins", pythonpath=installed)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("rooms "))
    assert row.split()[1:] == ["pplex_configure,", "pplex_route,", "pplex_settings_schema"]
    assert "a regular expression with exactly one group: the room id" in listed.stdout
    absent = pplex_command("--plugins", "rooms")  # not on the path: not found
    assert absent.returncode == 2 and "unknown plugin 'rooms'" in absent.stderr
    enabled = pplex_command("plugins", "--plugins", "framing_line,rooms", pythonpath=installed)
    assert enabled.returncode == 0, enabled.stderr
    assert next(line for line in enabled.stdout.splitlines() if line.startswith("rooms ")).split()[1] == "enabled"


def test_a_bad_pattern_is_a_one_line_config_error(installed, tmp_path):
    config = tmp_path / "pplex.json"
    config.write_text('{"plugins": {"rooms": {"pattern": "^ROOM \\\\S+"}}}')
    result = pplex_command("--config", str(config), pythonpath=installed)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"{config}: plugins.rooms.pattern: needs exactly one group, the room id; it has 0 (got \"^ROOM \\\\S+\")"]


def test_every_message_of_a_room_reaches_one_worker(installed, start_pplex, start_worker):
    workers = [start_worker(TaggedWorker("a")), start_worker(TaggedWorker("b"))]
    pplex = start_pplex("--plugins", "framing_line,rooms",
                        *[a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")],
                        env={"PYTHONPATH": installed})
    pplex.wait_ready_upstreams(2)
    status, body = pplex.admin("GET", "/plugins")
    row = next(r for r in body["plugins"] if r["name"] == "rooms")
    assert status == 200 and row["enabled"] and row["module"] == "room_router.plugin"
    assert row["slot"] == ["route"]
    clients = [pplex.client() for _ in range(4)]
    rooms = [f"r{n}" for n in range(16)]
    for seq in range(3):
        for index, client in enumerate(clients):  # every client talks in every room
            for room in rooms:
                client.send(f"ROOM {room} c{index} m{seq}\n".encode())
    for client in clients:
        replies = [client.recv_line() for _ in range(3 * len(rooms))]
        assert all(r.split(b":", 1)[0] in (b"a", b"b") for r in replies)
    where = {}
    for worker in workers:
        for _, payload in worker.received:
            where.setdefault(payload.split()[1].decode(), set()).add(worker.name)
    assert set(where) == set(rooms)
    assert all(len(names) == 1 for names in where.values()), where  # one worker per room
    # 16 rooms over 2 workers by hash: both get some (all on one: odds 1 in 32,768).
    assert {name for names in where.values() for name in names} == {"a", "b"}
