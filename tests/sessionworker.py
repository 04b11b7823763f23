"""A lifecycle worker for the session tests: it records every input in order and obeys commands.

Every input it gets (CONNECTED with its metadata, MESSAGE with its payload,
DISCONNECTED with its reason) goes into `log` as (stream node, kind, uuid,
data), in arrival order. A message is a command when it is one of (a trailing
newline is ignored):

    whoami                     reply the client's UUID (36 bytes)
    close:PAYLOAD              CLOSE the sender with PAYLOAD
    close-big:SIZE             CLOSE the sender with SIZE bytes of "g"
    join:GROUP / leave:GROUP   JOIN / LEAVE the sender, then reply "ok"
    group:GROUP:PAYLOAD        SEND PAYLOAD to GROUP
    close-group:GROUP:PAYLOAD  CLOSE every member of GROUP with PAYLOAD
    flood:COUNT:SIZE           reply COUNT payloads of SIZE bytes to the sender
    join-other:UUID:GROUP      JOIN client UUID (maybe another pplex node's) to GROUP, then reply "ok"
    close-other:UUID:PAYLOAD   CLOSE client UUID with PAYLOAD, then reply "ok"

anything else is echoed.
"""
import threading

from pplex.worker import Group, Worker

CONNECTED, MESSAGE, DISCONNECTED = "CONNECTED", "MESSAGE", "DISCONNECTED"


class SessionWorker(Worker):
    def __init__(self, name="w"):
        super().__init__()
        self.name = name
        self.log = []
        self.lock = threading.Lock()

    def _add(self, stream, kind, client_uuid, data):
        with self.lock:
            self.log.append((stream.node, kind, client_uuid, data))

    def on_connected(self, stream, client_uuid, metadata):
        self._add(stream, CONNECTED, client_uuid, metadata)

    def on_disconnected(self, stream, client_uuid, reason):
        self._add(stream, DISCONNECTED, client_uuid, reason)

    def on_message(self, stream, client_uuid, payload):
        self._add(stream, MESSAGE, client_uuid, payload)
        name, _, arg = payload.rstrip(b"\n").partition(b":")
        if name == b"whoami":
            stream.reply(client_uuid, client_uuid.encode())
        elif name == b"close":
            stream.close(client_uuid, arg)
        elif name == b"close-big":
            stream.close(client_uuid, b"g" * int(arg))
        elif name in (b"join", b"leave"):
            (stream.join if name == b"join" else stream.leave)(client_uuid, arg.decode())
            stream.reply(client_uuid, b"ok")
        elif name in (b"group", b"close-group"):
            group, _, data = arg.partition(b":")
            if name == b"group":
                stream.send_group(group.decode(), data)
            else:
                stream.close(Group(group.decode()), data)
        elif name in (b"join-other", b"close-other"):
            other, _, rest = arg.partition(b":")
            if name == b"join-other":
                stream.join(other.decode(), rest.decode())
            else:
                stream.close(other.decode(), rest)
            stream.reply(client_uuid, b"ok")
        elif name == b"flood":
            count, size = (int(n) for n in arg.split(b":"))
            for _ in range(count):
                stream.reply(client_uuid, b"f" * size)
        else:
            stream.reply(client_uuid, payload)

    # -- what the tests read ---------------------------------------------------------
    def inputs(self, client_uuid=None):
        """[(kind, data)] for one client, or every (node, kind, uuid, data)."""
        with self.lock:
            if client_uuid is None:
                return list(self.log)
            return [(kind, data) for _, kind, uuid, data in self.log if uuid == client_uuid]

    def kinds(self, client_uuid):
        return [kind for kind, _ in self.inputs(client_uuid)]

    def reasons(self, client_uuid):
        return [data for kind, data in self.inputs(client_uuid) if kind == DISCONNECTED]

    def count(self, kind):
        with self.lock:
            return sum(1 for entry in self.log if entry[1] == kind)

    def uuids(self, kind):
        """Every uuid with an input of `kind`, once per input (duplicates show)."""
        with self.lock:
            return [entry[2] for entry in self.log if entry[1] == kind]
