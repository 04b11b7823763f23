"""pplex reliability benchmark: fault isolation and bounded memory, with real processes (issue 9).

Run from the repository root:

    .venv/bin/python -m bench.reliability                              # everything: about 25 minutes
    .venv/bin/python -m bench.reliability --sections slow,fuzz --transport h2
    .venv/bin/python -m bench.reliability --soak-seconds 30 --steady-seconds 60 --json out.json

Sections, once per transport: slow (a never-reading client while its worker
pushes a gigabyte and 100 clients ping), soak (1,000 open-loop clients while
workers are killed and stopped; at-most-once, then redeliver_unconfirmed),
fuzz (fuzzed frames against framing_len and framing_line, through pplex and
straight into the plugins' decode), steady (RSS under a pipelined load, then
the admin API with 5,000 clients connected). Each figure is printed with its
goal and PASS / FAIL; bench/README.md says what each one means. Progress goes
to stderr, the report to stdout; exit status 1 when a section could not run.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from bench import procs, targets
from bench.procs import StartError
from bench.reliability import fuzz, report, slow, soak, steady
from bench.reliability.common import Section

SECTIONS = {"slow": slow.run, "soak": soak.run, "fuzz": fuzz.run, "steady": steady.run}
TRANSPORTS = ("grpcio", "h2")
_T0 = time.monotonic()


def progress(msg):
    sys.stderr.write("[%7.1fs] %s\n" % (time.monotonic() - _T0, msg))
    sys.stderr.flush()


def _subset(choices, what):
    def parse(text):
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        if not chosen or any(c not in choices for c in chosen):
            raise argparse.ArgumentTypeError("%s are a comma-separated subset of %s" % (what, ",".join(choices)))
        return list(dict.fromkeys(chosen))
    return parse


def _bytes(text):
    """A size: 1G, 256M, 64K or a number of bytes (K, M, G are powers of 1024)."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a size like 1G, 256M or 65536, got %r" % text)
    if not 256 * 1024 <= value <= 64 * 1024 ** 3:
        raise argparse.ArgumentTypeError("sizes are 256K to 64G, got %r" % text)
    return value


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a positive number, got %r" % text)
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError("expected a positive number, got %r" % text)
        return value
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.reliability",
                                 description="Fault isolation and bounded memory of pplex, measured with real "
                                             "processes; see bench/README.md.")
    ap.add_argument("--transport", type=_subset(TRANSPORTS, "transports"), default=list(TRANSPORTS),
                    help="pplex transports to the workers, one block of sections each (default grpcio,h2)")
    ap.add_argument("--sections", type=_subset(tuple(SECTIONS), "sections"), default=list(SECTIONS),
                    help="sections to run (default slow,soak,fuzz,steady)")
    ap.add_argument("--json", metavar="PATH", help="write every figure and the raw data as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every child's stderr")
    g = ap.add_argument_group("slow consumer")
    g.add_argument("--slow-bytes", type=_bytes, default=1024 ** 3, help="bytes pushed at the never-reading "
                   "client (default 1G; below client_buffer_limit, 16M, eviction waits slow_consumer_timeout)")
    g.add_argument("--slow-clients", type=_positive(int), default=100, help="pinging clients (default 100)")
    g.add_argument("--slow-baseline", type=_positive(float), default=5.0,
                   help="seconds the pingers run alone first (default 5)")
    g = ap.add_argument_group("soak")
    g.add_argument("--soak-seconds", type=_positive(float), default=180.0, help="sending time of each of the "
                   "two runs (default 180)")
    g.add_argument("--soak-clients", type=_positive(int), default=1000, help="clients (default 1000)")
    g.add_argument("--soak-rate", type=_positive(float), default=10.0,
                   help="messages per second per client (default 10)")
    g.add_argument("--kill-every", type=_positive(float), default=10.0,
                   help="seconds between kill -9 of the first worker (default 10)")
    g.add_argument("--stop-seconds", type=_positive(float), default=10.0,
                   help="how long the second worker stays SIGSTOP'd each time (default 10)")
    g.add_argument("--stop-every", type=_positive(float), default=60.0,
                   help="seconds between SIGSTOPs of the second worker (default 60; the first at half of it, "
                        "or at a quarter of a shorter run)")
    g.add_argument("--soak-drain", type=_positive(float), default=5.0,
                   help="after the last send, the clients wait for echoes until none came for this long "
                        "(default 5)")
    g = ap.add_argument_group("fuzz")
    g.add_argument("--fuzz-frames", type=_positive(int), default=100_000,
                   help="fuzzed frames per framing plugin and transport (default 100000)")
    g.add_argument("--fuzz-seed", type=int, default=9, help="seed of the frame generator (default 9)")
    g.add_argument("--fuzz-concurrency", type=_positive(int), default=32,
                   help="fuzzing connections at once (default 32)")
    g = ap.add_argument_group("steady load and admin API")
    g.add_argument("--steady-seconds", type=_positive(float), default=300.0,
                   help="pipelined load per transport (default 300)")
    g.add_argument("--steady-clients", type=_positive(int), default=100, help="clients (default 100)")
    g.add_argument("--pipeline", type=_positive(int), default=16, help="messages in flight per client (default 16)")
    g.add_argument("--sample-every", type=_positive(float), default=10.0,
                   help="seconds between RSS samples (default 10)")
    g.add_argument("--steady-warmup", type=float, default=None,
                   help="seconds of warm-up before RSS growth is counted (default 60, at most a fifth of the run)")
    g.add_argument("--admin-clients", type=_positive(int), default=5000,
                   help="idle clients connected while the admin API is asked (default 5000)")
    args = ap.parse_args(argv)
    if args.steady_warmup is None:
        args.steady_warmup = min(60.0, args.steady_seconds / 5)
    return args


class Context:
    """What a section gets: options, the process set, a temp dir, progress output."""

    def __init__(self, args, ps, tmpdir):
        self.args = args
        self.ps = ps
        self.tmpdir = tmpdir
        self.progress = progress


def build():
    """bench/bin/loadgen and echo, and the Go reference worker, when missing or out of date."""
    for script in (os.path.join(targets.BENCH, "build.sh"),
                   os.path.join(targets.REPO, "conformance", "go-upstream", "build.sh")):
        done = subprocess.run(["bash", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        if done.returncode != 0:
            raise SystemExit("%s failed:\n%s" % (os.path.relpath(script, targets.REPO),
                                                 done.stdout.decode("utf-8", "replace")[-3000:]))


def run_section(ctx, name, transport):
    """The section's result(s): a list of Sections; one with `error` set when it could not run."""
    ctx.progress("%s: %s section" % (transport, name))
    try:
        got = SECTIONS[name](ctx, transport)
        return got if isinstance(got, list) else [got]
    except (StartError, OSError, RuntimeError, TimeoutError, ValueError) as exc:
        failed = Section(name, "%s: could not run" % name)
        failed.error = str(exc).strip()
        ctx.progress("%s %s: FAILED: %s" % (transport, name, failed.error.splitlines()[0] if failed.error else "?"))
        traceback.print_exc(file=sys.stderr)
        return [failed]
    finally:
        ctx.ps.stop_all()


def _terminate(signum, frame):
    # SIGTERM / SIGHUP take the Ctrl-C path, so every child process group is stopped.
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    nofile = procs.raise_nofile()
    if "steady" in args.sections and nofile < args.admin_clients + 1000:
        progress("RLIMIT_NOFILE is %d: the admin figure opens %d clients and may fall short" % (
            nofile, args.admin_clients))
    progress("RLIMIT_NOFILE %d; building the Go helpers" % nofile)
    build()
    tmpdir = tempfile.mkdtemp(prefix="pplex-reliability-")
    ps = procs.ProcSet(tmpdir)
    ctx = Context(args, ps, tmpdir)
    results = {}
    started = time.time()
    interrupted = False
    try:
        for transport in args.transport:
            results[transport] = []
            for name in args.sections:
                results[transport].extend(run_section(ctx, name, transport))
    except KeyboardInterrupt:
        progress("interrupted: stopping every process started")
        interrupted = True
    finally:
        ps.stop_all()
        if args.keep_logs:
            progress("logs kept in %s" % tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    sys.stdout.write(report.render(results))
    sys.stdout.flush()
    summary = report.summary(results)
    if args.json:
        options = {k: v for k, v in vars(args).items() if k not in ("json", "keep_logs")}
        document = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "options": options, "rlimit_nofile": nofile, "interrupted": interrupted,
            "transports": {t: [s.to_json() for s in sections] for t, sections in results.items()},
            "summary": summary,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        progress("results written to %s" % args.json)
    return 1 if interrupted or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
