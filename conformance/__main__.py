"""python -m conformance --upstream-cmd "CMD --port {port}" [options]: check a worker against pplex.

Exit status: 0 when no scenario failed, 1 when one did, 2 for bad arguments,
130 when interrupted.
"""
import argparse
import signal
import sys

from conformance.procs import kill_everything
from conformance.runner import format_table, run_suite
from conformance.scenarios import SCENARIOS


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run pplex's worker conformance suite against a worker command.",
        epilog="Scenarios: " + ", ".join(s.name for s in SCENARIOS) + ". See conformance/README.md.")
    parser.add_argument("--upstream-cmd", required=True, metavar="CMD",
                        help="the worker command; {port} is replaced by a free port, and {ready_sleep} "
                             "(optional) by milliseconds the worker's ready must wait before answering")
    parser.add_argument("--instances", type=int, default=2, metavar="N",
                        help="worker instances for round_robin_share (default 2)")
    parser.add_argument("--report", metavar="FILE", help="write the JSON report here")
    parser.add_argument("--scenario", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--slow-ready-cmd", metavar="CMD",
                        help="a worker command whose ready answers after {ready_sleep} ms (for slow_ready), "
                             "when --upstream-cmd has no {ready_sleep}")
    parser.add_argument("--echo", choices=("auto", "yes", "no"), default="auto",
                        help="is the worker an echo worker? auto (default): decided by probing it")
    parser.add_argument("--transport", choices=("h2", "grpcio"), default="h2",
                        help="how pplex reaches the worker (pplex --transport; default h2, as pplex)")
    parser.add_argument("--keep-logs", action="store_true", help="keep pplex and worker logs (path in the report)")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    say = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    try:
        report = run_suite(args.upstream_cmd, instances=args.instances, echo=args.echo, scenarios=args.scenario,
                           slow_ready_cmd=args.slow_ready_cmd, report_path=args.report, keep_logs=args.keep_logs,
                           transport=args.transport,
                           say=say)
    except ValueError as error:
        print(f"python -m conformance: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kill_everything()
        print("interrupted: every process the suite started was stopped", file=sys.stderr)
        return 130
    print()
    print(format_table(report))
    if args.report:
        print(f"report: {args.report}")
    if report.get("logs"):
        print(f"logs: {report['logs']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
