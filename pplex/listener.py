"""The client listener: the listening socket, accepting, and the limits at the front door.

Owns the socket clients connect to, its socket options (TCP keepalive and
TCP_NODELAY are set once on the listener: Linux copies them to every accepted
socket, so an accept costs no extra system call), the accept loop (bounded
per readiness event), the `max_connections` limit, and what happens when
the process runs out of file descriptors: accepting pauses and resumes by
itself, logged once per episode, never a busy loop. Each accepted socket is
handed to `on_accept(sock, peer)`: the front door's (`pplex.frontdoor`, PROXY
header and TLS), or the proxy's when there is nothing to do before it opens.
"""
import logging
import socket

from pplex import limits
from pplex.connection import format_peer
from pplex.reactor import READ

log = logging.getLogger("pplex.listener")


def bind_socket(host, port, reuse_port=False, options=()):
    """A TCP socket bound to (host, port) the way pplex's listeners bind (SO_REUSEADDR, and
    SO_REUSEPORT when asked), not listening yet; `options`: more (level, name, value). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET and not (host.isascii() and host.replace(".", "").isdigit()):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for level, name, value in options:
            sock.setsockopt(level, name, value)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts clients on one address while `accepting`; every method runs on the reactor thread."""

    def __init__(self, reactor, on_accept, max_connections, count_open, keepalive=(60, 10, 6)):
        self.reactor = reactor
        self.on_accept = on_accept
        self.max_connections = max_connections
        self.count_open = count_open      # () -> open client connections
        self.keepalive = keepalive        # (idle s, interval s, probes); idle 0: off
        self.sock = None
        self.accepting = False
        self.stopped = False
        self._retry = None
        self._full_logged = False
        self._error_episode = False

    def listen(self, host, port, backlog=1024, reuse_port=False):
        """Bind and listen; return the bound (host, port). Raises OSError naming the address.

        `reuse_port`: several processes share the port (SO_REUSEPORT; `--processes`)."""
        idle, interval, count = self.keepalive
        options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        if idle:
            options += [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)]
        try:
            sock = bind_socket(host, port, reuse_port, options)
        except OSError as error:
            raise OSError(error.errno, f"cannot listen on {format_peer((host, port))}: {error.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
        self.sock = sock
        self.start()
        return sock.getsockname()[:2]

    # -- accepting -------------------------------------------------------------
    def start(self):
        if not self.accepting and not self.stopped and self.sock is not None and self._retry is None:
            self.accepting = True
            self.reactor.register(self.sock, READ, self)

    def pause(self):
        if self.accepting:
            self.accepting = False
            self.reactor.unregister(self.sock)

    def on_readable(self):
        for _ in range(limits.ACCEPT_PER_EVENT):
            if self.count_open() >= self.max_connections:
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("max_connections (%d) reached: not accepting until a client leaves",
                                self.max_connections)
                self.pause()
                return
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # Out of file descriptors (EMFILE/ENFILE) or memory: the listener stays
                # readable, so pause instead of spinning, and say so once per episode.
                if not self._error_episode:
                    self._error_episode = True
                    log.warning("accept failed: %s; pausing accepts (retrying every %.2f s, "
                                "logged again once it works)", error.strerror or error,
                                limits.ACCEPT_RETRY_SECONDS)
                self.pause()
                self._retry = self.reactor.call_later(limits.ACCEPT_RETRY_SECONDS, self._retry_now)
                return
            if self._error_episode:
                self._error_episode = False
                log.warning("accepting again after the accept errors")
            self.on_accept(sock, peer)

    def _retry_now(self):
        self._retry = None
        self.start()

    def client_left(self):
        """A client closed: accept again if the limit had stopped us."""
        if not self.accepting and self.count_open() < self.max_connections:
            if self._full_logged:
                self._full_logged = False
                log.info("below max_connections again: accepting")
            self.start()

    def close(self):
        """Stop accepting for good and close the listening socket (new connects are refused)."""
        self.stopped = True
        self.pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
