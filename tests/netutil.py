"""Network fixtures on loopback only: an address that never answers, and a name with chosen addresses.

- `Blackhole`: a listening socket whose accept queue is kept full, so the
  kernel drops further SYNs and a connect to it hangs (as to a blackholed
  host), without a packet leaving the machine.
- `hosts_namespace(...)`: a command prefix that runs a process in a private
  mount namespace (`unshare`) where /etc/hosts is a file the test wrote, so a
  made-up name resolves to the loopback addresses the test chose, in that
  order, for every resolver that reads /etc/hosts (glibc's getaddrinfo and
  gRPC's c-ares alike).
"""
import os
import select
import socket
import subprocess


class Blackhole:
    """`host`:`port` where connects hang: a listener with backlog 0 and its one queue slot taken."""

    def __init__(self, host="127.0.0.1", port=0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.host, self.port = host, self.address[1]
        self.family = family
        self.fillers = []
        for _ in range(8):   # Linux queues backlog + 1 connections; a few more is plenty
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(self.address)
            self.fillers.append(sock)
            # A filler that does not connect at once proves the queue is full.
            _, writable, _ = select.select([], [sock], [], 0.3)
            if not writable:
                return
        self.close()
        raise RuntimeError(f"cannot fill the accept queue of {host}:{self.port}")

    def close(self):
        for sock in self.fillers:
            sock.close()
        self.listener.close()


def namespaces_work():
    """True when `unshare` can make a mount namespace here (as root, or through a user namespace)."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def hosts_namespace(hosts_path):
    """The command prefix that runs a command with `hosts_path` bind-mounted on /etc/hosts."""
    return ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', os.fspath(hosts_path)]
