"""Client swarms of the reliability benchmark, run in their own process.

    python -m bench.reliability.clients ping --addr H:P --clients 100 [--size 32]
    python -m bench.reliability.clients soak --addr H:P --clients 1000 --rate 10 --seconds 180

Both are one thread over nonblocking sockets (epoll), so a thousand clients
cost one process; each stops by itself (`--max-seconds` bounds `ping`, the
schedule bounds `soak`).

ping (closed loop): every client keeps one message in flight: it writes SIZE
bytes stamped with its sequence number, reads exactly SIZE bytes back, checks
the number, and writes the next. Round-trip times go into the current phase;
SIGUSR1 starts the next phase (the harness sends it when the push begins),
SIGTERM ends the run. Meant for raw framing (the default): one message in
flight is one read.

soak (open loop): every client writes one line `CLIENT SEQ SENT_NS\\n` every
1/RATE seconds whatever comes back (a client of a game or a feed does not
wait), each client at its own phase in the period. Meant for framing_line, so
each line is one message and its echo comes back whole. Every echo marks its
(client, seq) delivered; a second echo of it is a duplicate. After the last
send it waits for the echoes still owed until none has come for `--drain`
seconds. A client whose connection ends is a drop: it sends no more.

stdout: one JSON line per event ({"event": "connected"}, {"event": "sending",
"t": CLOCK_MONOTONIC}) and the result as the last line.
"""
import argparse
import array
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

from bench import procs

CONNECT_BATCH = 200
CONNECT_TIMEOUT = 30.0


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def connect_all(addr, count):
    """`count` connected nonblocking sockets with TCP_NODELAY, opened in batches; raises OSError."""
    socks = []
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while len(socks) < count:
        batch = []
        for _ in range(min(CONNECT_BATCH, count - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            s.connect_ex(addr)
            batch.append(s)
        sel = selectors.DefaultSelector()
        for s in batch:
            sel.register(s, selectors.EVENT_WRITE)
        left = len(batch)
        while left:
            if time.monotonic() > deadline:
                raise OSError("connecting %d clients to %s:%d took over %.0f s" % (count, addr[0], addr[1],
                                                                                  CONNECT_TIMEOUT))
            for key, _ in sel.select(0.5):
                s = key.fileobj
                sel.unregister(s)
                left -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect to %s:%d: %s" % (addr[0], addr[1], os.strerror(err)))
        sel.close()
        socks.extend(batch)
    return socks


def percentiles(values_us):
    """{count, p50_ms, p99_ms, max_ms} of latencies in microseconds."""
    if not values_us:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values_us)
    n = len(ordered)

    def at(q):
        return round(ordered[min(n - 1, int(q * n))] / 1000.0, 3)
    return {"count": n, "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] / 1000.0, 3)}


# ---------------------------------------------------------------------------
# ping: closed loop, one message in flight per client, in phases

class _Flags:
    phase = 0
    stop = False


def ping(args):
    flags = _Flags()
    signal.signal(signal.SIGUSR1, lambda *_: setattr(flags, "phase", flags.phase + 1))
    signal.signal(signal.SIGTERM, lambda *_: setattr(flags, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(flags, "stop", True))
    socks = connect_all((args.host, args.port), args.clients)
    size = max(16, args.size)
    pad = b"." * (size - 16)
    sel = selectors.DefaultSelector()
    state = []   # per client: [seq, sent_ns, received bytearray]
    for index, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, index)
        state.append([0, 0, bytearray()])
    phases = [[]]
    phase_started = [time.monotonic()]
    phase_seconds = []
    drops = mismatches = 0
    alive = len(socks)
    out({"event": "connected", "clients": len(socks)})

    def send(index):
        st = state[index]
        st[0] += 1
        st[1] = time.monotonic_ns()
        # sendall on a nonblocking socket: one small write to an empty buffer always fits.
        socks[index].sendall(struct.pack("<QQ", index, st[0]) + pad)

    for index in range(len(socks)):
        send(index)
    end = time.monotonic() + args.max_seconds
    while not flags.stop and alive and time.monotonic() < end:
        while flags.phase >= len(phases):
            now = time.monotonic()
            phase_seconds.append(now - phase_started[-1])
            phases.append([])
            phase_started.append(now)
        current = phases[-1]
        for key, _ in sel.select(0.1):
            index = key.data
            st = state[index]
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if not data:
                drops += 1
                alive -= 1
                sel.unregister(key.fileobj)
                continue
            st[2] += data
            if len(st[2]) < size:
                continue
            got, rest = bytes(st[2][:size]), st[2][size:]
            if len(rest) or struct.unpack_from("<QQ", got) != (index, st[0]):
                mismatches += 1
                drops += 1
                alive -= 1
                sel.unregister(key.fileobj)
                continue
            current.append((time.monotonic_ns() - st[1]) // 1000)
            st[2] = bytearray()
            try:
                send(index)
            except OSError:
                drops += 1
                alive -= 1
                sel.unregister(key.fileobj)
    phase_seconds.append(time.monotonic() - phase_started[-1])
    result = {"clients": len(socks), "drops": drops, "mismatches": mismatches, "phases": []}
    for latencies, seconds in zip(phases, phase_seconds):
        row = percentiles(latencies)
        row["seconds"] = round(seconds, 3)
        row["rt_per_s"] = round(len(latencies) / seconds, 1) if seconds > 0 else 0.0
        result["phases"].append(row)
    for s in socks:
        s.close()
    out(result)


# ---------------------------------------------------------------------------
# soak: open loop, sequence-numbered lines, every echo accounted

def soak(args):
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    n = args.clients
    interval = 1.0 / args.rate
    rounds = max(1, int(round(args.seconds * args.rate)))
    socks = connect_all((args.host, args.port), n)
    sel = selectors.DefaultSelector()
    for index, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, index)
    seen = [bytearray(rounds) for _ in range(n)]   # seen[c][seq]: echoes of that message (capped at 255)
    partial = [b""] * n
    pending = [None] * n      # bytes not yet taken by the kernel (pplex stopped reading that client)
    closed = [False] * n
    sent = [0] * n
    latencies = array.array("Q")   # microseconds, of every first echo
    delivered = duplicates = malformed = drops = backlogged = 0
    max_lag = 0.0
    # Clients are spread evenly over the period: slot k holds clients k, k+slots, ...
    slots = max(1, min(n, int(interval / 0.002)))
    members = [list(range(k, n, slots)) for k in range(slots)]
    slot_step = interval / slots
    out({"event": "connected", "clients": n})
    t0 = time.monotonic()
    out({"event": "sending", "t": t0, "rounds": rounds, "interval": interval})
    rnd, slot = 0, 0
    next_due = t0
    last_echo = t0
    drain_until = None

    def drop(index):
        nonlocal drops
        if not closed[index]:
            closed[index] = True
            drops += 1
            try:
                sel.unregister(socks[index])
            except (KeyError, ValueError):
                pass

    def write(index, data):
        nonlocal backlogged
        if pending[index] is not None:
            pending[index] += data
            return
        try:
            written = socks[index].send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            drop(index)
            return
        if written < len(data):
            backlogged += 1
            pending[index] = bytearray(data[written:])
            sel.modify(socks[index], selectors.EVENT_READ | selectors.EVENT_WRITE, index)

    while not stop[0]:
        now = time.monotonic()
        while rnd < rounds and now >= next_due:
            max_lag = max(max_lag, now - next_due)
            stamp = time.monotonic_ns()
            for index in members[slot]:
                if not closed[index]:
                    write(index, b"%d %d %d\n" % (index, rnd, stamp))
                    sent[index] += 1
            slot += 1
            if slot == slots:
                slot, rnd = 0, rnd + 1
            next_due = t0 + rnd * interval + slot * slot_step
        if rnd >= rounds and drain_until is None:
            drain_until = now + args.max_drain
        if drain_until is not None:
            owed = sum(sent) - delivered
            if owed <= 0 or now >= drain_until or now - last_echo >= args.drain:
                break
            timeout = 0.05
        else:
            timeout = max(0.0, min(0.05, next_due - now))
        for key, mask in sel.select(timeout):
            index = key.data
            s = key.fileobj
            if mask & selectors.EVENT_WRITE and pending[index] is not None:
                try:
                    written = s.send(pending[index])
                except BlockingIOError:
                    written = 0
                except OSError:
                    drop(index)
                    continue
                del pending[index][:written]
                if not pending[index]:
                    pending[index] = None
                    sel.modify(s, selectors.EVENT_READ, index)
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                drop(index)
                continue
            lines = (partial[index] + data).split(b"\n")
            partial[index] = lines.pop()
            now_ns = time.monotonic_ns()
            mine = seen[index]
            for line in lines:
                try:
                    client, seq, stamp = (int(x) for x in line.split())
                except ValueError:
                    malformed += 1
                    continue
                if client != index or not 0 <= seq < rounds:
                    malformed += 1
                    continue
                count = mine[seq]
                if count:
                    duplicates += 1
                else:
                    delivered += 1
                    latencies.append(max(0, now_ns - stamp) // 1000)
                if count < 255:
                    mine[seq] = count + 1
            last_echo = time.monotonic()
    total_sent = sum(sent)
    result = {
        "clients": n, "rate": args.rate, "seconds": args.seconds, "rounds": rounds,
        "sent": total_sent, "delivered": delivered, "missing": total_sent - delivered,
        "duplicates": duplicates, "malformed": malformed, "drops": drops,
        "backlogged_writes": backlogged, "max_send_lag_ms": round(max_lag * 1000, 1),
        "unsent_after_drop": n * rounds - total_sent, "interrupted": stop[0],
        "latency": percentiles(latencies),
    }
    for s in socks:
        s.close()
    out(result)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.reliability.clients", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ping", help="closed loop, one message in flight per client; SIGUSR1: next phase")
    p.add_argument("--size", type=int, default=32, help="message bytes (at least 16)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    s = sub.add_parser("soak", help="open loop, sequence-numbered lines, every echo accounted")
    s.add_argument("--rate", type=float, default=10.0, help="messages per second per client")
    s.add_argument("--seconds", type=float, default=180.0, help="sending time")
    s.add_argument("--drain", type=float, default=5.0,
                   help="after the last send, stop once no echo came for this long")
    s.add_argument("--max-drain", type=float, default=60.0, help="and at the latest after this long")
    for sp in (p, s):
        sp.add_argument("--addr", required=True, help="HOST:PORT of pplex")
        sp.add_argument("--clients", type=int, required=True)
    args = parser.parse_args(argv)
    args.host, port = args.addr.rsplit(":", 1)
    args.port = int(port)
    procs.raise_nofile()
    try:
        (ping if args.mode == "ping" else soak)(args)
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            sys.stderr.write("out of file descriptors: raise RLIMIT_NOFILE\n")
        sys.stderr.write("clients: %s\n" % exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
