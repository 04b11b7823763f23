"""Section "steady": pplex's memory under a long pipelined load, then its admin API with 5,000 clients.

Processes: the Go echo worker, pplex with its defaults, and the Go load
generator (`bench/bin/loadgen -pipeline 16`, 100 clients, 32-byte messages,
for `--steady-seconds`). pplex's VmRSS is sampled every `--sample-every`
seconds from the generator's start; the growth is the highest sample after
`--steady-warmup` minus the first sample after it (buffers, pools and the
allocator reach their size during the warm-up; what grows after it is a
leak). Then `--admin-clients` idle connections are opened (in batches, each
batch waited for in /proc/PID/fd, so the listen backlog never overflows) and
GET /healthz, /stats and /connections?limit=100 are asked three times each.
"""
import json
import time

from bench import procs, runner
from bench.reliability.common import MB, RssSampler, Section, admin_request, fmt_int, fmt_mb, fmt_ms, log_faults, \
    start_go_echo, start_pplex, thin

RSS_GROWTH_GOAL = 10 * MB
ADMIN_PATHS = ("/healthz", "/stats", "/connections?limit=100")
ADMIN_TRIES = 3
ADMIN_LATENCY_GOAL = 1.0   # seconds: an operator's request is answered at once, not "eventually"
SIZE = 32


def run(ctx, transport):
    args = ctx.args
    sec = Section("steady", "steady load: %d clients pipelined x%d for %g s, RSS every %g s; then the admin API "
                            "with %s clients connected" % (args.steady_clients, args.pipeline, args.steady_seconds,
                                                           args.sample_every, fmt_int(args.admin_clients)))
    worker_port = procs.free_port()
    worker = start_go_echo(ctx.ps, worker_port)
    pplex = start_pplex(ctx.ps, ctx.tmpdir, transport, [worker_port], probe=b"p" * SIZE)
    pplex.wait_upstreams_ready(1)
    ctx.progress("steady %s: %d clients, pipeline %d, %g s" % (transport, args.steady_clients, args.pipeline,
                                                               args.steady_seconds))
    sampler = RssSampler(pplex.pid, args.sample_every).start()
    try:
        load = runner.run_loadgen(ctx.ps, pplex.addr, args.steady_clients, args.steady_seconds, 0, SIZE,
                                  args.pipeline, {"pplex": pplex.pid, "worker": worker.pid})
    finally:
        sampler.stop()
    samples = sampler.samples
    after = [(t, rss) for t, rss in samples if t >= args.steady_warmup]
    grown = (max(r for _, r in after) - after[0][1]) if after else None
    sec.figure("pplex RSS growth after the warm-up (%g s)" % args.steady_warmup,
               fmt_mb(grown) if grown is not None else "no samples", grown, "< %s" % fmt_mb(RSS_GROWTH_GOAL),
               grown is not None and grown < RSS_GROWTH_GOAL)
    errors = load.get("errors", 0)
    sec.figure("messages/s (pipelined round trips)", fmt_int(load["rt_per_s"]), load["rt_per_s"])
    sec.figure("generator errors (reconnects, mismatches)", str(errors), errors, "0", errors == 0)
    sec.data = {"rss_samples": [(round(t, 1), rss) for t, rss in samples], "rss_growth": grown,
                "warmup_s": args.steady_warmup, "load": load}

    pplex.wait_no_clients()   # the generator's connections are closed (after eof_linger)
    ctx.progress("steady %s: opening %s idle clients for the admin API" % (transport, fmt_int(args.admin_clients)))
    admin = admin_with_clients(pplex, args.admin_clients)
    sec.data["admin"] = admin
    sec.figure("idle clients connected (open in /stats)", "%s of %s" % (fmt_int(admin["open"]),
                                                                        fmt_int(args.admin_clients)),
               admin["open"], ">= %s" % fmt_int(args.admin_clients), admin["open"] >= args.admin_clients)
    for path in ADMIN_PATHS:
        row = admin["paths"][path]
        answered = row["answered"] == ADMIN_TRIES
        sec.figure("GET %s: answered, slowest" % path, "%d/%d, %s" % (row["answered"], ADMIN_TRIES,
                                                                    fmt_ms(row["slowest_ms"])),
                   row["slowest_ms"], "%d/%d, < %g s" % (ADMIN_TRIES, ADMIN_TRIES, ADMIN_LATENCY_GOAL),
                   answered and row["slowest_ms"] < ADMIN_LATENCY_GOAL * 1000)
    healthy_after = admin["healthz_after_close"] == 200
    faults, first_fault = log_faults(pplex.proc)
    alive = pplex.proc.alive()
    sec.figure("after they left: /healthz, pplex alive, exceptions",
               "%s, %s, %d" % (admin["healthz_after_close"] or "no answer", "yes" if alive else "NO", faults),
               faults, "200, yes, 0", healthy_after and alive and faults == 0)
    sec.table(rss_table(thin(samples, 40), args.sample_every))
    if first_fault:
        sec.note("first exception line: " + first_fault)
    cpu = load.get("cpu") or {}
    if cpu:
        sec.note("CPU %% of a core: pplex %s, worker %s, generator %s, other %s" % (
            cpu.get("pplex"), cpu.get("worker"), cpu.get("generator"), cpu.get("other")))
    return sec


def rss_table(samples, every, per_row=10):
    """pplex's RSS samples as rows of `per_row` columns: seconds from the start, then MB."""
    lines = ["pplex RSS (MB), sampled every %g s from the start of the load:" % every]
    when = "%7.0f" if every >= 1 else "%7.1f"
    for i in range(0, len(samples), per_row):
        row = samples[i:i + per_row]
        lines.append("  t (s) " + "".join(when % t for t, _ in row))
        lines.append("     MB " + "".join("%7.1f" % (rss / MB) for _, rss in row))
    return lines


def admin_with_clients(pplex, count):
    """Open `count` idle clients, ask the admin API, close them, ask /healthz once more."""
    socks = []
    fds_before = procs.fd_count(pplex.pid)
    try:
        while len(socks) < count:
            got = runner._open_batch(pplex.addr, min(200, count - len(socks)), timeout=10)
            if not got:
                break
            socks.extend(got)
            runner._wait_fds(pplex.pid, fds_before + len(socks), timeout=10)
        paths = {}
        for path in ADMIN_PATHS:
            times, answered = [], 0
            for _ in range(ADMIN_TRIES):
                status, _, seconds = admin_request(pplex.admin, path, timeout=10)
                answered += status == 200
                times.append(seconds)
            paths[path] = {"answered": answered, "slowest_ms": round(1000 * max(times), 1),
                           "fastest_ms": round(1000 * min(times), 1)}
        status, body, _ = admin_request(pplex.admin, "/stats", timeout=10)
        open_now = json.loads(body)["connections_open"] if status == 200 else 0
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body, _ = admin_request(pplex.admin, "/stats", timeout=10)
        if status == 200 and json.loads(body)["connections_open"] == 0:
            break
        time.sleep(0.1)
    status, _, _ = admin_request(pplex.admin, "/healthz", timeout=10)
    return {"opened": len(socks), "open": open_now, "paths": paths, "healthz_after_close": status}
