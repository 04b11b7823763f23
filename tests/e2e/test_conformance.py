"""The worker conformance suite (issue 5), run against the reference workers.

The Go reference worker (conformance/go-upstream, built by `./dev test` and CI
before pytest runs) must pass in its reference mode (the echo-only scenarios
skipped: it answers a fixed payload) and in echo mode; the Python SDK echo
worker must pass everything. Each deliberately broken Go mode must fail
exactly the scenarios about what it breaks, with a reason aimed at the
worker's author. A missing Go binary fails these tests: it is not a reason
to skip them.

The reference worker also passes with pplex on its h2 transport.

The suite runs in this process (`conformance.runner.run_suite`); its workers
and pplex are real processes on free loopback ports.
"""
import json
import os
import shlex
import subprocess
import sys

import pytest

from conformance.runner import run_suite
from conformance.scenarios import names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GO_WORKER = os.path.join(ROOT, "conformance", "go-upstream", "bin", "go-upstream")
ECHO_ONLY = {"binary_payloads", "payload_sizes"}
LIFECYCLE = {"lifecycle_connected", "lifecycle_disconnected", "lifecycle_close", "lifecycle_groups"}


def go_command(mode):
    assert os.access(GO_WORKER, os.X_OK), (
        f"{GO_WORKER} is missing: build it with `bash conformance/go-upstream/build.sh` (`./dev test` does)")
    return f"{shlex.quote(GO_WORKER)} --port {{port}} --mode {mode} --ready_sleep {{ready_sleep}}"


def run(command, tmp_path, transport="h2", **options):
    return run_suite(command, workdir=str(tmp_path / "conformance"), transport=transport, **options)


def by_result(report, status):
    return {s["name"] for s in report["scenarios"] if s["result"] == status}


def explain(report):
    """The report's non-passing rows, for assertion messages."""
    rows = [f"{s['name']}: {s['result']}: {s['reason'] or s['figure']}"
            for s in report["scenarios"] if s["result"] != "PASS"]
    return "worker: " + json.dumps(report["worker"].get("echo_detail")) + "\n" + "\n".join(rows)


def scenario(report, name):
    return next(s for s in report["scenarios"] if s["name"] == name)


@pytest.mark.parametrize("transport", ["grpcio", "h2"])
def test_go_reference_worker_passes_with_echo_only_scenarios_skipped(transport, tmp_path):
    report = run(go_command("reference"), tmp_path, transport)
    assert report["pplex_transport"] == transport
    assert by_result(report, "FAIL") == set(), explain(report)
    assert by_result(report, "SKIP") == ECHO_ONLY | LIFECYCLE, explain(report)
    assert len(report["scenarios"]) == len(names())
    for name in ECHO_ONLY:
        assert "does not echo" in scenario(report, name)["reason"]
    assert_base_contract(report)
    # Its own ALL broadcasts (every 2nd output) are what broadcast_all checked, not the helper's.
    assert scenario(report, "broadcast_all")["subject"] == "worker"
    assert report["worker"]["broadcast_kinds_seen"] == ["ALL"]
    # Its slow ready ({ready_sleep}) was the one kept out of rotation.
    assert scenario(report, "slow_ready")["subject"] == "worker+pplex"


def assert_base_contract(report):
    """A base-contract worker: no features, and the session scenarios skipped, saying why."""
    assert report["worker"]["features"] == []
    for name in LIFECYCLE:
        row = scenario(report, name)
        assert row["result"] == "SKIP" and row["reason"].startswith("needs a lifecycle worker"), row


def test_go_echo_worker_passes_everything(tmp_path):
    report = run(go_command("echo"), tmp_path)
    assert by_result(report, "PASS") == set(names()) - LIFECYCLE, explain(report)
    assert report["worker"]["echo"] == "yes"
    assert_base_contract(report)


def test_python_sdk_echo_worker_passes_everything(tmp_path):
    report = run(f"{shlex.quote(sys.executable)} -m pplex.worker --port {{port}}", tmp_path)
    assert by_result(report, "PASS") == set(names()) - LIFECYCLE, explain(report)
    assert_base_contract(report)
    # No {ready_sleep}: slow_ready checks pplex with the helper worker, and says so.
    assert scenario(report, "slow_ready")["subject"] == "pplex"


BROKEN_MODES = [
    ("close-stream", {"stream_closed"}, "ended the data stream"),
    ("never-ready", {"ready_probe", "never_ready"}, "ready was never answered within ready_timeout=1s"),
    ("not-ready", {"ready_probe", "never_ready"}, "answered ready=false"),
    ("live-false", {"live_heartbeats", "live_false"}, "answered live=false"),
    ("garbage", {"garbage_payloads"}, "does not return payloads intact"),
]


@pytest.mark.parametrize("mode, failing, words", BROKEN_MODES, ids=[m[0] for m in BROKEN_MODES])
def test_broken_go_worker_fails_exactly_its_scenarios(mode, failing, words, tmp_path):
    report = run(go_command(mode), tmp_path)
    assert not report["ok"]
    assert by_result(report, "FAIL") == failing, explain(report)
    for name in failing:
        row = scenario(report, name)
        # Blamed on the worker, in words its author can act on.
        assert row["subject"] in ("worker", "worker+pplex"), row
        assert words in row["reason"], row["reason"]
        assert not row["reason"].startswith("pplex:"), row["reason"]
    for row in report["scenarios"]:
        if row["result"] == "SKIP":
            assert row["reason"].startswith(("not run:", "needs an echo worker", "needs a lifecycle worker")), row


def test_go_sessions_worker_passes_everything_but_the_echo_checks(tmp_path):
    """The Go worker's --mode sessions answers the session commands, so the session scenarios check
    pplex's lifecycle events, CLOSE and groups through a non-Python worker."""
    report = run(go_command("sessions"), tmp_path, echo="no")
    assert report["worker"]["features"] == ["lifecycle"]
    assert report["worker"]["session_commands"] is True, explain(report)
    assert by_result(report, "FAIL") == set(), explain(report)
    assert by_result(report, "SKIP") == ECHO_ONLY, explain(report)
    for name in LIFECYCLE:
        assert scenario(report, name)["subject"] == "worker+pplex", scenario(report, name)


def test_session_scenarios_pass_on_the_h2_transport(tmp_path):
    """The events ride in h2's hand-encoded batches and the actions are parsed by its fast path."""
    report = run(go_command("sessions"), tmp_path, "h2", scenarios=sorted(LIFECYCLE), echo="no")
    assert report["pplex_transport"] == "h2"
    assert by_result(report, "PASS") == LIFECYCLE, explain(report)


def test_command_line_exit_status_table_and_report(tmp_path):
    """A worker that cannot start: exit status 1, the table names the cause, the JSON report says the same."""
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "conformance", "--upstream-cmd", "sh -c 'echo no such worker; exit 3' {port}",
         "--scenario", "ready_probe", "unknown_uuid", "--report", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ready_probe" in done.stdout and "FAIL" in done.stdout
    report = json.loads(report_path.read_text())
    assert [s["name"] for s in report["scenarios"]] == ["ready_probe", "unknown_uuid"]
    ready = scenario(report, "ready_probe")
    assert ready["result"] == "FAIL" and "exited with status 3" in ready["reason"], ready
    assert "no such worker" in ready["reason"]
    assert scenario(report, "unknown_uuid")["result"] == "PASS"


def test_command_line_rejects_bad_arguments():
    for args in (["--upstream-cmd", "worker --port 5000"], ["--upstream-cmd", "w {port}", "--scenario", "nope"]):
        done = subprocess.run([sys.executable, "-m", "conformance", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert "python -m conformance:" in done.stderr
