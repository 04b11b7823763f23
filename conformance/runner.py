"""Runs the preflight and the scenarios, and turns results into a table and a JSON report.

`run_suite` is the programmatic entry point (the pytest suite calls it);
`python -m conformance` is a thin command line around it. Whatever happens
(a failure, an exception, Ctrl-C), every process and helper worker started is
stopped before it returns or raises.
"""
import datetime
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import traceback

from conformance import preflight
from conformance.context import Context, Fail, Passed, Skip
from conformance.procs import StartError, WorkerCommand
from conformance.scenarios import SCENARIOS, names

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
REPORT_VERSION = 1


class Result:
    def __init__(self, name, status, figure="", reason="", subject="worker", seconds=0.0, details=None):
        self.name = name
        self.status = status
        self.figure = figure
        self.reason = reason
        self.subject = subject
        self.seconds = seconds
        self.details = details or {}

    def as_dict(self):
        return {"name": self.name, "result": self.status, "figure": self.figure, "reason": self.reason,
                "subject": self.subject, "seconds": round(self.seconds, 3), "details": self.details}


def blocked(ctx, needs):
    """Why a scenario with these needs cannot run against this worker (None: it can)."""
    profile = ctx.profile
    if not needs:
        return None
    if profile.start_error:
        return "not run: your worker did not start (see ready_probe)"
    if not profile.ready_ok:
        return "not run: your worker never entered rotation (see ready_probe)"
    wants = set(needs)
    if wants & {"stable", "answers", "echo"}:
        if profile.idle_ok is False:
            return (f"not run: your worker does not stay in rotation (see live_heartbeats): "
                    f"{profile.idle_detail}")
        if profile.traffic_ok is False:
            detail = profile.traffic_detail or ""
            see = "stream_closed" if "data stream closed" in detail else "live_heartbeats"
            return (f"not run: your worker leaves rotation under traffic, after {profile.traffic_messages} "
                    f"message(s) (see {see}): {detail}")
    if "lifecycle" in wants and not profile.lifecycle:
        return ("needs a lifecycle worker: your worker's ready answer does not announce \"lifecycle\" in "
                "ReadyResult.features, so pplex sends it no CONNECTED / DISCONNECTED (the base contract: "
                "nothing to check here)")
    if "answers" in wants and profile.answered == 0:
        return ("not run: your worker answered none of the probe messages; these checks need a worker that "
                "answers (an echo mode is best)")
    if "echo" in wants and profile.echo != "yes":
        if profile.echo == "corrupt":
            return "not run: your worker does not return payloads intact (see garbage_payloads)"
        if ctx.echo_mode == "no":
            return "needs an echo worker (--echo no was given)"
        return f"needs an echo worker; yours does not echo: {profile.echo_detail}"
    return None


def run_scenario(ctx, scenario):
    ctx.scenario = scenario.name
    started = time.monotonic()
    try:
        reason = blocked(ctx, scenario.needs)
        if reason:
            raise Skip(reason)
        outcome = scenario.run(ctx)
        if not isinstance(outcome, Passed):
            raise TypeError(f"scenario {scenario.name} returned {outcome!r}")
        details = dict(outcome.details)
        if outcome.note:
            details["note"] = outcome.note
        result = Result(scenario.name, PASS, outcome.figure, outcome.note, outcome.subject, details=details)
    except Fail as failure:
        result = Result(scenario.name, FAIL, failure.figure, failure.reason, failure.subject or "worker",
                        details=failure.details)
    except Skip as skip:
        result = Result(scenario.name, SKIP, "", skip.reason, skip.subject or "worker")
    except StartError as error:
        result = Result(scenario.name, FAIL, "", str(error), "worker")
    except Exception as error:
        result = Result(scenario.name, FAIL, "", f"suite error: {type(error).__name__}: {error}", "suite",
                        details={"traceback": traceback.format_exc()})
    finally:
        ctx.end_scope()
    result.seconds = time.monotonic() - started
    return result


def run_suite(upstream_cmd, instances=2, echo="auto", scenarios=None, slow_ready_cmd=None, report_path=None,
              workdir=None, keep_logs=False, say=None, transport="h2"):
    """Run the suite; return the report (a dict). Raises ValueError for a bad command or scenario name."""
    say = say or (lambda text: None)
    command = WorkerCommand(upstream_cmd, slow_ready_cmd)
    if echo not in ("auto", "yes", "no"):
        raise ValueError(f"echo must be auto, yes or no (got {echo!r})")
    if instances < 1:
        raise ValueError(f"instances must be 1 or more (got {instances})")
    chosen = list(scenarios or names())
    unknown = [n for n in chosen if n not in names()]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; valid names: {', '.join(names())}")
    own_dir = workdir is None
    workdir = str(workdir or tempfile.mkdtemp(prefix="pplex-conformance-"))
    os.makedirs(workdir, exist_ok=True)
    if transport not in ("grpcio", "h2"):
        raise ValueError(f"transport must be grpcio or h2 (got {transport!r})")
    ctx = Context(command, workdir, instances=instances, echo=echo, transport=transport)
    results = []
    started_at = datetime.datetime.now(datetime.timezone.utc)
    started = time.monotonic()
    preflight_seconds = 0.0
    finished = False
    try:
        ctx.scenario = "preflight"
        try:
            preflight.run(ctx)
        finally:
            ctx.end_scope()
        preflight_seconds = time.monotonic() - started
        say(f"worker: {ctx.profile.summary()} (preflight {preflight_seconds:.1f} s)")
        for scenario in SCENARIOS:
            if scenario.name not in chosen:
                continue
            result = run_scenario(ctx, scenario)
            results.append(result)
            say(f"  {result.name:<27} {result.status}  ({result.seconds:.1f} s)")
        finished = True
    finally:
        # Only what this run started: runs in one process must not stop each other's processes.
        ctx.close()
        if own_dir and not keep_logs and not finished:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "suite": "pplex worker conformance",
        "version": REPORT_VERSION,
        "started": started_at.isoformat(timespec="seconds"),
        "duration_seconds": round(time.monotonic() - started, 3),
        "preflight_seconds": round(preflight_seconds, 3),
        "upstream_cmd": upstream_cmd,
        "slow_ready_cmd": slow_ready_cmd,
        "instances": instances,
        "echo": echo,
        "pplex_transport": transport,
        "python": sys.version.split()[0],
        "worker": ctx.profile.as_dict() if ctx.profile else None,
        "summary": {status.lower(): sum(1 for r in results if r.status == status) for status in (PASS, FAIL, SKIP)},
        "ok": not any(r.status == FAIL for r in results),
        "scenarios": [r.as_dict() for r in results],
        "logs": workdir if (keep_logs or not own_dir) else None,
    }
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if own_dir and not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def format_table(report, width=None):
    """The report as a text table: scenario, result, figure, then the reason under it (wrapped)."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    width = max(80, min(width, 160))
    rows = report["scenarios"]
    name_w = max([len("scenario")] + [len(r["name"]) for r in rows])
    lines = [f"{'scenario':<{name_w}}  result  figure / reason", "-" * min(width, name_w + 60)]
    indent = " " * (name_w + 10)
    for row in rows:
        first = row["figure"] if row["result"] == PASS else (row["figure"] or row["reason"])
        text = textwrap.wrap(first or "", width - len(indent)) or [""]
        lines.append(f"{row['name']:<{name_w}}  {row['result']:<6}  {text[0]}")
        lines.extend(indent + more for more in text[1:])
        extra = row["reason"] if (row["result"] == PASS or row["figure"]) and row["reason"] else ""
        for more in textwrap.wrap(extra, width - len(indent) - 2):
            lines.append(indent + "  " + more)
    summary = report["summary"]
    lines.append("-" * min(width, name_w + 60))
    lines.append(f"{summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped in "
                 f"{report['duration_seconds']:.1f} s")
    return "\n".join(lines)
