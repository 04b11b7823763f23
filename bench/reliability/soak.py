"""Section "soak": workers are killed and frozen under 1,000 steady clients; every message is accounted.

Processes: three Go echo workers (A, B, C), pplex with framing_line (so each
line is one message and its echo comes back whole) and otherwise its
defaults, and the soak clients (`clients.py soak`: open loop, one numbered
line per client every 1/rate s). While the clients send:
- A gets SIGKILL every `--kill-every` s and is restarted at once on the same port;
- B gets SIGSTOP for `--stop-seconds`, then SIGCONT, every `--stop-every` s;
- C is left alone.
Run twice: at-most-once (pplex's default), then `server.redeliver_unconfirmed`.

Accounting, per message: delivered (its echo came back; a second echo is a
duplicate), or not. pplex's /stats say what happened to messages of a worker
that went away: `rerouted` (never written to it: sent to another worker, so
normally delivered), `redelivered` (written, unconfirmed, sent again), and
`unconfirmed` (written to a stream that broke after the worker's last reply:
at-most-once lets them go). Lost = not delivered and not counted unconfirmed.
"""
import os
import signal
import sys
import time

from bench import procs, targets
from bench.reliability.common import Section, dict_delta, fmt_int, fmt_ms, last_json, log_faults, start_go_echo, \
    start_pplex, wait_event

MODES = (("at-most-once", False), ("redeliver_unconfirmed", True))


def schedule(seconds, kill_every, stop_every, stop_seconds):
    """Sorted [(t, action)] with action "kill", "stop" or "cont", t in seconds from the first send."""
    events = []
    t = kill_every
    while t < seconds:
        events.append((t, "kill"))
        t += kill_every
    t = min(stop_every / 2, seconds / 4)
    while t < seconds:
        events.append((t, "stop"))
        events.append((min(seconds, t + stop_seconds), "cont"))
        t += stop_every
    return sorted(events, key=lambda e: (e[0], e[1] != "cont"))


class Faults:
    """Applies the schedule to workers A and B; restarts A on its port after each kill."""

    def __init__(self, ctx, workers, ports):
        self.ctx = ctx
        self.workers = workers   # [A, B, C] procs
        self.ports = ports
        self.kills = self.stops = 0
        self.restart_seconds = []
        self.restart_failures = 0
        self.frozen = False

    def apply(self, action):
        if action == "kill":
            a = self.workers[0]
            if a is not None:
                try:
                    os.killpg(a.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                a.popen.wait(timeout=10)
                self.ctx.ps.stop(a)
                self.kills += 1
            t0 = time.monotonic()
            try:
                self.workers[0] = start_go_echo(self.ctx.ps, self.ports[0], name="worker-a")
                self.restart_seconds.append(time.monotonic() - t0)
            except procs.StartError as exc:
                self.workers[0] = None
                self.restart_failures += 1
                self.ctx.progress("soak: worker A did not restart: %s" % str(exc).splitlines()[0])
        elif action == "stop":
            os.killpg(self.workers[1].pid, signal.SIGSTOP)
            self.frozen = True
            self.stops += 1
        elif action == "cont":
            self.thaw()

    def thaw(self):
        if self.frozen:
            try:
                os.killpg(self.workers[1].pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.frozen = False


def run(ctx, transport):
    return [run_mode(ctx, transport, label, redeliver) for label, redeliver in MODES]


def run_mode(ctx, transport, label, redeliver):
    args = ctx.args
    plan = schedule(args.soak_seconds, args.kill_every, args.stop_every, args.stop_seconds)
    kills = sum(1 for _, a in plan if a == "kill")
    stops = sum(1 for _, a in plan if a == "stop")
    sec = Section("soak", "soak, %s: %s clients x %g msg/s for %g s; 3 Go echo workers: A kill -9'd every %g s "
                          "(%d times), B SIGSTOP'd for %g s (%d times)"
                  % (label, fmt_int(args.soak_clients), args.soak_rate, args.soak_seconds, args.kill_every, kills,
                     args.stop_seconds, stops))
    ports = [procs.free_port() for _ in range(3)]
    workers = [start_go_echo(ctx.ps, port, name="worker-%s" % "abc"[i]) for i, port in enumerate(ports)]
    pplex = start_pplex(ctx.ps, ctx.tmpdir, transport, ports, server={"redeliver_unconfirmed": redeliver},
                        plugins={"framing_line": {}}, probe=b"probe\n")
    pplex.wait_upstreams_ready(3)
    stats_before = pplex.stats()
    errors_before = pplex.errors_total()
    clients = ctx.ps.start("soak-clients", [
        sys.executable, "-m", "bench.reliability.clients", "soak", "--addr", "%s:%d" % pplex.addr,
        "--clients", str(args.soak_clients), "--rate", str(args.soak_rate), "--seconds", str(args.soak_seconds),
        "--drain", str(args.soak_drain)],
        cwd=targets.REPO, env=targets.python_env())
    t0 = wait_event(clients, "sending", 90)["t"]
    ctx.progress("soak %s %s: %d clients sending for %g s; %d kills, %d stops" % (
        transport, label, args.soak_clients, args.soak_seconds, kills, stops))
    faults = Faults(ctx, workers, ports)
    try:
        for at, action in plan:
            while time.monotonic() < t0 + at:
                if not clients.alive():
                    raise RuntimeError("the soak clients exited early: %s" % clients.last_error_line())
                time.sleep(min(0.05, max(0.0, t0 + at - time.monotonic())))
            faults.apply(action)
    finally:
        faults.thaw()
    result = last_json(clients, args.soak_seconds + 120)
    stats = pplex.stats()
    upstreams = pplex.get("/upstreams")["upstreams"]
    alive = pplex.proc.alive()
    contained = pplex.errors_total() - errors_before
    faults_logged, first_fault = log_faults(pplex.proc)

    rerouted = stats["rerouted"] - stats_before["rerouted"]
    redelivered = stats["redelivered"] - stats_before["redelivered"]
    unconfirmed = stats["unconfirmed"] - stats_before["unconfirmed"]
    sent, delivered, missing = result["sent"], result["delivered"], result["missing"]
    lost = max(0, missing - unconfirmed)
    share = 100.0 * delivered / sent if sent else 0.0
    sec.figure("messages sent", fmt_int(sent), sent)
    if redeliver:
        sec.figure("delivered (echo came back)", "%s (%.3f %%)" % (fmt_int(delivered), share), delivered,
                   "all", missing == 0)
    else:
        sec.figure("delivered (echo came back)", "%s (%.3f %%)" % (fmt_int(delivered), share), delivered)
    sec.figure("  re-routed by pplex (a worker left before them)", fmt_int(rerouted), rerouted)
    if redeliver:
        sec.figure("  sent again by pplex (redelivered)", fmt_int(redelivered), redelivered)
    sec.figure("not delivered", fmt_int(missing), missing)
    sec.figure("  unconfirmed (pplex: written, then the stream broke)", fmt_int(unconfirmed), unconfirmed)
    sec.figure("lost (not delivered, not counted unconfirmed)", fmt_int(lost), lost, "0", lost == 0)
    sec.figure("duplicates (an echo that came back twice)", fmt_int(result["duplicates"]), result["duplicates"])
    drops = result["drops"]
    closes = dict_delta(stats_before["closes"], stats["closes"])
    # A drop seen by a client, or a client pplex closed during the soak (its reason shown): both fail.
    text = str(drops) + (" (pplex closed %s)" % ", ".join("%s %s" % (v, k) for k, v in sorted(closes.items()))
                         if closes else "")
    sec.figure("client drops", text, drops, "0", drops == 0 and not closes)
    sec.figure("echoes malformed or for another client", str(result["malformed"]), result["malformed"], "0",
               result["malformed"] == 0)
    sec.figure("pplex alive, exceptions in its log", "%s, %d" % ("yes" if alive else "NO", faults_logged),
               faults_logged, "yes, 0", alive and faults_logged == 0)
    lat = result["latency"]
    sec.note("echo latency p50 %s, p99 %s, max %s (a frozen worker holds its messages until SIGCONT)" % (
        fmt_ms(lat["p50_ms"]), fmt_ms(lat["p99_ms"]), fmt_ms(lat["max_ms"])))
    restarts = faults.restart_seconds
    sec.note("faults applied: %d kill -9 (restart to ready: mean %s), %d SIGSTOP; ejections A/B/C: %s" % (
        faults.kills, fmt_ms(1000 * sum(restarts) / len(restarts)) if restarts else "-", faults.stops,
        "/".join(str(u["ejections"]) for u in upstreams)))
    drops_pplex = dict_delta(stats_before["drops"], stats["drops"])
    if drops_pplex or closes or contained:
        sec.note("pplex drops %s, closes %s, contained errors %d" % (drops_pplex or "{}", closes or "{}", contained))
    if faults.restart_failures:
        sec.note("worker A failed to restart %d time(s)" % faults.restart_failures)
    if result["max_send_lag_ms"] > 100:
        sec.note("the clients fell up to %.0f ms behind their schedule (a busy box)" % result["max_send_lag_ms"])
    if first_fault:
        sec.note("first exception line: " + first_fault)
    sec.data = {"mode": label, "clients": result, "rerouted": rerouted, "redelivered": redelivered,
                "unconfirmed": unconfirmed, "lost": lost, "pplex_drops": drops_pplex, "pplex_closes": closes,
                "contained_errors": contained, "kills": faults.kills, "stops": faults.stops,
                "restart_seconds": restarts, "upstreams": upstreams}
    ctx.ps.stop_all()
    return sec
