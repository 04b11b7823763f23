"""The session scenarios: lifecycle events, CLOSE and groups (the contract's session extension).

They run only against a worker whose ready answer announces "lifecycle"; any
other worker keeps the base contract, and they are skipped with that reason.

What pplex and the worker did is read back through the session commands
(conformance/README.md, "Sessions"), which a lifecycle worker may answer:

    pplex-conformance:session[:UUID]        reply to the sender: JSON {"uuid", "connected": [metadata, ...],
                                            "disconnected": [metadata, ...]}: every CONNECTED / DISCONNECTED
                                            the worker got for that client (the sender by default), on any stream
    pplex-conformance:close:PAYLOAD         CLOSE the sender with PAYLOAD
    pplex-conformance:join:GROUP            JOIN the sender to GROUP, then reply "ok" (leave: LEAVE, then "ok")
    pplex-conformance:group:GROUP:PAYLOAD   SEND PAYLOAD to GROUP
    pplex-conformance:close-group:GROUP:PAYLOAD   CLOSE every member of GROUP with PAYLOAD

When the worker under test answers them (the Go reference worker's
`--mode sessions` does), the verdicts are about both (subject
"worker+pplex"). When it announces lifecycle but does not answer them,
pplex's side is checked with the helper `SessionHelper` (subject "pplex"),
and the worker under test is only checked to stay in rotation while clients
come and go.

The scenarios are written against pplex's behaviour as issue 11 specifies it
(CONNECTED metadata keys, the DISCONNECTED reasons, CLOSE after flush, groups
and `GET /groups`); importing this module registers them after the base ones.
"""
import json
import struct
import time

from conformance.context import Fail, Passed, token, wait_ready
from conformance.procs import HOST
from conformance.scenarios import check_clients_open, check_stayed, ms, scenario
from conformance.workers import CONVENTION, SessionHelper

NEEDS = ("stable", "lifecycle")
REPLY_TIMEOUT = 3.0      # seconds a session command has to be answered
EVENT_TIMEOUT = 3.0      # seconds a DISCONNECTED has to reach the worker once its cause happened
DUPLICATE_WINDOW = 0.2   # observation window: a second DISCONNECTED would show up in it
IDLE_TIMEOUT = 0.5       # server.idle_timeout of the pplex that checks idle_timeout
MAX_FRAME = 1024         # framing_len max_frame_bytes of the pplex that checks protocol_error
SHUTDOWN_SPREAD = 0.2    # server.shutdown_spread of the pplex that checks shutdown
AUTH_TOKEN = b"pplex-conformance-token"
CONNECT_CLIENTS = 10
CHURN_CLIENTS = 20
CLOSE_PAYLOAD_BYTES = 256 * 1024
REQUIRED_METADATA = ("remote_addr", "remote_port", "local_addr", "local_port", "node")
SESSION_NOTE = ("your worker announces lifecycle but does not answer the session commands "
                "(pplex-conformance:session ...), so pplex's side was checked with the helper worker "
                "(see conformance/README.md, Sessions)")


# -- the session commands ------------------------------------------------------------------

def ask(pool, client, command, timeout=REPLY_TIMEOUT):
    """Send a session command; the first frame the client gets after it, or None."""
    base = len(client.frames)
    client.send(CONVENTION + command)
    pool.wait(lambda: len(client.frames) > base or client.closed is not None, timeout)
    return client.frames[base] if len(client.frames) > base else None


def parse_report(raw):
    try:
        report = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(report, dict) or not {"uuid", "connected", "disconnected"} <= set(report):
        return None
    if not isinstance(report["connected"], list) or not isinstance(report["disconnected"], list):
        return None
    return report


def session_report(pool, client, about=None):
    """What the worker got for client `about` (default: the asking client), or None if it did not answer."""
    return parse_report(ask(pool, client, b"session" + (b":" + about.encode() if about else b"")))


class Target:
    """The worker the session checks talk to: its port, the verdicts' subject, and a note."""

    def __init__(self, port, subject, note, who):
        self.port = port
        self.subject = subject
        self.note = note
        self.who = who


def session_target(ctx):
    """The worker under test if it answers the session commands (found out once), else the helper."""
    profile = ctx.profile
    if profile.session_commands is None:
        pplex, pool, _ = ctx.serving()
        probe, = pool.connect(1, "probe")
        profile.session_commands = session_report(pool, probe) is not None
        ctx.end_scope()
    if profile.session_commands:
        return Target(ctx.worker(0).port, "worker+pplex", "", "your worker")
    helper = ctx.helper(cls=SessionHelper)
    return Target(helper.port, "pplex", SESSION_NOTE, "the helper worker")


def serving(ctx, target, **config):
    pplex = ctx.pplex([target.port], **config)
    wait_ready(pplex, who=target.who)
    return pplex, ctx.pool(pplex)


def joined(target, pool, name):
    """A new client that asked for its own session report: (client, its uuid, the report)."""
    client, = pool.connect(1, name)
    report = session_report(pool, client)
    if report is None:
        raise Fail(f"{target.who} did not answer pplex-conformance:session within {REPLY_TIMEOUT:g} s "
                   f"(client {name}{'; ' + client.closed if client.closed else ''})", subject=target.subject)
    return client, report["uuid"], report


def await_disconnected(target, pool, watcher, uuid, reason, label, connected=1):
    """Poll the worker (through `watcher`) until it got a DISCONNECTED for `uuid`; check it is exactly one, with
    `reason`, after `connected` CONNECTED. Returns the seconds it took."""
    started = time.monotonic()
    while True:
        report = session_report(pool, watcher, uuid)
        if report is None:
            raise Fail(f"{target.who} stopped answering pplex-conformance:session:{uuid}", subject=target.subject)
        if report["disconnected"]:
            break
        if time.monotonic() - started >= EVENT_TIMEOUT:
            raise Fail(f"pplex: {label}: no DISCONNECTED reached the worker within {EVENT_TIMEOUT:g} s "
                       f"(expected reason {reason})", subject=target.subject)
        pool.pump_for(0.05)
    took = time.monotonic() - started
    pool.pump_for(DUPLICATE_WINDOW)
    report = session_report(pool, watcher, uuid) or report
    reasons = [entry.get("reason") for entry in report["disconnected"]]
    if reasons != [reason]:
        raise Fail(f"pplex: {label}: the worker got DISCONNECTED with reason(s) {reasons}, expected exactly one "
                   f"with reason {reason}", subject=target.subject, details={"report": report})
    if len(report["connected"]) != connected:
        raise Fail(f"pplex: {label}: the worker got {len(report['connected'])} CONNECTED for that client, expected "
                   f"{connected}", subject=target.subject, details={"report": report})
    return took


def uuid_of(pplex, client, timeout=REPLY_TIMEOUT):
    """The UUID pplex gave `client` (from GET /connections, by the client's port)."""
    remote = f"{HOST}:{client.local_port}"
    deadline = time.monotonic() + timeout
    while True:
        for entry in pplex.connections():
            if entry.get("remote") == remote:
                return entry["uuid"]
        if time.monotonic() >= deadline:
            raise Fail(f"pplex: client {client.name} ({remote}) is not in GET /connections")
        time.sleep(0.01)


def churn(ctx):
    """The worker under test in rotation while clients come and go (FIN and RST); Fail if it leaves."""
    pplex, pool, since = ctx.serving()
    clients = pool.connect(CHURN_CLIENTS, "churn")
    for client in clients:
        client.send(b"hello-" + token())
    pool.pump_for(0.2)
    for index, client in enumerate(clients):
        if index % 2:
            client.reset()
        else:
            client.half_close()
    pool.pump_for(0.8)  # observation window: EOF linger (0.5 s) and the DISCONNECTED that follow
    check_stayed(pplex, since)
    return f"your worker stayed in rotation while {CHURN_CLIENTS} clients came and went"


# -- scenarios -------------------------------------------------------------------------------

@scenario("lifecycle_connected", needs=NEEDS,
          summary="CONNECTED reaches the worker before a client's first message, with its addresses and node")
def lifecycle_connected(ctx):
    target = session_target(ctx)
    pplex, pool = serving(ctx, target)
    since = pplex.mark()
    clients = pool.connect(CONNECT_CLIENTS, "c")
    for client in clients:
        client.send(CONVENTION + b"session")  # each client's very first message
    pool.wait(lambda: all(c.frames or c.closed for c in clients), 5.0)
    listed = {entry["remote"]: entry["uuid"] for entry in pplex.connections()}
    nodes = set()
    for client in clients:
        report = parse_report(client.frames[0]) if client.frames else None
        if report is None:
            raise Fail(f"{target.who} did not answer client {client.name}'s pplex-conformance:session within 5 s "
                       f"with a session report", subject=target.subject)
        uuid = listed.get(f"{HOST}:{client.local_port}")
        if report["uuid"] != uuid:
            raise Fail(f"pplex: client {client.name}'s first message reached the worker as client_uuid "
                       f"{report['uuid']}, but GET /connections lists it as {uuid}", subject=target.subject)
        connected = report["connected"]
        if len(connected) != 1:
            raise Fail(f"pplex: {len(connected)} CONNECTED reached the worker before client {client.name}'s first "
                       f"message; exactly one must come before it, on the same stream", subject=target.subject)
        meta = connected[0]
        missing = [key for key in REQUIRED_METADATA if not meta.get(key)]
        if missing:
            raise Fail(f"pplex: CONNECTED metadata lacks {', '.join(missing)} (it has {', '.join(sorted(meta))})",
                       subject=target.subject, details={"metadata": meta})
        expected = {"remote_addr": HOST, "remote_port": str(client.local_port), "local_addr": HOST,
                    "local_port": str(pplex.port)}
        wrong = {k: meta[k] for k, v in expected.items() if meta[k] != v}
        if wrong:
            raise Fail(f"pplex: CONNECTED metadata says {wrong} for a client connected from "
                       f"{HOST}:{client.local_port} to {HOST}:{pplex.port}", subject=target.subject,
                       details={"metadata": meta})
        if report["disconnected"]:
            raise Fail(f"pplex: the worker got a DISCONNECTED for client {client.name}, which is still connected",
                       subject=target.subject)
        nodes.add(meta["node"])
    if len(nodes) != 1:
        raise Fail(f"pplex: one pplex instance gave {len(nodes)} different node ids: {sorted(nodes)}",
                   subject=target.subject)
    check_stayed(pplex, since)
    check_clients_open(pool)
    figure = (f"{CONNECT_CLIENTS} clients: one CONNECTED each, before its first message, with its remote and "
              f"local address and port, node {next(iter(nodes))!r}")
    if target.subject == "pplex":
        ctx.end_scope()
        figure += "; " + churn(ctx)
    return Passed(figure, subject=target.subject, note=target.note, details={"metadata_keys": sorted(meta)})


@scenario("lifecycle_disconnected", needs=NEEDS,
          summary="each way the suite can make a client go gives the worker one DISCONNECTED with its reason")
def lifecycle_disconnected(ctx):
    target = session_target(ctx)
    main, pool = serving(ctx, target)
    watcher, = pool.connect(1, "watcher")
    took = {}

    def check(client_uuid, reason, connected=1):
        took[reason] = await_disconnected(target, pool, watcher, client_uuid, reason, reason, connected)

    client, uuid, _ = joined(target, pool, "closer")
    client.half_close()
    check(uuid, "client_closed")
    client, uuid, _ = joined(target, pool, "resetter")
    client.reset()
    check(uuid, "client_reset")
    client, uuid, _ = joined(target, pool, "evicted")
    status, body = main.admin("DELETE", f"/connections/{uuid}")
    if status >= 300:
        raise Fail(f"pplex: DELETE /connections/{uuid} answered {status} {body}", subject=target.subject)
    check(uuid, "closed_by_admin")

    idle_pplex, idle_pool = serving(ctx, target, server={"idle_timeout": IDLE_TIMEOUT})
    client, uuid, _ = joined(target, idle_pool, "idle")
    check(uuid, "idle_timeout")

    strict_pplex, strict_pool = serving(ctx, target, framing={"max_frame_bytes": MAX_FRAME})
    client, uuid, _ = joined(target, strict_pool, "bad-frame")
    client.send_raw(struct.pack(">I", 4 * MAX_FRAME))  # a declared length over max_frame_bytes
    check(uuid, "protocol_error")

    auth_pplex, auth_pool = serving(ctx, target, plugins={"auth_token": {"tokens": [AUTH_TOKEN.decode()]}})
    member, = auth_pool.connect(1, "authenticated")
    member.send(AUTH_TOKEN)
    report = session_report(auth_pool, member)
    if report is None or len(report["connected"]) != 1:
        raise Fail(f"pplex: a client that passed auth_token got {len(report['connected']) if report else 'no'} "
                   f"CONNECTED before its first message after the token", subject=target.subject)
    intruder, = auth_pool.connect(1, "intruder")
    uuid = uuid_of(auth_pplex, intruder)
    intruder.send(b"wrong-" + token())
    check(uuid, "auth_failed", connected=0)

    leaving_pplex, leaving_pool = serving(ctx, target, server={"shutdown_spread": SHUTDOWN_SPREAD})
    client, uuid, _ = joined(target, leaving_pool, "at-shutdown")
    leaving_pplex.proc.terminate()
    check(uuid, "shutdown")
    status = leaving_pplex.proc.wait_exit(SHUTDOWN_SPREAD + 10)
    if status != 0:
        raise Fail(f"pplex: after SIGTERM it {'still runs' if status is None else f'exited with {status}'} "
                   f"(it must close its clients over server.shutdown_spread and exit 0)", subject=target.subject)
    if watcher.closed:
        raise Fail(f"pplex: closed the watching client ({watcher.closed})", subject=target.subject)
    slowest = max(took, key=took.get)
    return Passed(f"{len(took)} causes, each one DISCONNECTED with its reason: {', '.join(took)} (auth_failed "
                  f"with no CONNECTED before it); slowest {slowest} {ms(took[slowest])} after its cause",
                  subject=target.subject, note=target.note,
                  details={"seconds": {k: round(v, 4) for k, v in took.items()},
                           "not_caused": {"closed_by_worker": "see lifecycle_close",
                                          "slow_consumer": "needs a worker that floods a client; pplex's own "
                                                           "tests cover it"}})


@scenario("lifecycle_close", needs=NEEDS,
          summary="CLOSE writes its payload, then closes the client once it is flushed: DISCONNECTED closed_by_worker")
def lifecycle_close(ctx):
    target = session_target(ctx)
    pplex, pool = serving(ctx, target)
    since = pplex.mark()
    bystander, = pool.connect(1, "bystander")
    client, uuid, _ = joined(target, pool, "closed")
    tag = token()
    payload = (b"goodbye-" + tag + b"-") * (CLOSE_PAYLOAD_BYTES // (len(tag) + 9) + 1)
    base = len(client.frames)
    sent = time.monotonic()
    client.send(CONVENTION + b"close:" + payload)
    if not pool.wait(lambda: client.closed is not None, 5.0):
        raise Fail(f"pplex: the client was not closed within 5 s of the worker's CLOSE (it got "
                   f"{len(client.frames) - base} frame(s))", subject=target.subject)
    closed_after = time.monotonic() - sent
    got = client.frames[base:]
    if got != [payload]:
        sizes = [len(frame) for frame in got]
        raise Fail(f"pplex: before closing, the client got frames of {sizes} B instead of the CLOSE payload of "
                   f"{len(payload)} B: CLOSE must write its whole payload, then close", subject=target.subject)
    if client.closed != "closed by pplex" or client.partial_input():
        raise Fail(f"pplex: the CLOSE ended the connection with {client.closed!r} "
                   f"({client.partial_input()} B of a frame pending): it must flush, then close cleanly (FIN)",
                   subject=target.subject)
    check(target, pool, bystander, uuid, "closed_by_worker", "CLOSE with a payload")
    quiet, quiet_uuid, _ = joined(target, pool, "closed-quietly")
    base = len(quiet.frames)
    quiet.send(CONVENTION + b"close:")
    if not pool.wait(lambda: quiet.closed is not None, 5.0):
        raise Fail("pplex: a CLOSE without payload did not close the client within 5 s", subject=target.subject)
    if quiet.frames[base:]:
        raise Fail(f"pplex: a CLOSE without payload wrote {len(quiet.frames) - base} frame(s) to the client; it must "
                   f"write nothing", subject=target.subject)
    check(target, pool, bystander, quiet_uuid, "closed_by_worker", "CLOSE without a payload")
    if bystander.closed:
        raise Fail(f"pplex: closed the bystander client too ({bystander.closed})", subject=target.subject)
    check_stayed(pplex, since)
    return Passed(f"{len(payload)} B written, then a clean close {ms(closed_after)} after the command; "
                  f"DISCONNECTED closed_by_worker; an empty CLOSE writes nothing", subject=target.subject,
                  note=target.note)


def check(target, pool, watcher, uuid, reason, label):
    await_disconnected(target, pool, watcher, uuid, reason, label)


def groups_listed(pplex):
    """GET /groups as {name: members}, or Fail naming what came back."""
    status, body = pplex.admin("GET", "/groups")
    rows = body.get("groups") if isinstance(body, dict) else None
    if status != 200 or not isinstance(rows, list):
        raise Fail(f"pplex: GET /groups answered {status} {str(body)[:120]}; it must list the groups "
                   f"({{\"groups\": [{{\"name\", \"members\"}}]}})")
    return {row.get("name"): row.get("members") for row in rows if isinstance(row, dict)}


@scenario("lifecycle_groups", needs=NEEDS,
          summary="JOIN, SEND to a group, LEAVE, a member that goes, CLOSE of a group; GET /groups")
def lifecycle_groups(ctx):
    target = session_target(ctx)
    pplex, pool = serving(ctx, target)
    since = pplex.mark()
    group = "conformance-" + token().decode()
    a, a_uuid, _ = joined(target, pool, "a")
    b, b_uuid, _ = joined(target, pool, "b")
    c, c_uuid, _ = joined(target, pool, "outsider")
    everyone = (a, b, c)

    def command(client, text):
        reply = ask(pool, client, text.encode())
        if reply == b"":
            raise Fail(f"pplex: a {text.split(':')[0].upper()} wrote an empty frame to the client: an action is not a "
                       f"payload to deliver", subject=target.subject)
        if reply != b"ok":
            raise Fail(f"{target.who} answered pplex-conformance:{text.split(':')[0]} with "
                       f"{reply!r} (expected \"ok\" after the action)", subject=target.subject)

    def to_group(sender, action=b"group"):
        payload = b"%s-%s" % (action, token())
        marks = {client: len(client.frames) for client in everyone}
        sender.send(CONVENTION + action + b":" + group.encode() + b":" + payload)
        pool.pump_for(0.3)  # observation window: every member's copy, and nothing for the others
        return payload, {client.name: client.frames[marks[client]:] for client in everyone}

    def expect(got, payload, members, what):
        wanted = {client.name: ([payload] if client in members else []) for client in everyone}
        if got != wanted:
            counts = {name: len(frames) for name, frames in got.items()}
            raise Fail(f"pplex: {what}: clients got {counts} frame(s); expected the payload once for each of "
                       f"{sorted(m.name for m in members)} and nothing for the others", subject=target.subject)

    command(a, f"join:{group}")
    command(b, f"join:{group}")
    listed = groups_listed(pplex)
    if listed.get(group) != 2:
        raise Fail(f"pplex: GET /groups lists {group} with {listed.get(group)} member(s) after 2 JOINs",
                   subject=target.subject)
    payload, got = to_group(a)
    expect(got, payload, (a, b), "SEND to a group of 2")
    command(b, f"leave:{group}")
    payload, got = to_group(a)
    expect(got, payload, (a,), "SEND after one member's LEAVE")
    command(b, f"join:{group}")
    a.reset()
    await_disconnected(target, pool, c, a_uuid, "client_reset", "a group member that went")
    payload, got = to_group(c)
    got.pop(a.name)
    if got != {b.name: [payload], c.name: []}:
        raise Fail(f"pplex: SEND to a group whose member went: got {got}; only the remaining member must get it",
                   subject=target.subject)
    if groups_listed(pplex).get(group) != 1:
        raise Fail("pplex: GET /groups still counts a member that went", subject=target.subject)
    bye = b"group-closed-" + token()
    base = len(b.frames)
    c.send(CONVENTION + b"close-group:" + group.encode() + b":" + bye)
    if not pool.wait(lambda: b.closed is not None, 5.0):
        raise Fail("pplex: CLOSE of a group did not close its member within 5 s", subject=target.subject)
    if b.frames[base:] != [bye]:
        raise Fail(f"pplex: CLOSE of a group wrote {len(b.frames) - base} frame(s) to its member before closing "
                   f"it; expected its payload once", subject=target.subject)
    await_disconnected(target, pool, c, b_uuid, "closed_by_worker", "CLOSE of a group")
    if c.closed:
        raise Fail(f"pplex: a client outside the group was closed ({c.closed})", subject=target.subject)
    check_stayed(pplex, since)
    return Passed("JOIN x2 (GET /groups: 2 members), SEND reached exactly the members, LEAVE took one out, a "
                  "member that went left the group, CLOSE of the group closed its member after its payload",
                  subject=target.subject, note=target.note)
