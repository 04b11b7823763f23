"""TCP clients of pplex, speaking `framing_len` (4-byte big-endian length, then the body).

A `ClientPool` drives any number of nonblocking sockets from the calling
thread with one selector: sends are queued and written as the sockets take
them, replies are cut into frames as they arrive, so a scenario can send a
megabyte while replies flow back without deadlocking, and count messages
exactly. Every wait is a bounded poll of a condition.
"""
import selectors
import socket
import struct
import time

from conformance.procs import HOST

PREFIX = struct.Struct(">I")
RECV_BYTES = 256 * 1024


class Client:
    def __init__(self, pool, name, sock):
        self.pool = pool
        self.name = name
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        self.frames = []       # every frame received, in order
        self.times = []        # time.monotonic() when each frame was complete
        self.sent = []         # every payload sent, in order
        self.closed = None     # why the connection ended (None: open)
        self._in = bytearray()
        self._out = bytearray()

    def __repr__(self):
        return f"<Client {self.name}>"

    def send(self, payload):
        self.sent.append(bytes(payload))
        self._out += PREFIX.pack(len(payload))
        self._out += payload
        self._flush()

    def _flush(self):
        if self.closed is not None:
            return
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                self._close(f"send failed: {error.strerror or error}")
                return
            del self._out[:sent]
        self.pool._interest(self)

    def _readable(self):
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._close(f"reset by pplex ({error.strerror or error})")
                return
            if not data:
                self._close("closed by pplex")
                return
            self._in += data
            self._cut()
            if len(data) < RECV_BYTES:
                return

    def _cut(self):
        buf = self._in
        offset = 0
        now = time.monotonic()
        while len(buf) - offset >= 4:
            (length,) = PREFIX.unpack_from(buf, offset)
            end = offset + 4 + length
            if end > len(buf):
                break
            self.frames.append(bytes(buf[offset + 4:end]))
            self.times.append(now)
            offset = end
        if offset:
            del buf[:offset]

    def _close(self, reason):
        if self.closed is None:
            self.closed = reason
            self.pool._forget(self)

    def send_raw(self, data):
        """Bytes as they are, no length prefix (to break the framing on purpose)."""
        self._out += data
        self._flush()

    def half_close(self):
        """Shut down our sending side (FIN) once what is queued is out; keep reading."""
        self._flush()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reset(self):
        """Close with a TCP RST (SO_LINGER 0), the way a crashed client goes."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close("reset by us")
        self.sock.close()

    def pending_output(self):
        return len(self._out)

    def partial_input(self):
        return len(self._in)


class ClientPool:
    """Clients of one pplex; call `pump` (or `wait`) to move bytes."""

    def __init__(self, port, host=HOST):
        self.port = port
        self.host = host
        self.clients = []
        self.selector = selectors.DefaultSelector()

    def connect(self, count, prefix="c"):
        made = []
        for i in range(count):
            sock = socket.create_connection((self.host, self.port), timeout=5.0)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = Client(self, f"{prefix}{i}", sock)
            self.selector.register(sock, selectors.EVENT_READ, client)
            self.clients.append(client)
            made.append(client)
        return made

    def _interest(self, client):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client._out else 0)
        try:
            self.selector.modify(client.sock, events, client)
        except (KeyError, ValueError):
            pass

    def _forget(self, client):
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass

    def pump(self, timeout=0.01):
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        for key, events in self.selector.select(timeout):
            client = key.data
            if events & selectors.EVENT_WRITE:
                client._flush()
            if events & selectors.EVENT_READ and client.closed is None:
                client._readable()

    def wait(self, condition, timeout):
        """Pump until `condition()` is true (return True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.pump(min(0.01, remaining))
        return True

    def pump_for(self, seconds):
        """Keep moving bytes for `seconds` (an observation window, e.g. to see that nothing else comes)."""
        self.wait(lambda: False, seconds)

    def total_frames(self):
        return sum(len(c.frames) for c in self.clients)

    def frame_counts(self):
        return [len(c.frames) for c in self.clients]

    def closed_clients(self):
        return [c for c in self.clients if c.closed is not None]

    def close(self):
        for client in self.clients:
            self._forget(client)
            try:
                client.sock.close()
            except OSError:
                pass
        self.selector.close()
