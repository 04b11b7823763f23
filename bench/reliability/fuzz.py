"""Section "fuzz": fuzzed frames against framing_len and framing_line, through pplex and into decode.

Frames come from a seeded mutation generator of our own (hypothesis shrinks
and replays, which 10^5 inputs per run do not need, at about a millisecond
per example). A session is 1..40 frames on one connection: valid frames of
every size up to the limit (empty ones included); in a third of the sessions
1..3 of them are mutated (replaced by random bytes, bytes flipped, a length
prefix shorter than its body, CRLF or NUL lines); another third ends with a
frame only an end can have (a declared length above the limit, up to
2^32 - 1; a cut prefix or body; a line over the limit with or without its
delimiter; a line never ended). Its bytes are cut into writes at random
points: all at once, at 1..6 cuts, or 1..8 bytes per write (a length
prefix or a delimiter split between reads).

Each session is decoded twice:
- **directly**: its writes fed one by one to the plugin's `decode` in this
  process; this is also the oracle: the messages it yields, or FrameError
  (refused), or any other exception (a crash of the plugin);
- **through pplex**: a real client writes the same bytes to a real pplex
  (max_frame_bytes 4096, so oversized frames stay cheap) in front of the Go
  echo worker. A session the oracle accepts must get back exactly the echo of
  its messages, framed, and stay open until the client closes it; a refused
  one must be closed by pplex (counted in /stats `closes.protocol_error`).
Eight bystander clients ping valid frames through the same pplex all along:
none may be closed.
"""
import random
import selectors
import socket
import struct
import time
import types

from pplex.errors import FrameError

from bench import procs
from bench.reliability.common import Section, dict_delta, fmt_int, log_faults, start_go_echo, start_pplex
from plugins.framing_len import LengthFraming
from plugins.framing_line import LineFraming

LIMIT = 4096          # max_frame_bytes of both plugins in this section
MAX_ITEMS = 40        # frames per session
BYSTANDERS = 8
SESSION_TIMEOUT = 10.0
PLUGINS = ("framing_len", "framing_line")


def _length(rng):
    """A body length, small ones most often, the limit itself sometimes."""
    bucket = rng.random()
    if bucket < 0.05:
        return 0
    if bucket < 0.35:
        return rng.randint(1, 16)
    if bucket < 0.70:
        return rng.randint(17, 128)
    if bucket < 0.90:
        return rng.randint(129, 1024)
    if bucket < 0.99:
        return rng.randint(1025, LIMIT)
    return LIMIT


def _flip(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def len_valid(rng):
    n = _length(rng)
    return struct.pack(">I", n) + rng.randbytes(n)


def len_mutant(rng, frame):
    """A frame replaced by random bytes, with bytes flipped (its length prefix too, sometimes), or with
    a length prefix shorter than its body."""
    pick = rng.random()
    if pick < 0.4:
        return rng.randbytes(rng.randint(1, 64))
    if pick < 0.8:
        return _flip(rng, frame)
    # A prefix shorter than its body: the rest of the body is read as the next prefix.
    return struct.pack(">I", max(0, len(frame) - 4 - rng.randint(1, 8))) + frame[4:]


def len_ender(rng):
    """A frame only a session's end can have: a declared length over the limit, a cut prefix or body."""
    pick = rng.random()
    if pick < 0.5:
        declared = rng.choice((LIMIT + 1, rng.randint(LIMIT + 1, 1 << 20), 1 << 31, (1 << 32) - 1,
                               rng.randint(LIMIT + 1, (1 << 32) - 1)))
        return struct.pack(">I", declared) + rng.randbytes(rng.randint(0, 64))
    if pick < 0.75:
        return struct.pack(">I", _length(rng))[:rng.randint(1, 3)]
    n = max(1, _length(rng))
    return struct.pack(">I", n) + rng.randbytes(rng.randint(0, n - 1))


def _text(rng, n):
    return rng.randbytes(n).replace(b"\n", b" ")


def line_valid(rng):
    return _text(rng, _length(rng)) + b"\n"


def line_mutant(rng, line):
    """A line replaced by random bytes (delimiters included), flipped, CRLF-ended, or NULs."""
    pick = rng.random()
    if pick < 0.35:
        return rng.randbytes(rng.randint(1, 64))
    if pick < 0.7:
        return _flip(rng, line)
    if pick < 0.85:
        return line[:-1] + b"\r\n"
    return b"\0" * (len(line) - 1) + b"\n"


def line_ender(rng):
    """A line over the limit (with or without its delimiter), or a line never ended."""
    pick = rng.random()
    if pick < 0.4:
        return _text(rng, rng.randint(LIMIT + 1, 2 * LIMIT)) + b"\n"
    if pick < 0.7:
        return _text(rng, rng.randint(1, LIMIT))
    return _text(rng, rng.randint(LIMIT + 1, 2 * LIMIT))


MAKERS = {"framing_len": (len_valid, len_mutant, len_ender), "framing_line": (line_valid, line_mutant, line_ender)}


def session(seed, plugin, index):
    """(writes, frames) of session `index`: its own Random, so any one can be replayed alone.

    A third of the sessions are valid frames only, a third have 1..3 of their
    frames mutated, a third end with a frame only an end can have.
    """
    rng = random.Random("%d/%s/%d" % (seed, plugin, index))
    valid, mutant, ender = MAKERS[plugin]
    parts = [valid(rng) for _ in range(rng.randint(1, MAX_ITEMS))]
    fate = rng.random()
    if fate < 1 / 3:
        pass
    elif fate < 2 / 3:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(parts))
            parts[i] = mutant(rng, parts[i])
    else:
        parts.append(ender(rng))
    data = b"".join(parts)
    how = rng.random()
    if how < 0.4 or len(data) < 2:
        cuts = []
    elif how < 0.8:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
    else:   # small writes: a prefix, a line, a body split over many reads
        cuts, at = [], 0
        while len(cuts) < 200:
            at += rng.randint(1, 8)
            if at >= len(data):
                break
            cuts.append(at)
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])], len(parts)


def new_framing(plugin):
    return LengthFraming(4, LIMIT) if plugin == "framing_len" else LineFraming("\n", LIMIT)


def decode_directly(framing, writes):
    """The plugin's verdict on one session: (messages, refused, crash or None)."""
    conn = types.SimpleNamespace(framing_state=None)
    messages = []
    try:
        for data in writes:
            messages.extend(framing.decode(conn, data))
    except FrameError:
        return messages, True, None
    except Exception as exc:  # noqa: BLE001 - what the section counts
        return messages, False, "%s: %s" % (type(exc).__name__, exc)
    return messages, False, None


class _Conn:
    __slots__ = ("sock", "writes", "next", "pending", "got", "expect", "refused", "deadline", "bystander", "seq")

    def __init__(self, sock, writes, expect, refused, deadline, bystander=False):
        self.sock = sock
        self.writes = writes
        self.next = 0
        self.pending = b""
        self.got = bytearray()
        self.expect = expect
        self.refused = refused
        self.deadline = deadline
        self.bystander = bystander
        self.seq = 0


class Fuzzer:
    """Runs every session against pplex at `concurrency` connections at once, with the bystanders."""

    def __init__(self, plugin, seed, frames, addr, concurrency):
        self.plugin = plugin
        self.seed = seed
        self.frames_wanted = frames
        self.addr = addr
        self.concurrency = concurrency
        self.framing = new_framing(plugin)
        self.sel = selectors.DefaultSelector()
        self.frames = self.sessions = self.bytes = 0
        self.direct = {"messages": 0, "refused": 0, "crashes": 0, "first_crash": None}
        self.net = {"accepted_ok": 0, "refused_closed": 0, "wrong_echo": 0, "innocent_closed": 0,
                    "not_refused": 0, "timeouts": 0, "first_problem": None}
        self.bystander_rts = 0
        self.bystanders_lost = 0
        self.stopping = False

    # -- bystanders: valid frames, closed loop ------------------------------------
    def _bystander_frame(self, conn):
        conn.seq += 1
        body = b"bystander %d" % conn.seq
        frame = self.framing.encode(body)
        conn.expect = frame
        conn.got = bytearray()
        conn.sock.sendall(frame)

    def _problem(self, what, index):
        if self.net["first_problem"] is None:
            self.net["first_problem"] = "%s (session %d, seed %d)" % (what, index, self.seed)

    def run(self):
        bystanders = []
        for _ in range(BYSTANDERS):
            s = socket.create_connection(self.addr, timeout=5)
            s.setblocking(False)
            conn = _Conn(s, (), b"", False, None, bystander=True)
            self.sel.register(s, selectors.EVENT_READ, conn)
            bystanders.append(conn)
            self._bystander_frame(conn)
        active = {}
        index = 0
        while self.frames < self.frames_wanted or active:
            while len(active) < self.concurrency and self.frames < self.frames_wanted:
                active[index] = self._start(index)
                index += 1
            writing = False
            now = time.monotonic()
            for i, conn in list(active.items()):
                if conn.sock is None:
                    del active[i]
                    continue
                if self._write_some(conn):
                    writing = True
                if conn.sock is not None and now > conn.deadline:
                    if conn.refused:
                        self.net["not_refused"] += 1
                        self._problem("a session the plugin refuses was not closed", i)
                    else:
                        self.net["timeouts"] += 1
                        self._problem("echo incomplete after %.0f s" % SESSION_TIMEOUT, i)
                    self._end(conn)
                if conn.sock is None:
                    del active[i]
            for key, _ in self.sel.select(0 if writing else 0.02):
                conn = key.data
                self._readable(conn)
        # Bystanders stop once their last echo is back (closing with one unread would be a reset).
        self.stopping = True
        deadline = time.monotonic() + SESSION_TIMEOUT
        while any(c.sock is not None for c in bystanders) and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                self._readable(key.data)
        for conn in bystanders:
            if conn.sock is not None:
                self.bystanders_lost += 1
                self._end(conn)
        return self

    def _start(self, index):
        writes, frames = session(self.seed, self.plugin, index)
        self.frames += frames
        self.sessions += 1
        self.bytes += sum(map(len, writes))
        messages, refused, crash = decode_directly(new_framing(self.plugin), writes)
        self.direct["messages"] += len(messages)
        if refused:
            self.direct["refused"] += 1
        if crash:
            self.direct["crashes"] += 1
            if self.direct["first_crash"] is None:
                self.direct["first_crash"] = "%s (session %d, seed %d)" % (crash, index, self.seed)
        expect = b"".join(self.framing.encode(m) for m in messages)
        s = socket.create_connection(self.addr, timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        conn = _Conn(s, writes, expect, refused, time.monotonic() + SESSION_TIMEOUT)
        conn.seq = index
        self.sel.register(s, selectors.EVENT_READ, conn)
        return conn

    def _write_some(self, conn):
        """One write per pass and connection, so pplex may read between them. True while writes remain."""
        if conn.sock is None:
            return False
        if not conn.pending:
            if conn.next >= len(conn.writes):
                if not conn.refused and len(conn.got) >= len(conn.expect):
                    self._finish(conn)   # all written and every echo back (or none owed)
                return False
            conn.pending = conn.writes[conn.next]
            conn.next += 1
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return True
        except OSError:
            self._closed_by_pplex(conn)
            return False
        conn.pending = conn.pending[sent:]
        return bool(conn.pending) or conn.next < len(conn.writes)

    def _readable(self, conn):
        if conn.sock is None:
            return
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed_by_pplex(conn)
            return
        conn.got += data
        if conn.bystander:
            if len(conn.got) >= len(conn.expect):
                if bytes(conn.got) != conn.expect:
                    self.bystanders_lost += 1
                    self._end(conn)
                    return
                self.bystander_rts += 1
                if self.stopping:
                    self._end(conn)
                    return
                try:
                    self._bystander_frame(conn)
                except OSError:
                    self.bystanders_lost += 1
                    self._end(conn)
            return
        # A refused session's echo may stop anywhere (pplex's reads decide how much came before the
        # bad frame); an accepted one's is checked whole in _finish.
        if not conn.refused and len(conn.got) > len(conn.expect):
            self.net["wrong_echo"] += 1
            self._problem("more echoed than sent", conn.seq)
            self._end(conn)

    def _finish(self, conn):
        if bytes(conn.got) == conn.expect:
            self.net["accepted_ok"] += 1
        else:
            self.net["wrong_echo"] += 1
            self._problem("echo differs from the messages sent", conn.seq)
        self._end(conn)

    def _closed_by_pplex(self, conn):
        if conn.bystander:
            self.bystanders_lost += 1
        elif conn.refused:
            self.net["refused_closed"] += 1
        else:
            self.net["innocent_closed"] += 1
            self._problem("a session with valid frames was closed", conn.seq)
        self._end(conn)

    def _end(self, conn):
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.sock = None


def run(ctx, transport):
    worker_port = procs.free_port()
    start_go_echo(ctx.ps, worker_port)
    return [run_plugin(ctx, transport, plugin, worker_port) for plugin in PLUGINS]


def run_plugin(ctx, transport, plugin, worker_port):
    args = ctx.args
    sec = Section("fuzz", "fuzz %s: %s fuzzed frames (seed %d, max_frame_bytes %d), through pplex and into "
                          "decode" % (plugin, fmt_int(args.fuzz_frames), args.fuzz_seed, LIMIT))
    framing = new_framing(plugin)
    settings = {"width": 4} if plugin == "framing_len" else {"delimiter": "\n"}
    settings["max_frame_bytes"] = LIMIT
    pplex = start_pplex(ctx.ps, ctx.tmpdir, transport, [worker_port], plugins={plugin: settings},
                        probe=framing.encode(b"probe"), name="pplex-%s" % plugin)
    pplex.wait_upstreams_ready(1)
    stats_before = pplex.stats()
    errors_before = pplex.errors_total()
    ctx.progress("fuzz %s %s: %s frames" % (transport, plugin, fmt_int(args.fuzz_frames)))
    t0 = time.monotonic()
    fuzzer = Fuzzer(plugin, args.fuzz_seed, args.fuzz_frames, pplex.addr, args.fuzz_concurrency).run()
    took = time.monotonic() - t0
    # Closed sessions linger in pplex for eof_linger before they count: wait for them.
    deadline = time.monotonic() + 15
    while pplex.proc.alive() and time.monotonic() < deadline:
        try:
            if pplex.stats()["connections_open"] == 0:
                break
        except OSError:
            break
        time.sleep(0.05)
    alive = pplex.proc.alive()
    stats = pplex.stats() if alive else stats_before
    contained = pplex.errors_total() - errors_before if alive else 0
    faults_logged, first_fault = log_faults(pplex.proc)
    closes = dict_delta(stats_before["closes"], stats["closes"])
    refused_pplex = closes.get("protocol_error", 0)
    net, direct = fuzzer.net, fuzzer.direct

    sec.figure("frames / sessions / bytes sent",
               "%s / %s / %.1f MB" % (fmt_int(fuzzer.frames), fmt_int(fuzzer.sessions), fuzzer.bytes / 1e6),
               fuzzer.frames)
    sec.figure("crashes in decode (exceptions but FrameError)", str(direct["crashes"]), direct["crashes"], "0",
               direct["crashes"] == 0)
    crashed = (0 if alive else 1) + faults_logged + contained + closes.get("internal_error", 0)
    sec.figure("pplex exited, exceptions logged, contained errors",
               "%s, %d, %d" % ("no" if alive else "YES", faults_logged, contained), crashed, "no, 0, 0",
               crashed == 0)
    innocent = net["innocent_closed"] + fuzzer.bystanders_lost
    sec.figure("innocent clients closed (valid sessions, bystanders)",
               "%d, %d" % (net["innocent_closed"], fuzzer.bystanders_lost), innocent, "0, 0", innocent == 0)
    sec.figure("refused as protocol errors (pplex / direct decode)",
               "%s / %s" % (fmt_int(refused_pplex), fmt_int(direct["refused"])), refused_pplex, "equal",
               refused_pplex == direct["refused"] == net["refused_closed"])
    wrong = net["wrong_echo"] + net["not_refused"] + net["timeouts"]
    sec.figure("wrong echoes, refused sessions left open, timeouts",
               "%d, %d, %d" % (net["wrong_echo"], net["not_refused"], net["timeouts"]), wrong, "0, 0, 0", wrong == 0)
    sec.note("%.1f s; %s messages decoded directly; %s sessions echoed exactly; bystanders %s round trips; "
             "pplex closes %s" % (took, fmt_int(direct["messages"]), fmt_int(net["accepted_ok"]),
                                  fmt_int(fuzzer.bystander_rts), closes or "{}"))
    for what in (direct["first_crash"], net["first_problem"], first_fault):
        if what:
            sec.note("first problem: " + what)
    sec.data = {"plugin": plugin, "seed": args.fuzz_seed, "frames": fuzzer.frames, "sessions": fuzzer.sessions,
                "bytes": fuzzer.bytes, "direct": direct, "network": net, "bystander_round_trips": fuzzer.bystander_rts,
                "bystanders_lost": fuzzer.bystanders_lost, "closes": closes, "contained_errors": contained,
                "log_faults": faults_logged, "seconds": round(took, 2)}
    ctx.ps.stop(pplex.proc)
    return sec
