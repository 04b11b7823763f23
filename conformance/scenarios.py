"""The scenarios, in report order. Each returns `Passed` or raises `Fail` / `Skip`.

`needs` says what the scenario needs of the worker under test, as found by
the preflight: "ready" (it enters rotation), "stable" (it stays there, idle
and under traffic), "answers" (it answers messages), "echo" (it returns
payloads unchanged). When a need is not met the runner reports SKIP, naming
the scenario that holds the root cause, so a broken worker fails exactly the
scenarios about what it breaks.

Subjects: "worker" (the verdict is about the worker under test), "pplex"
(checked with the in-process helper worker, because the worker under test
cannot be made to do it), "worker+pplex" (both).

Reasons start with "your worker" when the worker must change, and with
"pplex:" when pplex misbehaved.
"""
import random
import re
import statistics
import time

from conformance.context import (
    ALIVE_TIMEOUT, READY_TIMEOUT, ROTATION_WAIT, Fail, Passed, Skip, describe_bytes, left_rotation, settle,
    step, token, traffic_mark, wait_ready)
from conformance.preflight import watch_heartbeats
from conformance.procs import StartError
from conformance.workers import GARBAGE_SIZES, UNKNOWN_COMMAND, broadcast_command

MiB = 1024 * 1024
SCENARIOS = []


class Scenario:
    def __init__(self, name, run, needs, summary):
        self.name = name
        self.run = run
        self.needs = needs
        self.summary = summary


def scenario(name, needs=(), summary=""):
    def register(run):
        SCENARIOS.append(Scenario(name, run, tuple(needs), summary))
        return run
    return register


def names():
    return [s.name for s in SCENARIOS]


def held_out(ctx, port, ready_timeout):
    """pplex on one worker that must stay out of rotation, one client with a message for it, and the
    wait for two failed ready probes: (pplex, pool, client, the second failure or None, seconds waited)."""
    pplex = ctx.pplex([port], ready_timeout=ready_timeout)
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "waiting")
    client.send(b"held-" + token())
    started = time.monotonic()
    second = pplex.wait_event("u1", "not_ready", count=2, timeout=2 * ready_timeout + 3)
    elapsed = time.monotonic() - started
    pool.pump(0.01)
    return pplex, pool, client, second, elapsed


# -- wording shared by several scenarios ------------------------------------------------

def ready_failure(profile):
    detail = profile.ready_detail or ""
    call = profile.ready_call or {}
    call_error = call.get("error") or ""
    if "DEADLINE_EXCEEDED" in detail or call_error.startswith("DEADLINE_EXCEEDED"):
        return (f"ready was never answered within ready_timeout={READY_TIMEOUT:g}s: your ready RPC must return "
                f"promptly (answer ready=false while the worker cannot serve yet)")
    if "ready=false" in detail or call.get("ready") is False:
        return (f"your worker answered ready=false to every probe for {ROTATION_WAIT:g} s: answer ready=true "
                f"once it can serve (pplex keeps a worker out of rotation until then)")
    if "UNIMPLEMENTED" in detail:
        return ("your worker does not implement the ready RPC (UNIMPLEMENTED): implement "
                "UpstreamPeerService.ready from proto/upstream.proto")
    if "UNAVAILABLE" in detail:
        return (f"pplex could not reach your worker ({detail}): it must serve plaintext gRPC (h2c) on "
                f"127.0.0.1:{{port}}")
    return (f"your worker's ready RPC failed ({detail}): ready must answer ReadyResult{{ready: true}} within "
            f"ready_timeout={READY_TIMEOUT:g}s")


def live_failure(detail, alive_timeout):
    if "live=false" in detail:
        return ("your worker answered live=false: pplex takes a worker out of rotation at once for that; "
                "answer live=true while the worker can serve")
    if "no live answer" in detail:
        return (f"your worker did not answer a heartbeat within {1.5 * alive_timeout:g} s "
                f"(1.5 x alive_timeout={alive_timeout:g}s): answer each Empty on the live stream at once")
    if "ended the live stream" in detail:
        return ("your worker ended the live stream while pplex kept it open: keep answering heartbeats until "
                "pplex half-closes the stream")
    if "UNIMPLEMENTED" in detail:
        return "your worker does not implement the live RPC (UNIMPLEMENTED): implement UpstreamPeerService.live"
    if "data stream closed" in detail:
        return (f"your worker ended the data stream ({detail}): keep it open for as long as pplex does "
                f"(see stream_closed)")
    return f"your worker left rotation ({detail})"


def stream_close_failure(detail, after=None):
    what = detail.split("data stream closed: ", 1)[-1]
    when = f" after {after} message(s)" if after else ""
    return (f"your worker ended the data stream ({what}){when}: keep bidirectionalStreaming open for as long as "
            f"pplex keeps it (pplex half-closes it when it is done); every close loses the messages in flight")


def ms(seconds):
    """Milliseconds for a figure; log-based times have a resolution of 1 ms."""
    if seconds < 0.001:
        return "<1 ms"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def check_clients_open(pool, who="pplex"):
    closed = pool.closed_clients()
    if closed:
        raise Fail(f"{who}: closed {len(closed)} client connection(s) ({closed[0].name}: {closed[0].closed}); "
                   f"a worker problem must never close clients")


def check_stayed(pplex, since, alive_timeout=ALIVE_TIMEOUT, upstream=None):
    left = left_rotation(pplex, since, upstream)
    if left:
        raise Fail(live_failure(left[0].detail, alive_timeout), details={"left_rotation": left[0].detail})


def check_drops(stats_before, stats_after):
    old = stats_before.get("drops", {})
    new = stats_after.get("drops", {})
    unknown = new.get("unknown_uuid", 0) - old.get("unknown_uuid", 0)
    bad = new.get("bad_worker_message", 0) - old.get("bad_worker_message", 0)
    if unknown:
        raise Fail(f"your worker sent {unknown} repl(ies) to UUIDs pplex did not give it (drops.unknown_uuid): "
                   f"reply to the client_uuid of an input, while that client is connected")
    if bad:
        raise Fail(f"your worker sent {bad} message(s) pplex cannot deliver (drops.bad_worker_message): set the "
                   f"target oneof: client_uuid, broadcast (ALL, ACTIVE or NOT_ACTIVE) or group")


# -- ready ---------------------------------------------------------------------------

@scenario("ready_probe", summary="the worker answers ready=true promptly and pplex puts it in rotation")
def ready_probe(ctx):
    profile = ctx.profile
    if profile.start_error:
        raise Fail(profile.start_error)
    if not profile.ready_ok:
        raise Fail(ready_failure(profile), details={"pplex_last_error": profile.ready_detail,
                                                    "ready_call": profile.ready_call})
    call = profile.ready_call or {}
    answered = (f"ready={'true' if call.get('ready') else 'false'} in {ms(call['seconds'])}"
                if call.get("answered") else f"our ready call: {call.get('error')}")
    return Passed(f"{answered}; in rotation {ms(profile.rotation_seconds)} after pplex started",
                  details={"ready_call": call})


SLOW_READY_TIMEOUT = 0.5
SLOW_READY_SLEEP_MS = 1500


@scenario("slow_ready", needs=("ready",),
          summary="a worker whose ready answers after ready_timeout stays out of rotation")
def slow_ready(ctx):
    note = ""
    if ctx.command.can_slow_ready:
        instance = ctx.extra_worker(lambda port: ctx.command.slow_argv(port, SLOW_READY_SLEEP_MS), "slow-worker")
        port, subject = instance.port, "worker+pplex"
    else:
        port, subject = ctx.helper(ready=SLOW_READY_SLEEP_MS / 1000).port, "pplex"
        note = ("the worker command has no {ready_sleep} placeholder and no --slow-ready-cmd was given, "
                "so the slow worker is the helper worker")
    pplex, pool, client, second, elapsed = held_out(ctx, port, SLOW_READY_TIMEOUT)
    if pplex.events_of("u1", "ready"):
        if subject == "pplex":
            raise Fail(f"pplex: put a worker whose ready answers after {SLOW_READY_SLEEP_MS} ms in rotation, "
                       f"with ready_timeout={SLOW_READY_TIMEOUT:g}s", subject=subject)
        raise Fail(f"your worker entered rotation although started with ready_sleep {SLOW_READY_SLEEP_MS} ms and "
                   f"ready_timeout={SLOW_READY_TIMEOUT:g}s: the {{ready_sleep}} option had no effect on ready",
                   subject=subject)
    if second is None:
        raise Fail(f"pplex: did not report two failed ready probes within {elapsed:.1f} s "
                   f"(ready_timeout={SLOW_READY_TIMEOUT:g}s)", subject=subject)
    info = pplex.upstream("u1")
    if info["messages_routed"] or client.frames:
        raise Fail(f"pplex: routed {info['messages_routed']} message(s) to a worker that is not ready",
                   subject=subject)
    check_clients_open(pool)
    detail = second.detail
    return Passed(f"2 ready probes failed ({detail}) at ready_timeout {SLOW_READY_TIMEOUT:g}s; out of rotation "
                  f"for {elapsed:.1f} s, the waiting client's message held", subject=subject, note=note,
                  details={"not_ready": [e.detail for e in pplex.events_of("u1", "not_ready")]})


# -- live ----------------------------------------------------------------------------

LIVE_ALIVE = 0.25
LIVE_WATCH = 1.6


@scenario("live_heartbeats", needs=("ready",),
          summary="over 6 heartbeat intervals the worker answers live=true and stays in rotation")
def live_heartbeats(ctx):
    instance = ctx.worker(0)
    pplex = ctx.pplex([instance.port], alive_timeout=LIVE_ALIVE)
    entered = wait_ready(pplex)
    mark = pplex.mark()
    count, left, rtts = watch_heartbeats(pplex, "u1", LIVE_WATCH, mark, answers=5)
    if left is not None:
        raise Fail(live_failure(left.detail, LIVE_ALIVE)
                   + f" (pplex took it out of rotation {ms(max(0.0, left.wall - entered.wall))} after it entered)",
                   details={"left_rotation": left.detail, "heartbeats": count})
    info = pplex.upstream("u1")
    if info["state"] != "ready":
        raise Fail(f"pplex: the worker is in state {info['state']} though it never left rotation")
    expected = int(LIVE_WATCH / LIVE_ALIVE)
    if count < 5:
        raise Fail(f"your worker answered {count} heartbeats in {LIVE_WATCH:g} s; at alive_timeout={LIVE_ALIVE:g}s "
                   f"pplex sent about {expected}: answer each heartbeat at once")
    return Passed(f"{count} heartbeats in {LIVE_WATCH:g} s (alive_timeout {LIVE_ALIVE:g}s), RTT median "
                  f"{statistics.median(rtts) * 1000:.2f} ms, stayed ready", details={"rtts": rtts})


# -- traffic -------------------------------------------------------------------------

ROUND_TRIP_SENDERS = 100
ROUND_TRIP_SILENT = 5
ROUND_TRIP_EACH = 5


@scenario("round_trip_uuid_integrity", needs=("stable", "answers"),
          summary="100 concurrent clients: replies reach only their own client; silent clients get only broadcasts")
def round_trip_uuid_integrity(ctx):
    pplex, pool, since = ctx.serving()
    senders = pool.connect(ROUND_TRIP_SENDERS, "s")
    silent = pool.connect(ROUND_TRIP_SILENT, "silent")
    echo = ctx.profile.echo == "yes"
    total = ROUND_TRIP_SENDERS * ROUND_TRIP_EACH
    mark = traffic_mark(pplex, pool)
    tag = token()
    started = time.monotonic()
    for k in range(ROUND_TRIP_EACH):
        for client in senders:
            client.send(b"%s-%d-%s" % (client.name.encode(), k, tag))
    done = (lambda: all(len(c.frames) >= ROUND_TRIP_EACH for c in senders)) if echo else None
    stats, timed_out = settle(pplex, pool, mark, expect_in=total, quiet=0.3, timeout=15.0, done=done)
    if echo and not timed_out:
        stats, _ = settle(pplex, pool, mark, expect_in=total, quiet=0.1, timeout=2.0)
    before = mark[0]
    check_clients_open(pool)
    check_stayed(pplex, since)
    got_in = stats["messages_in"] - before["messages_in"]
    if got_in != total:
        raise Fail(f"pplex: read {got_in} of the {total} messages the clients sent")
    check_drops(before, stats)
    silent_frames = [c.frames for c in silent]
    broadcasts = stats["broadcasts"] - before["broadcasts"]
    if any(frames != silent_frames[0] for frames in silent_frames):
        raise Fail("pplex: silent clients received different messages: an output addressed to one client "
                   "reached a client that never sent anything")
    if len(silent_frames[0]) > broadcasts:
        raise Fail(f"pplex: each silent client received {len(silent_frames[0])} messages, but only {broadcasts} "
                   f"broadcasts went out: a direct reply reached a client that never sent anything")
    received = sum(len(c.frames) for c in senders)
    times = [t for c in senders for t in c.times]
    if not received:
        raise Fail(f"your worker answered none of the {total} messages within 15 s")
    elapsed = max(times) - started
    rate = total / elapsed if elapsed > 0 else float("inf")
    details = {"messages": total, "frames_to_senders": received, "frames_per_silent_client": len(silent_frames[0]),
               "broadcasts": broadcasts, "seconds": round(elapsed, 4)}
    if echo:
        for client in senders:
            if client.frames != client.sent:
                foreign = [f for f in client.frames if f not in client.sent]
                if foreign:
                    raise Fail(f"client {client.name} received {describe_bytes(foreign[0])}, another client's "
                               f"payload: reply to the client_uuid of the input", details=details)
                if len(client.frames) < len(client.sent):
                    missing = total - sum(min(len(c.frames), ROUND_TRIP_EACH) for c in senders)
                    raise Fail(f"your worker did not answer {missing} of the {total} messages within 15 s "
                               f"(client {client.name} got {len(client.frames)} of {len(client.sent)})",
                               details=details)
                raise Fail(f"client {client.name} got its payloads out of order or more than once: an echo "
                           f"worker must answer each stream's messages once, in order", details=details)
        if silent_frames[0]:
            raise Fail(f"silent clients received {len(silent_frames[0])} message(s) from an echo worker",
                       details=details)
        return Passed(f"{rate:,.0f} round trips/s; {total} messages from {ROUND_TRIP_SENDERS} clients, each got "
                      f"exactly its own payloads in order; {ROUND_TRIP_SILENT} silent clients got nothing",
                      details=details)
    per_silent = len(silent_frames[0])
    outputs = f"{received} frames to senders, {broadcasts} broadcasts"
    if per_silent == broadcasts and all(len(c.frames) >= per_silent for c in senders):
        direct = received - ROUND_TRIP_SENDERS * per_silent
        outputs = f"{direct} direct replies + {broadcasts} ALL broadcasts"
        details["direct_replies"] = direct
    return Passed(f"{rate:,.0f} messages/s; {total} messages from {ROUND_TRIP_SENDERS} clients -> {outputs}; "
                  f"silent clients got only broadcasts", details=details)


def echo_all(ctx, pplex, pool, client, payloads, timeout=15.0):
    """Send payloads from one client, wait for as many frames; Fail on the first that is not its payload."""
    mark = traffic_mark(pplex, pool)
    for payload in payloads:
        client.send(payload)
    settle(pplex, pool, mark, expect_in=len(payloads), quiet=0.05, timeout=timeout,
           done=lambda: len(client.frames) >= len(payloads))
    for index, payload in enumerate(payloads):
        got = client.frames[index] if index < len(client.frames) else None
        if got is None:
            raise Fail(f"your worker answered {len(client.frames)} of {len(payloads)} messages within {timeout:g} s "
                       f"(first unanswered: message #{index + 1}, {describe_bytes(payload)})")
        if got != payload:
            raise Fail(f"message #{index + 1} ({describe_bytes(payload)}) came back as {describe_bytes(got)}: an "
                       f"echo worker must return every payload byte for byte (pplex passes payloads through as "
                       f"they are)")
    if len(client.frames) > len(payloads):
        raise Fail(f"{len(client.frames) - len(payloads)} more message(s) than were sent came back: "
                   f"{describe_bytes(client.frames[len(payloads)])}")


@scenario("binary_payloads", needs=("stable", "echo"),
          summary="every byte value 0..255 (and an empty message) comes back unchanged (echo workers)")
def binary_payloads(ctx):
    pplex, pool, since = ctx.serving()
    client, = pool.connect(1, "binary")
    payloads = ([bytes([value]) for value in range(256)]
                + [bytes(range(256)), bytes(range(255, -1, -1)), bytes(range(256)) * 64, b""])
    echo_all(ctx, pplex, pool, client, payloads)
    check_stayed(pplex, since)
    check_clients_open(pool)
    return Passed(f"{len(payloads)} messages echoed byte for byte: each byte value alone, all 256 in order and "
                  f"reversed, 16 KiB of them, and an empty message")


@scenario("payload_sizes", needs=("stable", "echo"),
          summary="1 B, 64 KiB and 1 MiB payloads come back unchanged (echo workers; max_frame_bytes 4 MiB)")
def payload_sizes(ctx):
    instance = ctx.worker(0)
    pplex = ctx.pplex([instance.port], framing={"max_frame_bytes": 4 * MiB})
    wait_ready(pplex)
    since = pplex.mark()
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "sizes")
    timings = []
    rng = random.Random(5)
    for size, label in ((1, "1 B"), (64 * 1024, "64 KiB"), (MiB, "1 MiB")):
        payload = rng.randbytes(size)
        index = len(client.sent)
        started = time.monotonic()
        client.send(payload)
        if not pool.wait(lambda: len(client.frames) > index, 15.0):
            raise Fail(f"your worker did not answer a {label} message within 15 s (grpc-go's default max "
                       f"receive size is 4 MiB; pplex sends up to 64 MiB)")
        got = client.frames[index]
        if got != payload:
            where = next((i for i, (a, b) in enumerate(zip(got, payload)) if a != b), min(len(got), len(payload)))
            raise Fail(f"a {label} payload came back as {len(got)} B, different from byte {where} on: an echo "
                       f"worker must return it unchanged")
        timings.append(f"{label} in {ms(client.times[index] - started)}")
    check_stayed(pplex, since)
    check_clients_open(pool)
    return Passed(", ".join(timings) + " (round trip, echoed intact)")


# -- broadcasts ------------------------------------------------------------------------

BROADCAST_WINDOW = 0.5


def broadcast_layout(ctx, port, kind, who):
    """Two senders, two silent clients, one lapsed client; three messages. Returns (verified steps, layout)."""
    pplex = ctx.pplex([port], active_window=BROADCAST_WINDOW)
    wait_ready(pplex, who=who)
    since = pplex.mark()
    pool = ctx.pool(pplex)
    first, second = pool.connect(2, "sender")
    silent = pool.connect(2, "silent")
    lapsed, = pool.connect(1, "lapsed")
    everyone = [first, second, *silent, lapsed]
    tag = token()

    def activity():
        active = {c["remote"].rsplit(":", 1)[-1]: c["active"] for c in pplex.connections()}
        return active

    def send(sender, payload):
        before = activity()
        result = step(pplex, pool, sender, payload)
        active = [c for c in everyone if before.get(str(c.local_port)) or c is sender]
        idle = [c for c in everyone if c not in active]
        return result, result.classify(active, idle), active, idle

    steps = [send(lapsed, b"lapse-" + tag)]
    if not pool.wait(lambda: activity().get(str(lapsed.local_port)) is False, 5.0):
        raise Fail(f"pplex: a client silent for 5 s is still active with active_window={BROADCAST_WINDOW:g}s")
    steps.append(send(second, b"hello-" + tag))
    steps.append(send(first, broadcast_command(kind.lower())))
    mark = traffic_mark(pplex, pool)
    stats, _ = settle(pplex, pool, mark, expect_in=0, quiet=0.1, timeout=3.0)
    extra = pool.total_frames() - mark[1]
    check_clients_open(pool)
    check_stayed(pplex, since)
    for result, label, active, idle in steps:
        if label == "misdelivered":
            names_ = sorted(c.name for c in result.recipients())
            raise Fail(f"pplex: a broadcast after {describe_bytes(result.payload)} reached {names_}, which is no "
                       f"broadcast set (active: {sorted(c.name for c in active)}, not active: "
                       f"{sorted(c.name for c in idle)})")
    if extra:
        raise Fail(f"pplex: {extra} more frame(s) arrived after the outputs were counted")
    verified = [(result, active, idle) for result, label, active, idle in steps if label == kind]
    return verified, {"clients": len(everyone)}


def broadcast_scenario(ctx, kind):
    profile = ctx.profile
    note = ""
    if kind in profile.broadcasts:
        verified, layout = broadcast_layout(ctx, ctx.worker(0).port, kind, "your worker")
        if verified:
            return Passed(broadcast_figure(kind, verified, layout), subject="worker")
        ctx.end_scope()
        note = f"your worker broadcast {kind} in the preflight but not in this scenario's run"
    else:
        note = (f"your worker sent no {kind} broadcast (a worker may answer the payload "
                f"'pplex-conformance:broadcast:{kind.lower()}' with one, to have it checked)")
    verified, layout = broadcast_layout(ctx, ctx.helper().port, kind, "the helper worker")
    if not verified:
        raise Fail(f"pplex: the helper worker's {kind} broadcast did not reach exactly the {kind} clients",
                   subject="pplex")
    return Passed("pplex check (helper worker): " + broadcast_figure(kind, verified, layout), subject="pplex",
                  note=note)


def broadcast_figure(kind, verified, layout):
    result, active, idle = verified[0]
    if kind == "ALL":
        return (f"{len(verified)} ALL broadcast(s), each reached all {layout['clients']} clients exactly once "
                f"(senders, silent and lapsed)")
    if kind == "ACTIVE":
        return (f"ACTIVE reached exactly the {len(active)} active clients once, not the {len(idle)} silent or "
                f"lapsed ones")
    return (f"NOT_ACTIVE reached exactly the {len(idle)} silent and lapsed clients (quiet > active_window "
            f"{BROADCAST_WINDOW:g}s) once, not the {len(active)} active ones")


@scenario("broadcast_all", needs=("stable",),
          summary="each ALL broadcast reaches every client (senders and silent ones) exactly once")
def broadcast_all(ctx):
    return broadcast_scenario(ctx, "ALL")


@scenario("broadcast_active", needs=("stable",),
          summary="an ACTIVE broadcast reaches exactly the clients that sent within active_window")
def broadcast_active(ctx):
    return broadcast_scenario(ctx, "ACTIVE")


@scenario("broadcast_not_active", needs=("stable",),
          summary="a NOT_ACTIVE broadcast reaches exactly the silent and lapsed clients")
def broadcast_not_active(ctx):
    return broadcast_scenario(ctx, "NOT_ACTIVE")


# -- pplex robustness ------------------------------------------------------------------

@scenario("unknown_uuid", summary="a reply to an unknown UUID is counted and dropped; pplex keeps serving")
def unknown_uuid(ctx):
    helper = ctx.helper()
    pplex = ctx.pplex([helper.port])
    wait_ready(pplex, who="the helper worker")
    since = pplex.mark()
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "asker")
    silent, = pool.connect(1, "silent")
    before = pplex.stats()
    result = step(pplex, pool, client, UNKNOWN_COMMAND)
    after = pplex.stats()
    dropped = after["drops"].get("unknown_uuid", 0) - before["drops"].get("unknown_uuid", 0)
    if result.frames[client] != [b"done"] or silent.frames:
        raise Fail(f"pplex: after a reply to an unknown UUID the client got "
                   f"{[describe_bytes(f) for f in result.frames[client]]} and a silent client "
                   f"{len(silent.frames)} message(s), expected only the worker's next reply", subject="pplex")
    if dropped != 1:
        raise Fail(f"pplex: counted {dropped} unknown_uuid drops in /stats for 1 reply to an unknown UUID",
                   subject="pplex")
    status, text = pplex.admin("GET", "/metrics")
    match = re.search(r'pplex_drops(?:_total)?\{[^}]*reason="unknown_uuid"[^}]*\} ([0-9.e+]+)', text if status == 200 else "")
    if not match or float(match.group(1)) < 1:
        raise Fail("pplex: /metrics has no pplex_drops{reason=\"unknown_uuid\"} count", subject="pplex")
    after_payload = b"after-" + token()
    later = step(pplex, pool, client, after_payload)
    if later.frames[client] != [after_payload]:
        raise Fail("pplex: stopped delivering replies after a reply to an unknown UUID", subject="pplex")
    check_stayed(pplex, since)
    check_clients_open(pool)
    if not pplex.alive():
        raise Fail("pplex: died after a reply to an unknown UUID", subject="pplex")
    return Passed("pplex check (helper worker): 1 reply to an unknown UUID dropped and counted (/stats "
                  "drops.unknown_uuid, /metrics); the next reply delivered", subject="pplex",
                  note="the worker under test cannot be made to reply to an unknown UUID")


@scenario("worker_restart", needs=("stable", "answers"),
          summary="SIGKILL the worker, start it again on the same port: traffic resumes, pplex not restarted")
def worker_restart(ctx):
    instance = ctx.worker(0)
    pplex = ctx.pplex([instance.port])
    wait_ready(pplex)
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "steady")
    silent, = pool.connect(1, "silent")
    before = step(pplex, pool, client, b"before-" + token())
    if not before.output_count():
        raise Fail("your worker did not answer a message before the restart (within 2 s)")
    mark = pplex.mark()
    pid = pplex.proc.pid
    killed = time.time()
    killed_mono = time.monotonic()
    instance.kill()
    left = pplex.wait_event("u1", "left", since=mark, timeout=3.0)
    if left is None:
        raise Fail("pplex: did not notice within 3 s that the worker was killed (its data stream broke)")
    noticed = max(0.0, left.wall - killed)
    base = len(client.frames)
    client.send(b"during-" + token())
    restart_started = time.monotonic()
    try:
        instance.start()
    except StartError as error:
        raise Fail(f"after SIGKILL, your worker could not start again on the same port (it must be able to "
                   f"rebind its port at once, e.g. with SO_REUSEADDR): {error}")
    restart_took = time.monotonic() - restart_started
    if pplex.wait_event("u1", "ready", since=mark, timeout=10.0) is None:
        info = pplex.upstream("u1")
        raise Fail(f"the restarted worker did not re-enter rotation within 10 s (pplex: {info['last_error']})")
    if not pool.wait(lambda: len(client.frames) > base, 10.0):
        raise Fail("no output reached the client within 10 s of the worker's restart (its message was held "
                   "while no worker was ready, and must go out once one is)")
    recovered = client.times[base] - killed_mono
    check_clients_open(pool)
    if not pplex.alive() or pplex.proc.pid != pid:
        raise Fail("pplex: did not survive its worker's restart")
    return Passed(f"traffic resumed {recovered:.2f} s after SIGKILL (pplex noticed in {ms(noticed)}, restart took "
                  f"{restart_took:.2f} s); clients stayed connected",
                  subject="worker+pplex", details={"recovered_seconds": round(recovered, 4),
                                                   "noticed_seconds": round(noticed, 4)})


ROBIN_CLIENTS = 20
ROBIN_EACH = 10


@scenario("round_robin_share", needs=("stable",),
          summary="with 2 instances, each gets within 10% of an even share of the messages")
def round_robin_share(ctx):
    count = len(ctx.workers)
    if count < 2:
        raise Skip("needs 2 or more instances (--instances 2)")
    instances = [ctx.worker(i) for i in range(count)]
    pplex = ctx.pplex([w.port for w in instances])
    for i in range(count):
        wait_ready(pplex, f"u{i + 1}", who=f"instance {i + 1} of your worker")
    since = pplex.mark()
    pool = ctx.pool(pplex)
    clients = pool.connect(ROBIN_CLIENTS, "c")
    routed_before = {u["id"]: u["messages_routed"] for u in pplex.upstreams()}
    total = ROBIN_CLIENTS * ROBIN_EACH
    mark = traffic_mark(pplex, pool)
    tag = token()
    for k in range(ROBIN_EACH):
        for client in clients:
            client.send(b"%s-%d-%s" % (client.name.encode(), k, tag))
    routed = {}

    def all_routed():
        routed.clear()
        routed.update({u["id"]: u["messages_routed"] - routed_before.get(u["id"], 0) for u in pplex.upstreams()})
        return sum(routed.values()) >= total

    if not pool.wait(all_routed, 10.0):
        raise Fail(f"pplex: routed {sum(routed.values())} of {total} messages within 10 s")
    settle(pplex, pool, mark, expect_in=total, quiet=0.1, timeout=5.0)
    check_stayed(pplex, since)
    check_clients_open(pool)
    even = total / count
    split = "/".join(str(routed[f"u{i + 1}"]) for i in range(count))
    shares = " / ".join(f"{100 * routed[f'u{i + 1}'] / total:.1f}%" for i in range(count))
    worst = max(abs(n - even) for n in routed.values())
    if worst > 0.1 * even:
        raise Fail(f"pplex: split {total} messages {split} ({shares}) over {count} ready workers: more than 10% "
                   f"from even", details={"routed": routed})
    return Passed(f"{split} ({shares}) of {total} messages over {count} instances", subject="worker+pplex",
                  details={"routed": routed})


# -- misbehaviours: pplex must survive them and report them -------------------------------

def stream_close_handling(ctx, port, who):
    """A worker that ends its data stream: pplex notices, leaves rotation, reconnects; clients stay."""
    pplex = ctx.pplex([port])
    wait_ready(pplex, who=who)
    mark = pplex.mark()
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "sender")
    silent, = pool.connect(1, "silent")
    stats_before = pplex.stats()
    sent = time.time()
    client.send(b"first-" + token())
    left = pplex.wait_event("u1", "left", since=mark, timeout=3.0)
    if left is None:
        return None
    back = pplex.wait_event("u1", "ready", since=mark, timeout=5.0)
    if back is None:
        raise Fail(f"pplex: did not put {who} back in rotation within 5 s after its data stream ended "
                   f"({pplex.upstream('u1')['last_error']})")
    base = len(client.frames)
    client.send(b"second-" + token())
    resumed = pool.wait(lambda: len(client.frames) > base, 3.0)
    pool.pump(0.01)
    check_clients_open(pool)
    closed = pplex.stats()["connections_closed"] - stats_before["connections_closed"]
    if closed:
        raise Fail(f"pplex: closed {closed} client(s) when {who} ended its data stream")
    if not resumed:
        raise Fail(f"pplex: a message sent after {who} was back in rotation got no output within 3 s")
    return {"detail": left.detail, "noticed": max(0.0, left.wall - sent), "back": max(0.0, back.wall - left.wall)}


def describe_handling(handled):
    return (f"pplex noticed in {ms(handled['noticed'])}, took it out of rotation, had it back in "
            f"{ms(handled['back'])}, and no client was disconnected")


@scenario("stream_closed", needs=("ready",),
          summary="the worker keeps its data stream open; one that closes it is taken out and reconnected")
def stream_closed(ctx):
    profile = ctx.profile
    if profile.idle_ok is False:
        raise Skip(f"not run: your worker does not stay in rotation (see live_heartbeats): {profile.idle_detail}")
    detail = profile.traffic_detail or ""
    if profile.traffic_ok is False and "data stream closed" in detail:
        handled = stream_close_handling(ctx, ctx.worker(0).port, "your worker")
        text = stream_close_failure(detail, profile.traffic_messages)
        if handled is None:
            raise Fail(text + "; in a second run it did not, and pplex saw nothing", subject="worker")
        raise Fail(text + "; " + describe_handling(handled), subject="worker+pplex", details=handled)
    if profile.traffic_ok is False:
        raise Skip(f"not run: your worker leaves rotation under traffic (see live_heartbeats): {detail}")
    pplex, pool, since = ctx.serving()
    clients = pool.connect(20, "c")
    mark = traffic_mark(pplex, pool)
    for k in range(5):
        for client in clients:
            client.send(b"%s-%d" % (client.name.encode(), k))
    settle(pplex, pool, mark, expect_in=100, quiet=0.2, timeout=10.0)
    left = left_rotation(pplex, since)
    if left:
        if "data stream closed" in left[0].detail:
            raise Fail(stream_close_failure(left[0].detail), subject="worker")
        raise Fail(live_failure(left[0].detail, ALIVE_TIMEOUT), subject="worker")
    check_clients_open(pool)
    ctx.end_scope()
    handled = stream_close_handling(ctx, ctx.helper(close_after=1).port, "the helper worker")
    if handled is None:
        raise Fail("pplex: did not notice within 3 s that the helper worker ended its data stream",
                   subject="pplex")
    return Passed(f"your worker kept its stream open over 100 messages; pplex check (helper that closes it): "
                  f"{describe_handling(handled)}", subject="worker+pplex", details=handled)


def never_ready_handling(ctx, port, ready_timeout, who):
    """A worker that never becomes ready: pplex keeps it out, holds messages, keeps clients, says why."""
    pplex, pool, client, second, elapsed = held_out(ctx, port, ready_timeout)
    if pplex.events_of("u1", "ready"):
        raise Fail(f"pplex: put {who} in rotation though ready never said true")
    if second is None:
        raise Fail(f"pplex: did not report two failed ready probes of {who} within {elapsed:.1f} s")
    info = pplex.upstream("u1")
    if info["state"] not in ("connecting", "unready") or info["messages_routed"] or client.frames:
        raise Fail(f"pplex: {who} is in state {info['state']} with {info['messages_routed']} message(s) routed, "
                   f"though it was never ready")
    check_clients_open(pool)
    return {"probes_failed": len(pplex.events_of("u1", "not_ready")), "seconds": round(elapsed, 3),
            "state": info["state"], "last_error": info["last_error"]}


def describe_never_ready(handled):
    return (f"pplex kept it out of rotation over {handled['probes_failed']} probes ({handled['seconds']:.1f} s), "
            f"held the waiting client's message, kept the client connected, and reports state "
            f"{handled['state']}, last_error '{handled['last_error']}'")


@scenario("never_ready", summary="a worker that is never ready is never put in rotation, and pplex says why")
def never_ready(ctx):
    profile = ctx.profile
    if profile.start_error:
        raise Skip("not run: your worker did not start (see ready_probe)")
    if not profile.ready_ok:
        handled = never_ready_handling(ctx, ctx.worker(0).port, READY_TIMEOUT, "your worker")
        raise Fail(ready_failure(profile) + "; " + describe_never_ready(handled), subject="worker+pplex",
                   details=handled)
    helper = ctx.helper(ready="never")
    handled = never_ready_handling(ctx, helper.port, 0.3, "the helper worker")
    call = profile.ready_call or {}
    yours = f"your worker answered ready in {ms(call['seconds'])}" if call.get("answered") else "your worker is ready"
    return Passed(f"{yours}; pplex check (helper whose ready never answers): {describe_never_ready(handled)}",
                  subject="worker+pplex", details=handled)


LIVE_FALSE_ALIVE = 0.25


def live_false_handling(ctx, port, who):
    pplex = ctx.pplex([port], alive_timeout=LIVE_FALSE_ALIVE, ready_timeout=0.5)
    pool = ctx.pool(pplex)
    client, = pool.connect(1, "waiting")
    entered = wait_ready(pplex, who=who)
    left = pplex.wait_event("u1", "left", timeout=3.0)
    if left is None:
        return None
    again = pplex.wait_event("u1", "ready", count=2, timeout=5.0)
    if again is None:
        raise Fail(f"pplex: did not probe {who} again after ejecting it (no second ready within 5 s)")
    pool.pump(0.01)
    check_clients_open(pool)
    return {"detail": left.detail, "ejected_after": round(max(0.0, left.wall - entered.wall), 4)}


@scenario("live_false", needs=("ready",),
          summary="a worker answering live=false is ejected at once, then probed again")
def live_false(ctx):
    profile = ctx.profile
    # The first live=false may come after the idle watch, on a slow machine: then the traffic phase sees it.
    seen = next((d for ok, d in ((profile.idle_ok, profile.idle_detail), (profile.traffic_ok, profile.traffic_detail))
                 if ok is False and "live=false" in (d or "")), None)
    if seen is not None:
        handled = live_false_handling(ctx, ctx.worker(0).port, "your worker")
        text = live_failure(seen, LIVE_FALSE_ALIVE)
        if handled is None:
            raise Fail(text + "; in a second run pplex saw no live=false", subject="worker")
        raise Fail(text + f"; pplex ejected it {ms(handled['ejected_after'])} after it entered rotation, probed it "
                   f"again and kept the clients", subject="worker+pplex", details=handled)
    handled = live_false_handling(ctx, ctx.helper(live=False).port, "the helper worker")
    if handled is None:
        raise Fail("pplex: kept a worker answering live=false in rotation for 3 s", subject="pplex")
    return Passed(f"your worker answers live=true; pplex check (helper answering live=false): ejected "
                  f"{ms(handled['ejected_after'])} after entering rotation, probed again, clients kept",
                  subject="worker+pplex", details=handled)


@scenario("garbage_payloads", needs=("stable",),
          summary="pplex delivers whatever bytes a worker sends, framed and intact; an echo must be exact")
def garbage_payloads(ctx):
    helper = ctx.helper(garbage=True)
    pplex = ctx.pplex([helper.port])
    wait_ready(pplex, who="the helper worker")
    since = pplex.mark()
    pool = ctx.pool(pplex)
    first, second = pool.connect(2, "c")
    silent, = pool.connect(1, "silent")
    tag = token()
    plan = [(first, 4), (second, 3)]
    mark = traffic_mark(pplex, pool)
    for client, count in plan:
        for k in range(count):
            client.send(b"%s-%d-%s" % (client.name.encode(), k, tag))
    settle(pplex, pool, mark, expect_in=7, quiet=0.05, timeout=10.0,
           done=lambda: all(len(c.frames) >= n for c, n in plan))
    replies = {payload: out for _, payload, out in helper.sent}
    delivered = 0
    for client, count in plan:
        expected = [replies.get(p) for p in client.sent]
        if client.frames != expected:
            raise Fail(f"pplex: client {client.name} received {[describe_bytes(f) for f in client.frames]}, the "
                       f"helper worker sent it {[describe_bytes(f) for f in expected]}", subject="pplex")
        delivered += sum(len(f) for f in client.frames)
    if silent.frames:
        raise Fail("pplex: a silent client received a reply addressed to another client", subject="pplex")
    check_stayed(pplex, since)
    check_clients_open(pool)
    if not pplex.alive():
        raise Fail("pplex: died on random-bytes replies", subject="pplex")
    helper_part = (f"pplex check (helper sending {len(helper.sent)} random replies of "
                   f"{min(GARBAGE_SIZES)}..{max(len(o) for _, _, o in helper.sent)} B): all delivered intact")
    ctx.end_scope()
    profile = ctx.profile
    if profile.echo == "corrupt":
        pplex, pool, since = ctx.serving()
        client, = pool.connect(1, "c")
        mark = traffic_mark(pplex, pool)
        for k in range(3):
            client.send(b"payload-%d-" % k + token())
        stats, _ = settle(pplex, pool, mark, expect_in=3, quiet=0.2, timeout=10.0)
        pool.pump(0.01)
        written = stats["bytes_out"] - mark[0]["bytes_out"]
        framed = sum(4 + len(f) for f in client.frames)
        survived = pplex.alive() and not left_rotation(pplex, since) and not pool.closed_clients()
        pplex_part = (f"pplex delivered all {len(client.frames)} of its replies framed and intact "
                      f"({framed} B), stayed up and kept the worker in rotation"
                      if survived and written == framed else
                      f"pplex: wrote {written} B for {framed} B of replies, or did not survive them")
        raise Fail(f"your worker does not return payloads intact: {profile.echo_detail}. An echo worker must "
                   f"return each payload unchanged (if yours is not meant to echo, run with --echo no); "
                   f"{pplex_part}; {helper_part}", subject="worker+pplex",
                   details={"bytes_written": written, "bytes_framed": framed})
    if profile.echo == "yes":
        pplex, pool, since = ctx.serving()
        client, = pool.connect(1, "c")
        rng = random.Random(11)
        echo_all(ctx, pplex, pool, client, [rng.randbytes(n) for n in (3, 1000, 100000, 200000)])
        check_stayed(pplex, since)
        return Passed(f"your worker echoed 4 random payloads (up to 200000 B) intact; {helper_part}",
                      subject="worker+pplex")
    return Passed(helper_part, subject="pplex",
                  note="your worker does not echo, so only pplex's side is checked")


# The session scenarios (lifecycle events, CLOSE, groups) come after the base ones in the report.
from conformance import sessions  # noqa: E402,F401  (registers them)
