"""The TLS layer of the buffered socket (pplex/tlssock.py): two TlsSockets on a loopback pair, one reactor.

Each end is a real nonblocking TCP socket on 127.0.0.1 driven by a real
Reactor on the test thread; one end runs a server engine (ServerTls), the
other a client engine, so every handshake, record and alert is OpenSSL's own.
"""
import socket
import ssl

import pytest

from pplex.bufsock import BufferedSocket
from pplex.reactor import READ, Reactor
from pplex.tls import ServerTls, TlsEngine, TlsTimeout
from pplex.tlssock import TlsSocket
from tests.tlsutil import make_certs
from tests.helpers import run_until


class Peer(TlsSocket, BufferedSocket):
    """An owner that records what the layer tells it."""

    write_high = 64 * 1024
    write_low = 16 * 1024

    def __init__(self, reactor, sock):
        BufferedSocket.__init__(self, reactor, sock)
        self.tls = None
        self.tls_timer = None
        self.received = bytearray()
        self.happened = []
        self.accounted = 0   # the sum of buffered_changed: what global accounting would hold

    def tls_established(self):
        self.happened.append("established")

    def tls_received(self, data):
        self.received += data

    def tls_closed(self):
        self.happened.append("closed")
        self.close_socket()

    def tls_failed(self, error):
        self.happened.append(("failed", type(error), str(error)))
        self.close_socket()

    def read_failed(self, error):
        self.happened.append("read_failed")
        self.close_socket()

    def pause_writing(self):
        self.happened.append("pause")

    def resume_writing(self):
        self.happened.append("resume")

    def buffered_changed(self, delta):
        self.accounted += delta

    def failure(self):
        return next((h for h in self.happened if isinstance(h, tuple)), None)


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path)


@pytest.fixture
def reactor():
    loop = Reactor()
    yield loop
    loop.close()


def loopback_pair():
    """(server side, client side), with small kernel buffers so a few hundred KiB fill them."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    return server, client


def client_engine(ca):
    return TlsEngine(ssl.create_default_context(cafile=ca), server_hostname="localhost")


def tls_pair(reactor, certs, ca=None, start=True):
    """(server, client) Peers on a loopback pair, both reading; handshakes started when `start`."""
    a, b = loopback_pair()
    server, client = Peer(reactor, a), Peer(reactor, b)
    server.set_events(READ)
    client.set_events(READ)
    if start:
        server.start_tls(ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key}).engine(), 5)
        client.start_tls(client_engine(ca or certs.ca), 5)
    return server, client


def established(*peers):
    return lambda: all("established" in p.happened for p in peers)


def test_plaintext_written_before_the_handshake_waits_is_counted_and_then_goes(reactor, certs):
    server, client = tls_pair(reactor, certs)
    client.write(b"early bytes")
    assert client.buffered() == 11 and client.accounted == 11
    run_until(reactor, lambda: server.received == b"early bytes")
    assert "established" in client.happened and "established" in server.happened
    assert client.accounted == 0 and client.buffered() == 0
    server.write(b"an answer")
    run_until(reactor, lambda: client.received == b"an answer")
    assert server.tls_timer is None and client.tls_timer is None   # the deadlines are cancelled


def test_large_writes_pause_and_resume_on_the_ciphertext_the_socket_holds(reactor, certs):
    server, client = tls_pair(reactor, certs)
    run_until(reactor, established(server, client))
    server.pause_reading()
    payload = bytes(range(256)) * 8192   # 2 MiB: more than the kernel's buffers take
    client.write(payload)
    assert "pause" in client.happened
    assert client.buffered() > client.write_high and client.accounted == client.buffered()
    assert client.buffered() > len(payload) // 2   # what waits is ciphertext (records carry overhead)
    server.resume_reading()
    run_until(reactor, lambda: len(server.received) == len(payload))
    assert bytes(server.received) == payload
    assert "resume" in client.happened and client.accounted == 0 and client.buffered() == 0


def test_a_handshake_that_does_not_end_in_time_fails_in_one_line(reactor, certs):
    server, silent = tls_pair(reactor, certs, start=False)
    server.start_tls(ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key}).engine(), 0.2)
    run_until(reactor, lambda: server.closed)
    assert server.failure() == ("failed", TlsTimeout, "handshake timed out after 0.2 s")
    silent.close_socket()


def test_a_clean_close_sends_close_notify_and_a_reset_sends_nothing(reactor, certs):
    server, client = tls_pair(reactor, certs)
    run_until(reactor, established(server, client))
    client.close_socket()
    run_until(reactor, lambda: server.closed)
    assert server.happened[-1] == "closed"
    server, client = tls_pair(reactor, certs)
    run_until(reactor, established(server, client))
    client.write(b"unread by the peer")
    client.close_socket(reset=True)
    run_until(reactor, lambda: server.closed)
    assert server.happened[-1] == "read_failed" and client.accounted == 0


def test_a_certificate_from_another_ca_fails_both_sides_in_one_line(reactor, certs):
    server, client = tls_pair(reactor, certs, ca=certs.other_ca)
    client.write(b"never sent")
    run_until(reactor, lambda: server.closed and client.closed)
    assert client.failure()[2] == "certificate verify failed: unable to get local issuer certificate"
    assert server.failure()[2] == "the peer refused the TLS handshake: unknown ca"   # the alert we sent
    assert client.accounted == 0 and not server.received


def test_records_that_do_not_decrypt_end_the_connection_with_one_line(reactor, certs):
    server, client = tls_pair(reactor, certs)
    run_until(reactor, established(server, client))
    client.sock.send(b"\x17\x03\x03\x00\x20" + bytes(32))   # application data that is not
    run_until(reactor, lambda: server.closed)
    kind, _, text = server.failure()
    assert text.startswith("TLS error: ") and "\n" not in text
    run_until(reactor, lambda: client.closed)   # the alert told the client why
    assert client.failure()[2].startswith("the peer refused the TLS handshake: ")


def test_a_peer_that_speaks_plaintext_is_named(reactor, certs):
    server, client = tls_pair(reactor, certs, start=False)
    server.start_tls(ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key}).engine(), 5)
    client.sock.send(b"GET / HTTP/1.1\r\n\r\n")
    run_until(reactor, lambda: server.closed)
    assert server.failure()[2] == "TLS error: http request"
    client.close_socket()


def test_data_that_came_before_the_handshake_was_started_is_fed_first(reactor, certs):
    """start_tls(data=...): the ciphertext read with a PROXY header is the handshake's first bytes."""
    server, client = tls_pair(reactor, certs, start=False)
    server.set_events(0)   # the bytes stay in the socket until the test reads them
    client.start_tls(client_engine(certs.ca), 5)
    run_until(reactor, lambda: server.sock.recv(1, socket.MSG_PEEK))
    hello = server.sock.recv(65536)
    server.start_tls(ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key}).engine(), 5,
                     data=hello)
    server.set_events(READ)
    run_until(reactor, established(server, client))
    client.write(b"after all")
    run_until(reactor, lambda: server.received == b"after all")
