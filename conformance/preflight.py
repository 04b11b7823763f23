"""The preflight: what kind of worker is this? Run once, before the scenarios.

It starts instance 0 of the worker under test and one pplex in front of it,
and records, in a `Profile`:

- does the worker start and listen; does it answer `ready` (a direct gRPC
  call, and pplex's own probe); does pplex put it in rotation;
- does it stay in rotation while idle (a few heartbeats at alive_timeout 0.2);
- what it does with messages: one client sends six messages, one at a time,
  while a second, silent client listens. Every output is attributed exactly
  (see `context.step`): a direct reply to the sender, an ALL broadcast (both
  clients), ACTIVE (the sender only, counted as a broadcast by pplex) or
  NOT_ACTIVE (the silent client only). The first three are probes (A, B, A
  again), the last three the broadcast convention payloads;
- which optional features its ready answer announces ("lifecycle": the
  session scenarios run, see sessions.py);
- whether it echoes. `--echo auto` decides from the probes: all three came
  back unchanged to the sender: an echo worker. Direct replies that differ
  from the probe *and* differ between the two identical probes A: a broken
  echo (random bytes), reported by garbage_payloads. Anything else (fixed
  payloads, broadcasts, a deterministic transformation, no reply): not an
  echo worker; the payload-integrity scenarios are skipped.

Scenarios read the profile to decide whether they can run ("blocked") and to
attribute root causes; they do their own measurements.
"""
import threading
import time

from conformance.context import (
    READY_TIMEOUT, ROTATION_WAIT, STEP_TIMEOUT, describe_bytes, left_rotation, step, token)
from conformance.procs import HOST, StartError
from conformance.workers import broadcast_command

PROBE_ALIVE = 0.2           # alive_timeout during the preflight
IDLE_WATCH = 0.5            # seconds watched in rotation with no traffic
HEARTBEAT_POLL = 0.02


class Profile:
    def __init__(self):
        self.start_error = None
        self.ready_ok = False
        self.ready_detail = None      # pplex's last error about ready, when never in rotation
        self.ready_state = None
        self.ready_call = None        # our own ready call: answered, ready, seconds, error
        self.rotation_seconds = None  # pplex start -> in rotation
        self.idle_ok = None
        self.idle_detail = None
        self.heartbeats = 0
        self.traffic_ok = None
        self.traffic_detail = None
        self.traffic_messages = 0
        self.steps = []
        self.answered = 0             # probes (of 3) that caused any output
        self.echo = None              # "yes", "no", "corrupt"; None: unknown
        self.echo_detail = ""
        self.broadcasts = set()       # kinds seen: "ALL", "ACTIVE", "NOT_ACTIVE"
        self.drops = {}
        self.anomalies = []
        self.features = []            # ReadyResult.features of our own ready call
        self.session_commands = None  # answers "pplex-conformance:session" (sessions.py); None: not asked

    @property
    def lifecycle(self):
        """The worker announced "lifecycle": pplex sends it CONNECTED and DISCONNECTED inputs."""
        return "lifecycle" in self.features

    def as_dict(self):
        return {
            "started": self.start_error is None, "start_error": self.start_error,
            "ready": self.ready_ok, "ready_detail": self.ready_detail, "ready_call": self.ready_call,
            "features": self.features, "session_commands": self.session_commands,
            "rotation_seconds": _round(self.rotation_seconds),
            "stays_in_rotation_idle": self.idle_ok, "idle_detail": self.idle_detail,
            "heartbeats_seen": self.heartbeats,
            "stays_in_rotation_under_traffic": self.traffic_ok, "traffic_detail": self.traffic_detail,
            "echo": self.echo, "echo_detail": self.echo_detail,
            "broadcast_kinds_seen": sorted(self.broadcasts),
            "probe_steps": self.steps, "drops": self.drops, "anomalies": self.anomalies,
        }

    def summary(self):
        if self.start_error:
            return "did not start"
        if not self.ready_ok:
            return f"never entered rotation ({self.ready_detail})"
        parts = []
        if self.idle_ok is False:
            parts.append(f"left rotation while idle ({self.idle_detail})")
        elif self.traffic_ok is False:
            parts.append(f"left rotation under traffic ({self.traffic_detail})")
        else:
            parts.append("ready, stays in rotation")
        parts.append({"yes": "echoes", "corrupt": "replies are not intact (broken echo?)",
                      "no": "does not echo"}.get(self.echo, "echo unknown"))
        if self.broadcasts:
            parts.append("broadcasts " + "/".join(sorted(self.broadcasts)))
        if self.lifecycle:
            parts.append("announces lifecycle")
        return "; ".join(parts)


def _round(value, digits=4):
    return None if value is None else round(value, digits)


def ready_call(port, timeout):
    """Call the worker's `ready` ourselves: {answered, ready, seconds, error, features}."""
    import grpc
    from google.protobuf import empty_pb2

    from pplex._proto import upstream_pb2_grpc

    channel = grpc.insecure_channel(f"{HOST}:{port}")
    started = time.monotonic()
    try:
        answer = upstream_pb2_grpc.UpstreamPeerServiceStub(channel).ready(empty_pb2.Empty(), timeout=timeout)
        return {"answered": True, "ready": bool(answer.ready), "seconds": round(time.monotonic() - started, 4),
                "error": None, "features": list(answer.features)}
    except grpc.RpcError as error:
        return {"answered": False, "ready": None, "seconds": round(time.monotonic() - started, 4),
                "error": f"{error.code().name}: {error.details()}", "features": []}
    finally:
        channel.close()


def watch_heartbeats(pplex, upstream, seconds, since, answers=0, longest=5.0):
    """Poll /upstreams for `seconds` (and on, up to `longest`, until `answers` heartbeat answers were
    seen: a loaded machine may take longer to answer the first): (answers seen, the left-rotation
    event or None, RTTs)."""
    started = time.monotonic()
    rtts = []
    last = None
    while True:
        left = left_rotation(pplex, since, upstream)
        if left:
            return len(rtts), left[0], rtts
        info = pplex.upstream(upstream)
        rtt = info.get("live_rtt_seconds") if info else None
        if rtt is not None and rtt != last:
            rtts.append(rtt)
            last = rtt
        elapsed = time.monotonic() - started
        if elapsed >= seconds and (len(rtts) >= answers or elapsed >= longest):
            return len(rtts), None, rtts
        time.sleep(HEARTBEAT_POLL)


def run(ctx):
    profile = Profile()
    ctx.profile = profile
    try:
        instance = ctx.worker(0)
    except StartError as error:
        profile.start_error = str(error)
        return profile
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(ready_call(instance.port, READY_TIMEOUT)), daemon=True)
    caller.start()
    started = time.time()
    pplex = ctx.pplex([instance.port], alive_timeout=PROBE_ALIVE)
    # Marked before it enters: a worker ejected within a millisecond of entering must not be missed.
    mark = pplex.mark()
    entered = pplex.wait_event("u1", "ready", timeout=ROTATION_WAIT)
    caller.join(READY_TIMEOUT + 5)
    profile.ready_call = dict(answer) or None
    profile.features = list(answer.get("features") or [])
    if entered is None:
        info = pplex.upstream("u1") or {}
        complaints = pplex.events_of("u1", "not_ready")
        profile.ready_state = info.get("state")
        profile.ready_detail = (info.get("last_error") or (complaints[-1].detail if complaints else None)
                                or "no answer from ready")
        return profile
    profile.ready_ok = True
    profile.rotation_seconds = max(0.0, entered.wall - started)

    profile.heartbeats, left, _ = watch_heartbeats(pplex, "u1", IDLE_WATCH, mark, answers=2)
    if left is not None:
        profile.idle_ok, profile.idle_detail = False, left.detail
        return profile
    profile.idle_ok = True

    pool = ctx.pool(pplex)
    sender, = pool.connect(1, "sender")
    idle, = pool.connect(1, "idle")
    tag = token()
    probe_a = b"probe-A-" + tag
    probe_b = b"probe-B-" + tag + bytes(range(0, 256, 15))
    plan = [("probe", probe_a), ("probe", probe_b), ("probe", probe_a),
            ("broadcast", broadcast_command("all")), ("broadcast", broadcast_command("active")),
            ("broadcast", broadcast_command("not_active"))]
    steps = []
    profile.traffic_ok = True
    for index, (what, payload) in enumerate(plan):
        timeout = STEP_TIMEOUT if (index == 0 or profile.answered) else 0.5
        result = step(pplex, pool, sender, payload, timeout=timeout)
        kind = result.classify(active=[sender], idle=[idle])
        steps.append((what, payload, result, kind))
        if what == "probe" and kind != "none":
            profile.answered += 1
        if kind in ("ALL", "ACTIVE", "NOT_ACTIVE"):
            profile.broadcasts.add(kind)
        if kind == "misdelivered":
            profile.anomalies.append(f"message {index + 1}: output reached {sorted(c.name for c in result.recipients())}")
        for reason, count in result.drops.items():
            profile.drops[reason] = profile.drops.get(reason, 0) + count
        profile.steps.append({"sent": describe_bytes(payload), "output": kind,
                              "received": {c.name: [describe_bytes(f) for f in frames]
                                           for c, frames in result.frames.items() if frames}})
        left = left_rotation(pplex, mark)
        if left:
            profile.traffic_ok, profile.traffic_detail = False, left[0].detail
            profile.traffic_messages = index + 1
            return profile
    classify_echo(ctx, profile, steps, sender)
    return profile


def classify_echo(ctx, profile, steps, sender):
    probes = [(payload, result, kind) for what, payload, result, kind in steps if what == "probe"]
    replies = [result.frames[sender][0] if kind == "direct" else None for _, result, kind in probes]
    direct = all(kind == "direct" for _, _, kind in probes)
    intact = [reply == payload for (payload, _, _), reply in zip(probes, replies)]
    first_payload, _, first_kind = probes[0]
    if direct and all(intact):
        profile.echo = "no" if ctx.echo_mode == "no" else "yes"
        profile.echo_detail = f"{len(probes)} probes came back unchanged"
        if ctx.echo_mode == "no":
            profile.echo_detail = "--echo no: payload checks not run"
        return
    if ctx.echo_mode == "no":
        profile.echo, profile.echo_detail = "no", "--echo no: payload checks not run"
        return
    if direct:
        wrong = next(i for i, ok in enumerate(intact) if not ok)
        detail = f"a probe of {describe_bytes(probes[wrong][0])} came back as {describe_bytes(replies[wrong])}"
        varies = replies[0] != replies[2] and len(set(replies)) > 1
        if ctx.echo_mode == "yes" or any(intact) or varies:
            if varies:
                detail += f", and the same probe sent again came back as {describe_bytes(replies[2] if wrong == 0 else replies[0])}"
            profile.echo, profile.echo_detail = "corrupt", detail
            return
        profile.echo = "no"
        profile.echo_detail = detail + " (identical probes got identical replies: a deterministic reply, not an echo)"
        return
    if first_kind == "none":
        detail = "your worker sent nothing back for a probe"
    elif first_kind == "direct":
        detail = f"a probe of {describe_bytes(first_payload)} came back as {describe_bytes(replies[0])}"
    else:
        detail = f"a probe of {describe_bytes(first_payload)} was answered with {_kind_words(first_kind)}"
    others = [kind for _, _, kind in probes[1:] if kind != first_kind]
    if others:
        detail += f"; another with {_kind_words(others[0])}"
    if ctx.echo_mode == "yes":
        profile.echo, profile.echo_detail = "corrupt", detail
    else:
        profile.echo, profile.echo_detail = "no", detail


def _kind_words(kind):
    return {"none": "no output", "direct": "a direct reply", "several": "several outputs",
            "misdelivered": "an output pplex misdelivered", "ALL": "an ALL broadcast",
            "ACTIVE": "an ACTIVE broadcast"}.get(kind, f"a {kind} broadcast")
