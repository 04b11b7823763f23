"""The helper worker: an in-process worker (the Python SDK) that misbehaves on request.

The worker under test cannot be made to reply to an unknown UUID, to stop
answering `ready`, or to broadcast to ACTIVE clients. To still check pplex's
side of those cases, scenarios fall back to this worker and report the check
as a pplex check ("subject": "pplex"). It echoes by default, and obeys the
suite's convention payloads:

    pplex-conformance:broadcast:all|active|not_active   broadcast that payload with that kind
    pplex-conformance:unknown-uuid                      reply to a made-up UUID, then "done" to the sender

A worker under test that wants its own broadcasts verified answers the same
broadcast payloads the same way (see README.md).
"""
import random
import threading

from pplex.worker import BROADCAST_ACTIVE, BROADCAST_ALL, BROADCAST_NOT_ACTIVE, Worker

CONVENTION = b"pplex-conformance:"
BROADCAST_COMMAND = b"pplex-conformance:broadcast:"
UNKNOWN_COMMAND = b"pplex-conformance:unknown-uuid"
UNKNOWN_UUID = "00000000-0000-4000-8000-00000c0ffee0"
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
