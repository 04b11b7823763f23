"""Cluster figures: broadcast latency across nodes, relayed broadcasts/s per broker, --processes 1 vs 2.

    .venv/bin/python -m bench.cluster [--brokers nats,redis] [--clients 20] [--broadcasts 400]
                                      [--flood 20000] [--seconds 5] [--loadgen-clients 100]

For each broker (nats-server, redis-server from Debian's packages, started
here on a free loopback port):
- three pplex nodes a, b, c (h2 transport) and one Python worker in this
  process that every node streams to;
- latency: the worker broadcasts (BROADCAST_ALL) on node a's stream, one every
  2 ms, each payload stamped with CLOCK_MONOTONIC; `--clients` clients on each
  node read them; printed p50/p99 of stamp -> read, for a's own clients (no
  relay) and for b's and c's (through the broker);
- throughput: the worker queues `--flood` broadcasts at once on a's stream; one
  client on a and one on b count them; printed the rate each one received at
  (b's is the relayed rate; a's is what the worker -> pplex leg delivered).

Then `--processes 1` against `--processes 2` (NATS): the Go loadgen, closed
loop, `--loadgen-clients` clients through pplex to the Go echo worker; round
trips/s, p50/p99 and each process's CPU.

Only 127.0.0.1; bounded in time; every process is stopped at the end. Figures
on a shared 2-core machine are noisy: see bench/README.md.
"""
import argparse
import json
import os
import re
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request

from . import procs, runner, targets

BROKER_COMMANDS = {"nats": "nats-server", "redis": "redis-server"}


def progress(message):
    sys.stderr.write("[cluster] %s\n" % message)
    sys.stderr.flush()


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise procs.StartError("timed out waiting for %s" % what)
        time.sleep(0.02)  # polling a condition with a deadline


def admin_get(admin, path):
    with urllib.request.urlopen("http://%s%s" % (admin, path), timeout=5) as response:
        return json.loads(response.read())


# -- processes ------------------------------------------------------------------------
def start_broker(ps, kind, tmp):
    binary = shutil.which(BROKER_COMMANDS[kind]) or "/usr/sbin/" + BROKER_COMMANDS[kind]
    if not os.access(binary, os.X_OK):
        raise procs.StartError("%s is not installed: apt-get install %s" % (BROKER_COMMANDS[kind],
                                                                              BROKER_COMMANDS[kind]))
    port = procs.free_port()
    if kind == "nats":
        argv = [binary, "-a", "127.0.0.1", "-p", str(port)]
    else:
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", tmp]
    p = ps.start(kind, argv)

    def accepts():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait(accepts, 10, "%s on port %d" % (kind, port))
    return p, "%s://127.0.0.1:%d" % (kind, port)


def write_config(tmp, name, config):
    path = os.path.join(tmp, "%s.json" % name)
    with open(path, "w") as handle:
        json.dump(config, handle)
    return path


STARTUP = re.compile(r"pplex listening on (\S+):(\d+), admin API on http://(\S+)")


def start_node(ps, tmp, name, config, extra=()):
    argv = targets.pplex_argv() + ["--config", write_config(tmp, name, config), "--listen", "127.0.0.1:0",
                                   "--admin", "127.0.0.1:0", "--log-level", "warning", *extra]
    p = ps.start("pplex-" + name, argv, cwd=targets.REPO, env=targets.python_env())
    lines = []
    match = None
    while match is None:
        line = p.wait_line(lambda l: True, 40)
        lines.append(line)
        match = STARTUP.search(line)
    return p, int(match.group(2)), match.group(3).rstrip(","), lines


class Receiver:
    """Clients read by one selector thread: each line `<seq> <monotonic ns>` is timed on arrival."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.samples = {}   # group -> [latency seconds]
        self.counts = {}    # group -> lines
        self.last = {}      # group -> monotonic time of the last line
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, port, group, count):
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, [group, b""])
        self.samples.setdefault(group, [])
        self.counts.setdefault(group, 0)

    def _run(self):
        while self.running:
            for key, _ in self.selector.select(0.05):
                try:
                    data = key.fileobj.recv(262144)
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(key.fileobj)
                    continue
                now = time.monotonic_ns()
                state = key.data
                lines = (state[1] + data).split(b"\n")
                state[1] = lines.pop()
                group = state[0]
                samples = self.samples[group]
                for line in lines:
                    stamp = line.split(b" ", 1)[1] if b" " in line else b""
                    if stamp.isdigit():
                        samples.append((now - int(stamp)) / 1e9)
                self.counts[group] += len(lines)
                self.last[group] = time.monotonic()

    def reset(self):
        for group in self.samples:
            self.samples[group] = []
            self.counts[group] = 0

    def close(self):
        self.running = False
        self.thread.join(2)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


# -- the broker rows -------------------------------------------------------------------------
def broker_row(kind, args, tmp):
    from pplex.worker import Worker

    ps = procs.ProcSet(tmp)
    worker = Worker().serve(port=0)
    receiver = None
    try:
        _, url = start_broker(ps, kind, tmp)
        nodes = {}
        for name in ("a", "b", "c"):
            config = {"upstream": [{"host": "127.0.0.1", "port": worker.port}], "transport": "h2",
                      "cluster": {"broker": url, "node": name, "heartbeat": 0.5, "dead_after": 2}}
            _, port, admin, _ = start_node(ps, tmp, name, config)
            nodes[name] = (port, admin)
        wait(lambda: {s.node for s in worker.streams()} >= {"a", "b", "c"}, 20, "a stream from each node")
        wait(lambda: all(len(admin_get(admin, "/cluster")["nodes"]) == 3 for _, admin in nodes.values()),
             20, "every node to see the others")
        stream_a = next(s for s in worker.streams() if s.node == "a")

        receiver = Receiver()
        for name, (port, _) in nodes.items():
            receiver.add(port, name, args.clients)
        wait(lambda: all(admin_get(admin, "/stats")["connections_open"] == args.clients
                         for _, admin in nodes.values()), 20, "clients on every node")
        progress("%s: %d broadcasts, one per 2 ms, to %d clients on each of 3 nodes"
                 % (kind, args.broadcasts, args.clients))
        for seq in range(args.broadcasts):
            stream_a.broadcast(b"%d %d\n" % (seq, time.monotonic_ns()))
            time.sleep(0.002)  # pacing the load: one broadcast every 2 ms
        expected = args.broadcasts * args.clients
        try:
            wait(lambda: all(receiver.counts[n] >= expected for n in nodes), 20, "every broadcast read")
        except procs.StartError:
            pass  # at most once: report what arrived
        local = receiver.samples["a"]
        remote = receiver.samples["b"] + receiver.samples["c"]
        latency = {
            "local_p50_ms": percentile(local, 0.5) * 1e3, "local_p99_ms": percentile(local, 0.99) * 1e3,
            "remote_p50_ms": percentile(remote, 0.5) * 1e3, "remote_p99_ms": percentile(remote, 0.99) * 1e3,
            "delivered_remote": len(remote), "expected_remote": 2 * expected,
        }
        receiver.close()

        # Throughput: one client on a, one on b; the worker queues a flood at once.
        receiver = Receiver()
        receiver.add(nodes["a"][0], "a", 1)
        receiver.add(nodes["b"][0], "b", 1)
        wait(lambda: admin_get(nodes["b"][1], "/stats")["connections_open"] == 1, 20,
             "the counting client")
        before = admin_get(nodes["a"][1], "/stats")["cluster"]
        progress("%s: %d broadcasts queued at once on a's stream" % (kind, args.flood))
        started = time.monotonic()
        for seq in range(args.flood):
            stream_a.broadcast(b"%d x\n" % seq)
        try:
            wait(lambda: receiver.counts["b"] >= args.flood, 60, "the flood on b")
        except procs.StartError:
            pass
        wait(lambda: time.monotonic() - max(receiver.last.values(), default=started) > 1.0, 30, "quiet")
        after = admin_get(nodes["a"][1], "/stats")["cluster"]
        flood = {}
        for name in ("a", "b"):
            took = receiver.last.get(name, started) - started
            flood[name + "_per_s"] = receiver.counts[name] / took if took > 0 else float("nan")
            flood[name + "_received"] = receiver.counts[name]
        flood["unrelayed"] = {k: v - before["unrelayed"].get(k, 0) for k, v in after["unrelayed"].items()}
        flood["frames"] = after["frames_published"] - before["frames_published"]
        return {"broker": kind, "latency": latency, "flood": flood}
    finally:
        if receiver is not None:
            receiver.close()
        worker.stop(grace=0)
        ps.stop_all()


# -- --processes 1 vs 2 -------------------------------------------------------------------------
def processes_row(count, args, tmp):
    ps = procs.ProcSet(tmp)
    try:
        _, url = start_broker(ps, "nats", tmp)
        worker_proc, target = targets.start_worker(ps, "go")
        config = {"upstream": [{"host": "127.0.0.1", "port": int(target.rsplit(":", 1)[1])}], "transport": "h2",
                  "cluster": {"broker": url, "node": "p%d" % count}}
        p, port, _, lines = start_node(ps, tmp, "p%d" % count, config, extra=("--processes", str(count)))
        watch = {"worker": worker_proc.pid}
        pids = [int(m.group(1)) for m in (re.search(r"\(pid (\d+)\)", l) for l in lines) if m]
        for index, pid in enumerate(pids or [p.pid]):
            watch["pplex-%d" % index] = pid
        targets.probe_echo(("127.0.0.1", port), 30)
        progress("--processes %d: loadgen, %d clients, %g s" % (count, args.loadgen_clients, args.seconds))
        result = runner.run_loadgen(ps, ("127.0.0.1", port), args.loadgen_clients, args.seconds, 1, 32, 1, watch)
        return {"processes": count, "rt_per_s": result["rt_per_s"], "p50_ms": result["p50_us"] / 1e3,
                "p99_ms": result["p99_us"] / 1e3, "cpu": result.get("cpu") or {}}
    finally:
        ps.stop_all()


def cpu_text(cpu):
    per = cpu.get("per_process") if isinstance(cpu, dict) else None
    source = per if isinstance(per, dict) else cpu
    parts = []
    for name, value in sorted((source or {}).items()):
        if isinstance(value, (int, float)):
            parts.append("%s %.0f%%" % (name, value))
        elif isinstance(value, dict) and isinstance(value.get("cpu_pct"), (int, float)):
            parts.append("%s %.0f%%" % (name, value["cpu_pct"]))
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default="nats,redis")
    parser.add_argument("--clients", type=int, default=20, help="clients per node for the latency figure")
    parser.add_argument("--broadcasts", type=int, default=400, help="broadcasts for the latency figure")
    parser.add_argument("--flood", type=int, default=20000, help="broadcasts for the throughput figure")
    parser.add_argument("--seconds", type=float, default=5.0, help="loadgen window per --processes row")
    parser.add_argument("--loadgen-clients", type=int, default=100)
    parser.add_argument("--no-processes", action="store_true", help="skip --processes 1 vs 2")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="pplex-cluster-bench-")
    results = {"brokers": [], "processes": []}
    for kind in [k for k in args.brokers.split(",") if k]:
        results["brokers"].append(broker_row(kind, args, tmp))
    if not args.no_processes:
        if not os.access(os.path.join(targets.BENCH, "bin", "loadgen"), os.X_OK):
            subprocess_build()
        for count in (1, 2):
            results["processes"].append(processes_row(count, args, tmp))

    print("pplex cluster benchmark (127.0.0.1, %d cores; figures from one run are noisy)" % os.cpu_count())
    print("broadcast from a worker on node a's stream; %d clients per node; h2 transport" % args.clients)
    print("%-6s %22s %22s %26s %12s" % ("broker", "local p50 / p99 ms", "other nodes p50 / p99",
                                         "relayed broadcasts/s (b)", "origin (a)/s"))
    for row in results["brokers"]:
        lat, flood = row["latency"], row["flood"]
        print("%-6s %10.2f / %-9.2f %10.2f / %-9.2f %14.0f (%d of %d) %12.0f" % (
            row["broker"], lat["local_p50_ms"], lat["local_p99_ms"], lat["remote_p50_ms"], lat["remote_p99_ms"],
            flood["b_per_s"], flood["b_received"], args.flood, flood["a_per_s"]))
        if any(flood["unrelayed"].values()):
            print("       unrelayed during the flood: %s" % flood["unrelayed"])
    if results["processes"]:
        print("--processes (NATS, Go echo worker, %d closed-loop clients, %g s):" % (args.loadgen_clients, args.seconds))
        for row in results["processes"]:
            print("  %d process(es): %9.0f round trips/s  p50 %.2f ms  p99 %.2f ms  cpu: %s" % (
                row["processes"], row["rt_per_s"], row["p50_ms"], row["p99_ms"], cpu_text(row["cpu"])))
        one, two = results["processes"]
        print("  2 / 1 processes: %.2fx" % (two["rt_per_s"] / one["rt_per_s"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def subprocess_build():
    import subprocess
    subprocess.run(["bash", os.path.join(targets.BENCH, "build.sh")], check=True)


if __name__ == "__main__":
    sys.exit(main())
