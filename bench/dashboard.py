"""What an open dashboard costs: pplex's throughput with one browser polling the page, and without.

    .venv/bin/python -m bench.dashboard [--clients 100] [--seconds 5] [--rounds 5] [--transport grpcio,h2]

One pplex per transport in front of one echo worker (the Go reference worker
when built), the Go load generator as in `python -m bench`, and one headless
Chromium (Debian's, through Playwright, as in the dashboard tests) that stays
running throughout. In an "open" run its tab shows the dashboard, which polls
the admin API every second and redraws; in a "closed" run the tab is on
about:blank. Runs alternate closed/open, open/closed, ... so drift of the
shared machine hits both alike; each figure is the median of its runs, with
the range, and pplex's CPU time per message (from /proc, over each run's
measurement window), which moves less with other load on the box. Before
the runs, with no load, pplex's CPU per second is read with the page closed
and open: the page's own cost to the proxy, free of the load's noise. The
browser shares the machine's cores with pplex, so its own drawing is part of
what is measured, as it would be for an operator's laptop tab on a
co-located admin host. Only 127.0.0.1; every process is stopped at the end.
"""
import argparse
import statistics
import sys
import tempfile
import time

from . import procs, runner, targets
from .__main__ import build

BAR = 0.03  # the bar: open within 3 % of closed


def measure(ps, args, worker_target, transport, browser):
    pplex, addr, admin = targets.start_pplex(ps, worker_target, name=f"pplex-{transport}",
                                             extra=("--transport", transport))
    page = browser.new_page()
    requests = [0]
    page.on("request", lambda request: requests.__setitem__(0, requests[0] + 1))
    figures = {"closed": [], "open": []}
    polls = []
    try:
        idle = idle_cost(page, pplex.pid, admin, args.idle_seconds)
        print("  %s no load: pplex CPU %.2f ms/s with the page closed, %.2f ms/s open"
              % (transport, idle["closed"], idle["open"]), file=sys.stderr)
        for round_number in range(args.rounds):
            order = ("closed", "open") if round_number % 2 == 0 else ("open", "closed")
            for mode in order:
                if mode == "open":
                    page.goto("http://%s:%d/" % admin)
                    page.wait_for_selector("#workers tr[data-key]")  # the page is polling and drawing
                else:
                    page.goto("about:blank")
                page.evaluate("1")  # deliver pending request events before counting
                before, started = requests[0], time.monotonic()
                result = runner.run_loadgen(ps, addr, args.clients, args.seconds, args.warmup, args.size,
                                            args.pipeline, {"pplex": pplex.pid})
                page.wait_for_timeout(100)  # let the driver hand over the last request events
                made = requests[0] - before
                figures[mode].append((result["rt_per_s"], result["cpu"].get("pplex")))
                if mode == "open":
                    polls.append(made / (time.monotonic() - started))
                print("  %s round %d  dashboard %-6s %10.0f msg/s  pplex CPU %s %%  (page requests: %d)"
                      % (transport, round_number + 1, mode, result["rt_per_s"],
                         _cpu(result["cpu"].get("pplex")), made), file=sys.stderr)
    finally:
        page.close()
        ps.stop(pplex)
    return figures, polls, idle


def idle_cost(page, pid, admin, seconds):
    """pplex's CPU in ms per second with no client load, page closed then open: the page's own cost
    to the proxy, free of the load's noise (the browser's drawing is not charged to pplex)."""
    tree = procs.process_tree(pid)
    cost = {}
    for mode in ("closed", "open"):
        if mode == "open":
            page.goto("http://%s:%d/" % admin)
            page.wait_for_selector("#workers tr[data-key]")
        else:
            page.goto("about:blank")
        page.wait_for_timeout(1000 * min(1.5, seconds))  # past the first requests and drawing
        before, started = procs.cpu_seconds(tree), time.monotonic()
        page.wait_for_timeout(seconds * 1000)  # sleeps while Playwright keeps serving the page's events
        cost[mode] = 1000.0 * (procs.cpu_seconds(tree) - before) / (time.monotonic() - started)
    return cost


def _cpu(value):
    return "%.0f" % value if isinstance(value, (int, float)) else "?"


def _us_per_message(rate, cpu_percent):
    """pplex's CPU time per message in microseconds: steadier than msg/s on a shared machine."""
    if not rate or not isinstance(cpu_percent, (int, float)):
        return None
    return cpu_percent / 100.0 / rate * 1e6


def report(args, transport, figures, polls, idle):
    rows = {}
    for mode in ("closed", "open"):
        rates = [rate for rate, _ in figures[mode]]
        costs = [c for c in (_us_per_message(rate, cpu) for rate, cpu in figures[mode]) if c is not None]
        rows[mode] = (statistics.median(rates), min(rates), max(rates),
                      statistics.median(costs) if costs else None)
    print("dashboard cost, %s transport: %d clients x %d in flight, %g s per run, median of %d runs each:"
          % (transport, args.clients, args.pipeline, args.seconds, args.rounds))
    for mode in ("closed", "open"):
        median, low, high, cost = rows[mode]
        note = ("   (the page made %.1f requests/s)" % statistics.median(polls)) if mode == "open" and polls else ""
        print("  dashboard %-6s %10.0f msg/s (runs %.0f to %.0f)   pplex CPU %s us/message%s"
              % (mode, median, low, high, "%.1f" % cost if cost is not None else "?", note))
    ratio = rows["open"][0] / rows["closed"][0] if rows["closed"][0] else float("nan")
    print("  open/closed %.3f  (%+.1f %%; within %d %%: %s)"
          % (ratio, 100 * (ratio - 1), round(BAR * 100), "yes" if abs(1 - ratio) <= BAR else "NO"))
    if rows["open"][3] is not None and rows["closed"][3] is not None:
        print("  pplex CPU per message open/closed %.3f" % (rows["open"][3] / rows["closed"][3]))
    print("  with no load, the open page costs pplex %.2f ms of CPU per second (%.2f %% of a core; "
          "closed: %.2f ms/s)" % (idle["open"], idle["open"] / 10.0, idle["closed"]))
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5, help="runs per mode (open, closed)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds of the no-load measurement of pplex's CPU, page closed and open")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--worker", choices=("go", "python", "auto"), default="auto")
    parser.add_argument("--transport", default="grpcio,h2", help="comma-separated: grpcio, h2")
    args = parser.parse_args(argv)
    transports = [t for t in args.transport.split(",") if t]
    if not transports or set(transports) - {"grpcio", "h2"} or args.rounds < 1 or args.seconds <= 0:
        parser.error("--transport from grpcio,h2; --rounds >= 1; --seconds > 0")
    from tests.browser import chromium  # Playwright: a test extra, like the rest of bench's tools

    procs.raise_nofile()
    build()
    ps = procs.ProcSet(tempfile.mkdtemp(prefix="pplex-bench-dashboard-"))
    results = {}
    try:
        kind, why = targets.choose_worker(args.worker)
        print("worker: %s (%s)" % (kind, why), file=sys.stderr)
        _, worker_target = targets.start_worker(ps, kind)
        with chromium() as browser:
            for transport in transports:
                results[transport] = measure(ps, args, worker_target, transport, browser)
    finally:
        ps.stop_all()
    for transport in transports:
        report(args, transport, *results[transport])
    return 0


if __name__ == "__main__":
    sys.exit(main())
