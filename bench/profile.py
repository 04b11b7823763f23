"""Where pplex's time goes under the benchmark load: a sampling profile of a running pplex.

    .venv/bin/python -m bench.profile [--transport h2] [--clients 100] [--pipeline 1] [--size 32] [--seconds 8]

Starts the Go echo worker and pplex on free loopback ports, puts the
benchmark's closed-loop load on pplex (bench/bin/loadgen), and samples pplex's
threads with py-spy (from PyPI: `pip install py-spy`; it reads the process
with ptrace, so it needs root or `kernel.yama.ptrace_scope` 0) for `--seconds`.
Prints the load's figures, then the functions by own time (the samples
where the function itself was running: C calls it made, such as send() and
recv(), count as its own) and by total time (itself and what it called), as
percentages of the samples taken while pplex was on a CPU.

Only 127.0.0.1; bounded in time; every process is stopped at the end.
"""
import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import procs, targets


def py_spy():
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = beside if os.access(beside, os.X_OK) else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def read_raw(path):
    """py-spy's raw (collapsed) output -> (own, total, samples): Counters of function -> samples."""
    own, total = collections.Counter(), collections.Counter()
    samples = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = [_short(frame) for frame in stack.split(";")]
            samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    return own, total, samples


def _short(frame):
    """`function (path/to/file.py:12)` -> `function (file.py:12)`: the path adds nothing for pplex's modules."""
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')'))})" if where else name


def table(counter, samples, top):
    lines = []
    for frame, count in counter.most_common(top):
        lines.append("%6.1f%%  %6d  %s" % (100.0 * count / samples, count, frame))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=("grpcio", "h2"), default="h2")
    ap.add_argument("--revision", metavar="REV",
                    help="profile pplex as it was at this git revision (before/after a change)")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--pipeline", type=int, default=1, help="messages in flight per client (default 1)")
    ap.add_argument("--size", type=int, default=32, help="message size in bytes (default 32)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds sampled (default 8)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    ap.add_argument("--top", type=int, default=25, help="lines per table (default 25)")
    ap.add_argument("--raw", metavar="PATH", help="also keep py-spy's raw stacks (flamegraph input) at PATH")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 10000 and 1 <= args.pipeline <= 1024 and 1 <= args.size <= 16 << 20
            and 0 < args.seconds <= 600):
        ap.error("--clients 1..10000, --pipeline 1..1024, --size 1..16 MiB, --seconds (0, 600]")
    spy = py_spy()
    subprocess.run(["bash", os.path.join(targets.BENCH, "build.sh")], check=True, stdout=subprocess.DEVNULL)
    procs.raise_nofile()
    tmpdir = tempfile.mkdtemp(prefix="pplex-profile-")
    ps = procs.ProcSet(tmpdir)
    raw = args.raw or os.path.join(tmpdir, "pplex.raw")
    try:
        worker, target = targets.start_worker(ps, "go")
        tree = None
        if args.revision:
            from bench.__main__ import checkout_revision
            tree = checkout_revision(args.revision, tmpdir)
        pplex, address, _ = targets.start_pplex(ps, target, extra=("--transport", args.transport), tree=tree)
        warmup = 1.0
        load_seconds = warmup + args.seconds + 2.0   # sampling starts after the warm-up, ends before the load
        loadgen = subprocess.Popen(
            [os.path.join(targets.BENCH, "bin", "loadgen"), "-addr", "%s:%d" % address, "-clients",
             str(args.clients), "-seconds", str(load_seconds), "-warmup", "0", "-size", str(args.size),
             "-pipeline", str(args.pipeline)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            time.sleep(warmup)   # the load reaches its steady state before sampling starts
            spied = subprocess.run([spy, "record", "--pid", str(pplex.pid), "--duration", "%d" % max(1, args.seconds),
                                    "--rate", str(args.rate), "--format", "raw", "--function", "--nonblocking",
                                    "-o", raw], capture_output=True, text=True, timeout=args.seconds + 60)
            out, _ = loadgen.communicate(timeout=load_seconds + 60)
        finally:
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
        if spied.returncode != 0:
            raise SystemExit("py-spy failed: %s" % (spied.stderr.strip().splitlines() or ["?"])[-1])
        load = json.loads(out.decode().strip().splitlines()[-1])
        own, total, samples = read_raw(raw)
    finally:
        ps.stop_all()
        if not args.raw:
            shutil.rmtree(tmpdir, ignore_errors=True)
    print("pplex --transport %s, Go echo worker; load: %d clients x %d in flight, %d-byte messages" % (
        args.transport, args.clients, args.pipeline, args.size))
    print("load over %.0f s: %s round trips/s, p50 %.0f us, p99 %.0f us, %d errors" % (
        load["seconds"], runner_fmt(load["rt_per_s"]), load["p50_us"], load["p99_us"], load.get("errors", 0)))
    print("py-spy: %d samples of pplex on a CPU over %g s at %d/s (%.0f%% of one core)" % (
        samples, args.seconds, args.rate, 100.0 * samples / (args.rate * args.seconds)))
    print("")
    print("by own time (the function itself, with the C calls it makes):")
    print("\n".join(table(own, samples, args.top)))
    print("")
    print("by total time (the function and everything it called):")
    print("\n".join(table(total, samples, args.top)))
    return 0


def runner_fmt(value):
    return "{:,}".format(int(round(value)))


if __name__ == "__main__":
    sys.exit(main())
