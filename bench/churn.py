"""What lifecycle events cost on connect/disconnect churn: connections/s with and without a lifecycle worker.

    .venv/bin/python -m bench.churn [--clients 2] [--in-flight 32] [--seconds 4] [--rounds 3]
                                    [--transport h2|grpcio] [--message]

Two pplex processes, each in front of one Go reference worker: one in
`--mode echo` (the base contract: pplex sends it no events) and one in
`--mode sessions` (it announces "lifecycle": every client costs pplex a
CONNECTED and a DISCONNECTED on the data stream, and the worker reads them).
Client processes open connections and close them (FIN) as fast as they can,
several in flight each, each process from its own 127.0.0.x source address;
`--message` also sends one message and waits for its reply before closing. pplex runs with
`server.eof_linger` 0, so a client that closes is gone at once.

The figure is pplex's own: connections it closed per second (`/stats`
`connections_closed`) during the measured seconds, and its CPU per
connection. Runs alternate (base, lifecycle, base, ...) so the drift of a
shared machine hits both alike; the medians and their ratio are printed.
"""
import argparse
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
import urllib.request

from . import procs, targets
from .procs import StartError

WORKER_MODES = {"base": "echo", "lifecycle": "sessions"}
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux <netinet/in.h>


def churn_client(index, address, until, message, in_flight, counts):
    """One client process: `in_flight` nonblocking connections at a time, each connected, (given one
    round trip,) then closed with FIN, until the monotonic deadline. Many in flight, so that a SYN the
    kernel retransmits (a port clash on loopback costs a second) does not stall the process."""
    source = ("127.0.0.%d" % (10 + index), 0)
    selector = selectors.DefaultSelector()
    done = failed = 0

    def start():
        sock = socket.socket()
        sock.setblocking(False)
        # The port is chosen at connect, which may reuse a TIME_WAIT one on loopback (tcp_tw_reuse).
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind(source)
        sock.connect_ex(address)
        selector.register(sock, selectors.EVENT_WRITE, "connecting")

    for _ in range(in_flight):
        start()
    while True:
        now = time.monotonic()
        if now >= until:
            break
        for key, _ in selector.select(min(0.2, until - now)):
            sock = key.fileobj
            if key.data == "connecting":
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                elif message:
                    sock.send(b"churn\n")
                    selector.modify(sock, selectors.EVENT_READ, "waiting")
                    continue
                else:
                    done += 1
            else:  # the reply (or the end) of its one round trip
                try:
                    sock.recv(256)
                    done += 1
                except OSError:
                    failed += 1
            selector.unregister(sock)
            sock.close()
            start()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    counts[index] = (done, failed)


def start_go_worker(ps, mode):
    port = procs.free_port()
    if not os.access(targets.GO_WORKER, os.X_OK):
        raise StartError("Go worker %s is missing: run bash conformance/go-upstream/build.sh" % targets.GO_WORKER)
    # The sessions worker prints a line per event: to /dev/null, not to the harness (which would pay
    # for reading them on the same cores).
    p = ps.start("worker-" + mode, ["sh", "-c", 'exec "$0" "$@" >/dev/null', targets.GO_WORKER, "--port",
                                    str(port), "--mode", mode])
    from .grpc_direct import wait_ready
    wait_ready("127.0.0.1:%d" % port, timeout=30)
    return p, "127.0.0.1:%d" % port


def start_pplex(ps, name, target, transport, config, timeout=30):
    """pplex in front of `target`, once its admin API says a worker is ready (the sessions worker
    does not echo, so the harness's echo probe cannot tell)."""
    listen, admin = procs.free_port(), procs.free_port()
    argv = targets.pplex_argv() + ["--listen", "127.0.0.1:%d" % listen, "--upstream", target,
                                   "--admin", "127.0.0.1:%d" % admin, "--log-level", "warning",
                                   "--transport", transport, "--config", config]
    proc = ps.start(name, argv, cwd=targets.REPO, env=targets.python_env())
    proc.wait_line(lambda line: "pplex listening on" in line, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % admin, timeout=2):
                return proc, ("127.0.0.1", listen), ("127.0.0.1", admin)
        except OSError as error:  # 503 until the worker is in rotation
            if time.monotonic() >= deadline or not proc.alive():
                raise StartError("%s: no worker ready within %ds (%s)%s" % (name, timeout, error,
                                                                            proc.diagnostics()))
        time.sleep(0.05)  # polling readiness against a deadline


def admin_json(admin, path):
    with urllib.request.urlopen("http://%s:%d%s" % (admin[0], admin[1], path), timeout=10) as response:
        return json.loads(response.read())


def measure(address, admin, pid, worker_pid, clients, seconds, warmup, message, in_flight):
    """(connections/s pplex closed, pplex CPU ms per connection, worker CPU ms per connection, events
    queued, client failures)."""
    counts = multiprocessing.Manager().dict()
    start = time.monotonic()
    until = start + warmup + seconds
    workers = [multiprocessing.Process(target=churn_client, args=(i, address, until, message, in_flight, counts))
               for i in range(clients)]
    for w in workers:
        w.start()
    time.sleep(warmup)  # a benchmark's warm-up window, not synchronisation
    before, cpu_before = admin_json(admin, "/stats"), procs.cpu_seconds(procs.process_tree(pid))
    worker_before = procs.cpu_seconds(procs.process_tree(worker_pid))
    t0 = time.monotonic()
    time.sleep(max(0.0, until - time.monotonic()))
    after, cpu_after = admin_json(admin, "/stats"), procs.cpu_seconds(procs.process_tree(pid))
    worker_after = procs.cpu_seconds(procs.process_tree(worker_pid))
    elapsed = time.monotonic() - t0
    for w in workers:
        w.join(30)
    closed = after["connections_closed"] - before["connections_closed"]
    events = {kind: after["lifecycle_events"][kind] - before["lifecycle_events"][kind]
              for kind in ("connected", "disconnected")}
    failed = sum(f for _, f in counts.values())
    cpu_ms = 1000 * (cpu_after - cpu_before) / closed if closed else float("nan")
    worker_ms = 1000 * (worker_after - worker_before) / closed if closed else float("nan")
    return closed / elapsed, cpu_ms, worker_ms, events, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--in-flight", type=int, default=32, help="connections each client process keeps opening")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transport", choices=("grpcio", "h2"), default="h2")
    parser.add_argument("--message", action="store_true", help="one round trip per connection before closing")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="pplex-bench-churn-")
    ps = procs.ProcSet(tmp)
    config = os.path.join(tmp, "pplex.json")
    with open(config, "w") as handle:
        json.dump({"server": {"eof_linger": 0}}, handle)
    results = {"base": [], "lifecycle": []}
    cpu = {"base": [], "lifecycle": []}
    worker_cpu = {"base": [], "lifecycle": []}
    events = {}
    try:
        pplexes = {}
        for name, mode in WORKER_MODES.items():
            worker, target = start_go_worker(ps, mode)
            proc, address, admin = start_pplex(ps, "pplex-" + name, target, args.transport, config)
            pplexes[name] = (proc, address, admin, worker)
        for round_number in range(args.rounds):
            for name, (proc, address, admin, worker) in pplexes.items():
                rate, cpu_ms, worker_ms, seen, failed = measure(address, admin, proc.pid, worker.pid, args.clients,
                                                                args.seconds, args.warmup, args.message,
                                                                args.in_flight)
                results[name].append(rate)
                cpu[name].append(cpu_ms)
                worker_cpu[name].append(worker_ms)
                events[name] = seen
                print("round %d %-9s %9.0f conn/s  CPU per conn: pplex %.3f ms, worker %.3f ms  events %s  "
                      "client errors %d" % (round_number + 1, name, rate, cpu_ms, worker_ms, seen, failed),
                      file=sys.stderr)
    finally:
        ps.stop_all()
    base, lifecycle = statistics.median(results["base"]), statistics.median(results["lifecycle"])
    base_cpu, lifecycle_cpu = statistics.median(cpu["base"]), statistics.median(cpu["lifecycle"])
    print("connect/disconnect churn, %d client processes x %d connections in flight%s, %s transport, median of "
          "%d rounds (same run):" % (args.clients, args.in_flight, ", one round trip each" if args.message else "",
                                     args.transport, args.rounds))
    print("                                               measured   pplex CPU    pplex alone: 1 core /")
    print("                                                 conn/s   per conn     CPU per conn")
    for label, rate, per_conn in (("without a lifecycle worker (Go --mode echo)", base, base_cpu),
                                  ("with a lifecycle worker (Go --mode sessions)", lifecycle, lifecycle_cpu)):
        print("  %-44s %9.0f   %.3f ms   %9.0f conn/s" % (label, rate, per_conn, 1000 / per_conn))
    print("  ratio, with / without: measured %.3f, pplex alone %.3f (lifecycle events cost %.1f%% of pplex's "
          "churn capacity)" % (lifecycle / base, base_cpu / lifecycle_cpu, 100 * (1 - base_cpu / lifecycle_cpu)))
    print("  the Go worker's CPU per connection: %.3f ms without events, %.3f ms reading them"
          % (statistics.median(worker_cpu["base"]), statistics.median(worker_cpu["lifecycle"])))
    print("  last lifecycle run: %(connected)d CONNECTED, %(disconnected)d DISCONNECTED queued" % events["lifecycle"])
    print("  (measured conn/s include the clients and the worker sharing this machine's cores; when pplex is not "
          "at 100 % of a core the clients are the limit, and CPU per connection is pplex's own cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
