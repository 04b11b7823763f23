"""What a plugin chain costs: pplex with `--plugins framing_len,rr` against the raw default.

    .venv/bin/python -m bench.plugins [--clients 100] [--seconds 4] [--rounds 3] [--transport grpcio|h2]

Two pplex processes in front of one Go echo worker: the default (framing_raw,
rr) and `--plugins framing_len,rr`. The load generator sends the same 32-byte
messages to both; for framing_len each message is a valid frame (a 4-byte
big-endian length, then 28 bytes). Runs alternate A, B, A, B... so drift of
the shared machine hits both alike; the figure is the median of each.
"""
import argparse
import statistics
import struct
import sys
import tempfile

from . import procs, runner, targets

FRAMED_PROBE = struct.pack(">I", 28) + b"pplex-bench-framed-probe-012"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.plugins", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--plugins", default="framing_len,rr")
    parser.add_argument("--worker", choices=("go", "python"), default="go")
    parser.add_argument("--transport", choices=("grpcio", "h2"), default="grpcio",
                        help="pplex's transport to the worker, for both pplex processes")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="pplex-bench-plugins-")
    ps = procs.ProcSet(tmp)
    framed = "framing_len" in args.plugins.split(",")
    results = {"raw": [], "plugins": []}
    try:
        _, target = targets.start_worker(ps, args.worker)
        transport = ("--transport", args.transport)
        _, raw_addr, _ = targets.start_pplex(ps, target, name="pplex-raw", extra=transport)
        _, plug_addr, _ = targets.start_pplex(ps, target, name="pplex-plugins",
                                              extra=("--plugins", args.plugins) + transport,
                                              **({"payload": FRAMED_PROBE} if framed else {}))
        for round_number in range(args.rounds):
            for name, addr, extra in (("raw", raw_addr, ()),
                                      ("plugins", plug_addr, ("-lenprefix",) if framed else ())):
                result = runner.run_loadgen(ps, addr, args.clients, args.seconds, 1.0, 32,
                                            args.pipeline, {}, extra=extra)
                results[name].append(result["rt_per_s"])
                print("round %d %-8s %10.0f msg/s  p50 %s us" % (round_number + 1, name, result["rt_per_s"],
                                                                result["p50_us"]), file=sys.stderr)
    finally:
        ps.stop_all()
    raw, plugged = statistics.median(results["raw"]), statistics.median(results["plugins"])
    print("plugin chain cost, %d clients x %d in flight, %s transport, median of %d rounds (same run):"
          % (args.clients, args.pipeline, args.transport, args.rounds))
    print("  pplex (default: framing_raw, rr)   %10.0f msg/s" % raw)
    print("  pplex --plugins %-18s %10.0f msg/s" % (args.plugins, plugged))
    print("  ratio %.3f  (cost %.1f%% of throughput)" % (plugged / raw, 100 * (1 - plugged / raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
