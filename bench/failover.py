"""Failover figure: kill -9 one of three workers under 200 steady clients.

    .venv/bin/python -m bench.failover [--clients 200] [--rate 20] [--alive-timeout 1] [--transport grpcio|h2]

Each client sends a numbered line every 1/rate seconds (open loop: it does
not wait for replies, as a game client does not), through pplex to three Go
echo workers. Mid-run one worker gets SIGKILL. Printed:
- ejected: kill -9 -> pplex has taken the worker out of rotation (admin API);
- failover: kill -9 -> the last message that was delayed by the failover got
  its reply from another worker, i.e. the longest reply delay of any message
  sent in the second around the kill, against the p99 before it;
- lost messages (sent, never answered) next to pplex's own counts of messages
  re-routed and unconfirmed (written to the dead stream: at-most-once);
- whether every client kept its connection.
Only 127.0.0.1; bounded in time; every process is stopped at the end.
"""
import argparse
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request

from . import procs, targets


class OpenLoopClients:
    def __init__(self, address, count, rate, seconds):
        self.socks = [socket.create_connection(address) for _ in range(count)]
        self.interval = 1.0 / rate
        self.seconds = seconds
        self.sent_at = [dict() for _ in range(count)]  # seq -> send time
        self.reply_at = [dict() for _ in range(count)]
        self.closed = [False] * count
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        selector = selectors.DefaultSelector()
        buffers = [b""] * len(self.socks)
        for index, sock in enumerate(self.socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        seq = 0
        start = time.monotonic()
        end = start + self.seconds
        next_send = start
        while time.monotonic() < end + 2.0:  # 2 s more to collect late replies
            now = time.monotonic()
            if now >= next_send and now < end:
                for index, sock in enumerate(self.socks):
                    if self.closed[index]:
                        continue
                    try:
                        sock.send(b"%d\n" % seq)
                        self.sent_at[index][seq] = time.monotonic()
                    except OSError:
                        self.closed[index] = True
                seq += 1
                next_send += self.interval
            for key, _ in selector.select(0.002):
                index = key.data
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed[index] = True
                    selector.unregister(key.fileobj)
                    continue
                lines = (buffers[index] + data).split(b"\n")
                buffers[index] = lines.pop()
                stamp = time.monotonic()
                for line in lines:
                    self.reply_at[index][int(line)] = stamp


def admin_get(admin, path):
    with urllib.request.urlopen("http://%s:%d%s" % (admin[0], admin[1], path), timeout=5) as response:
        return json.loads(response.read())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second per client")
    parser.add_argument("--alive-timeout", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=6.0, help="sending time; the kill is at half")
    parser.add_argument("--worker", choices=("go", "python"), default="go")
    parser.add_argument("--transport", choices=("grpcio", "h2"), default="grpcio")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="pplex-failover-")
    ps = procs.ProcSet(tmp)
    try:
        workers = [targets.start_worker(ps, args.worker) for _ in range(3)]
        listen, admin = procs.free_port(), procs.free_port()
        config = os.path.join(tmp, "pplex.json")
        with open(config, "w") as handle:
            json.dump({"upstream": [{"host": "127.0.0.1", "port": int(target.rsplit(":", 1)[1]),
                                     "alive_timeout": args.alive_timeout} for _, target in workers]}, handle)
        argv = targets.pplex_argv() + ["--listen", "127.0.0.1:%d" % listen, "--admin", "127.0.0.1:%d" % admin,
                                       "--config", config, "--log-level", "warning",
                                       "--transport", args.transport]
        pplex = ps.start("pplex", argv, cwd=targets.REPO, env=targets.python_env())
        targets.probe_while_alive(pplex, ("127.0.0.1", listen), 30, argv)
        admin_address = ("127.0.0.1", admin)
        deadline = time.monotonic() + 30
        while sum(u["state"] == "ready" for u in admin_get(admin_address, "/upstreams")["upstreams"]) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("workers did not all become ready")
            time.sleep(0.05)
        clients = OpenLoopClients(("127.0.0.1", listen), args.clients, args.rate, args.seconds)
        clients.thread.start()
        time.sleep(args.seconds / 2)  # the load runs for a fixed time; the kill lands mid-run
        victim_proc, victim_target = workers[0]
        killed_at = time.monotonic()
        os.killpg(victim_proc.pid, signal.SIGKILL)
        ejected_at = None
        while time.monotonic() < killed_at + 4 * args.alive_timeout + 2:
            state = [u for u in admin_get(admin_address, "/upstreams")["upstreams"]
                     if u["address"] == victim_target][0]["state"]
            if state != "ready":
                ejected_at = time.monotonic()
                break
            time.sleep(0.002)
        clients.thread.join(args.seconds + 10)
        stats = admin_get(admin_address, "/stats")
    finally:
        ps.stop_all()

    before, around, lost = [], [], 0
    for sent, replied in zip(clients.sent_at, clients.reply_at):
        for seq, at in sent.items():
            if seq not in replied:
                lost += 1
            elif at < killed_at - 0.5:
                before.append(replied[seq] - at)
            elif killed_at - 0.5 <= at <= killed_at + 0.5:
                around.append(replied[seq] - at)
    before.sort()
    total_sent = sum(len(s) for s in clients.sent_at)
    p99_before = before[int(len(before) * 0.99)] if before else float("nan")
    worst_around = max(around) if around else float("nan")
    print("failover: kill -9 one of 3 %s echo workers, %d clients x %g msg/s, alive_timeout %g s, %s transport"
          % ("Go" if args.worker == "go" else "Python", args.clients, args.rate, args.alive_timeout, args.transport))
    print("  ejected from rotation   %8.1f ms after kill -9" % ((ejected_at - killed_at) * 1000 if ejected_at else float("nan")))
    print("  failover (worst reply delay of messages sent within 0.5 s of the kill) %8.1f ms"
          "  (p99 before the kill %.1f ms)" % (worst_around * 1000, p99_before * 1000))
    print("  messages sent %d, answered %d, lost %d (%.3f%%)" % (total_sent, total_sent - lost, lost,
                                                               100.0 * lost / max(1, total_sent)))
    print("  pplex counted: unconfirmed %d, re-routed %d, drops %s" % (stats["unconfirmed"], stats["rerouted"],
                                                                      stats["drops"] or "none"))
    print("  clients that lost their connection: %d of %d" % (sum(clients.closed), args.clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
