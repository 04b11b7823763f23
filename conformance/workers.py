"""The helper workers: in-process workers (the Python SDK) that misbehave on request, or speak sessions.

The worker under test cannot be made to reply to an unknown UUID, to stop
answering `ready`, or to broadcast to ACTIVE clients. To still check pplex's
side of those cases, scenarios fall back to this worker and report the check
as a pplex check ("subject": "pplex"). It echoes by default, and obeys the
suite's convention payloads:

    pplex-conformance:broadcast:all|active|not_active   broadcast that payload with that kind
    pplex-conformance:unknown-uuid                      reply to a made-up UUID, then "done" to the sender

A worker under test that wants its own broadcasts verified answers the same
broadcast payloads the same way (see README.md).

`SessionHelper` announces "lifecycle", keeps a journal of the CONNECTED and
DISCONNECTED it got, and answers the session commands (README.md,
"Sessions") the way a lifecycle worker under test may:

    pplex-conformance:session[:UUID]        reply: JSON {"uuid", "connected": [metadata...], "disconnected": [...]}
    pplex-conformance:close:PAYLOAD         CLOSE the sender with PAYLOAD
    pplex-conformance:join:GROUP            JOIN the sender to GROUP, then reply "ok" (leave: LEAVE)
    pplex-conformance:group:GROUP:PAYLOAD   SEND PAYLOAD to GROUP (close-group: CLOSE GROUP with PAYLOAD)
"""
import collections
import json
import random
import threading

from pplex.worker import BROADCAST_ACTIVE, BROADCAST_ALL, BROADCAST_NOT_ACTIVE, Group, Worker

CONVENTION = b"pplex-conformance:"
BROADCAST_COMMAND = b"pplex-conformance:broadcast:"
UNKNOWN_COMMAND = b"pplex-conformance:unknown-uuid"
UNKNOWN_UUID = "00000000-0000-4000-8000-00000c0ffee0"
JOURNAL_CLIENTS = 10000  # clients a session worker remembers for "session:UUID"
KINDS = {"all": BROADCAST_ALL, "active": BROADCAST_ACTIVE, "not_active": BROADCAST_NOT_ACTIVE}
KIND_NAMES = {BROADCAST_ALL: "ALL", BROADCAST_ACTIVE: "ACTIVE", BROADCAST_NOT_ACTIVE: "NOT_ACTIVE"}
GARBAGE_SIZES = (0, 1, 200000, 7, 65536)  # then random sizes up to GARBAGE_MAX
GARBAGE_MAX = 200000


def broadcast_command(kind_name):
    return BROADCAST_COMMAND + kind_name.encode()


class HelperWorker(Worker):
    """Echo worker with switchable misbehaviours.

    :param ready: "yes", "no" (ready=false), "never" (blocks until pplex's
        deadline), or a number of seconds to sleep before answering yes.
    :param live: what `live` answers.
    :param close_after: end each data stream after this many replies.
    :param garbage: answer each message with random bytes of random length
        (recorded in `sent`, as (client_uuid, input, output)).
    """

    def __init__(self, ready="yes", live=True, close_after=None, garbage=False, seed=1):
        super().__init__()
        self.ready_mode = ready
        self.live = live
        self.close_after = close_after
        self.garbage = garbage
        self.rng = random.Random(seed)
        self.sent = []
        self.ready_calls = 0
        self._counts = {}
        self._released = threading.Event()
        self._record = threading.Lock()

    def is_ready(self):
        with self._record:
            self.ready_calls += 1
        mode = self.ready_mode
        if mode == "never":
            self._released.wait(120)
            return False
        if mode == "no":
            return False
        if isinstance(mode, (int, float)):
            self._released.wait(mode)
        return True

    def is_live(self):
        return self.live

    def on_message(self, stream, client_uuid, payload):
        if payload.startswith(BROADCAST_COMMAND):
            kind = KINDS.get(payload[len(BROADCAST_COMMAND):].decode("ascii", "replace"))
            if kind is not None:
                stream.broadcast(payload, kind)
                return
        if payload == UNKNOWN_COMMAND:
            stream.reply(UNKNOWN_UUID, b"to nobody")
            stream.reply(client_uuid, b"done")
            return
        if self.garbage:
            with self._record:
                index = len(self.sent)
                size = GARBAGE_SIZES[index] if index < len(GARBAGE_SIZES) else self.rng.randint(0, GARBAGE_MAX)
                data = self.rng.randbytes(size)
                self.sent.append((client_uuid, payload, data))
            stream.reply(client_uuid, data)
            return
        stream.reply(client_uuid, payload)
        if self.close_after is not None:
            with self._record:
                count = self._counts.get(id(stream), 0) + 1
                self._counts[id(stream)] = count
            if count >= self.close_after:
                stream.end()

    def on_stream_end(self, stream):
        with self._record:
            self._counts.pop(id(stream), None)

    def stop(self, grace=None):
        self._released.set()
        super().stop(grace)


class SessionHelper(HelperWorker):
    """A lifecycle worker for the session scenarios: a journal of events, and the session commands."""

    COMMANDS = (b"session", b"close", b"join", b"leave", b"group", b"close-group")

    def __init__(self, **behaviour):
        super().__init__(**behaviour)
        self.journal = collections.OrderedDict()  # uuid -> {"uuid", "connected": [...], "disconnected": [...]}
        self._journal_lock = threading.Lock()

    def _entry(self, client_uuid):
        entry = self.journal.get(client_uuid)
        if entry is None:
            entry = self.journal[client_uuid] = {"uuid": client_uuid, "connected": [], "disconnected": []}
            if len(self.journal) > JOURNAL_CLIENTS:
                self.journal.popitem(last=False)
        return entry

    def on_connected(self, stream, client_uuid, metadata):
        with self._journal_lock:
            self._entry(client_uuid)["connected"].append(dict(metadata))

    def on_disconnected(self, stream, client_uuid, reason):
        with self._journal_lock:
            self._entry(client_uuid)["disconnected"].append({"reason": reason})

    def report(self, client_uuid):
        with self._journal_lock:
            entry = self.journal.get(client_uuid) or {"uuid": client_uuid, "connected": [], "disconnected": []}
            return json.dumps(entry).encode()

    def on_message(self, stream, client_uuid, payload):
        name, _, arg = payload[len(CONVENTION):].partition(b":")
        if not payload.startswith(CONVENTION) or name not in self.COMMANDS:
            super().on_message(stream, client_uuid, payload)
        elif name == b"session":
            stream.reply(client_uuid, self.report(arg.decode("utf-8", "replace") if arg else client_uuid))
        elif name == b"close":
            stream.close(client_uuid, arg)
        elif name in (b"join", b"leave"):
            (stream.join if name == b"join" else stream.leave)(client_uuid, arg.decode("utf-8", "replace"))
            stream.reply(client_uuid, b"ok")
        else:
            group, _, data = arg.partition(b":")
            group = group.decode("utf-8", "replace")
            if name == b"group":
                stream.send_group(group, data)
            else:
                stream.close(Group(group), data)
