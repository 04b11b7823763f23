"""The front door end to end: PROXY protocol headers and TLS for clients, on a real pplex process.

Real sockets on 127.0.0.1, a real gRPC echo worker, clients that play a load
balancer (tests/proxyheaders.py writes the headers from the spec) and TLS
clients on Python's `ssl` with certificates made per test (tests/tlsutil.py).
"""
import os
import shutil
import signal
import socket
import ssl

import pytest

from tests import proxyheaders as pp
from tests.helpers import TRANSPORTS, Client, wait_for
from tests.tlsutil import make_certs

LB = ["127.0.0.1"]   # the trusted "load balancer": the test's own clients


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "certs")


@pytest.fixture
def worker(start_worker):
    return start_worker()


def start(start_pplex, worker, plugins=None, **server):
    config = {"server": server, "upstream": [{"host": "127.0.0.1", "port": worker.port}]}
    if plugins is not None:
        config["plugins"] = plugins
    pplex = start_pplex(config=config)
    pplex.wait_ready_upstreams(1)
    return pplex


def proxied(pplex, header):
    client = pplex.client()
    client.send(header)
    return client


def echoes(client, payload=b"ping\n"):
    client.send(payload)
    return client.recv_line() + b"\n" == payload


def remotes(pplex):
    return sorted(c["remote"] for c in pplex.admin("GET", "/connections")[1]["connections"])


def front_door(pplex, kind):
    return pplex.stats()["front_door"].get(kind, 0)


class TlsClient:
    """A blocking TLS client on Python's ssl, optionally after a PROXY header in plaintext."""

    def __init__(self, port, ca, cert=None, key=None, header=b"", server_name="localhost"):
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            if header:
                raw.sendall(header)
            self.sock = context.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        self.buffer = b""

    def round_trip(self, payload=b"over TLS\n"):
        self.sock.sendall(payload)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed with {self.buffer!r} unread")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def refused(self):
        """True when the server ends the connection instead of answering (TLS 1.3 refuses a client
        certificate after the client's side of the handshake is done)."""
        try:
            self.sock.sendall(b"anyone there?\n")
            return self.sock.recv(100) == b""
        except (ssl.SSLError, ConnectionError):
            return True

    def close(self):
        self.sock.close()


def tls_server(certs, **extra):
    return {"cert_file": certs.server_cert, "key_file": certs.server_key, **extra}


# -- PROXY protocol --------------------------------------------------------------------------
def test_proxy_v1_sets_the_client_address_for_connections_the_access_log_and_auth_allow(start_pplex, worker):
    plugins = {"access_log": {}, "auth_allow": {"deny": ["198.51.100.0/24"]}}
    pplex = start(start_pplex, worker, plugins, proxy_protocol="v1", proxy_protocol_from=LB)
    client = proxied(pplex, pp.v1(("203.0.113.7", 51234), ("192.0.2.1", 7999)) + b"first\n")
    assert client.recv_line() == b"first"   # the bytes after the header reached the worker untouched
    assert remotes(pplex) == ["203.0.113.7:51234"]
    assert "remote=203.0.113.7:51234" in pplex.log()
    # auth_allow judges the address the header carries, not the load balancer's (127.0.0.1).
    denied = proxied(pplex, pp.v1(("198.51.100.9", 4000), ("192.0.2.1", 7999)) + b"let me in\n")
    assert denied.is_closed_by_peer()
    assert pplex.stats()["connections_refused"] == 1
    assert echoes(client)
    client.close()
    wait_for(lambda: "close uuid=" in pplex.log(), message="the access log's close line")
    assert [line for line in pplex.log().splitlines() if "close uuid=" in line][0].count("203.0.113.7:51234")
    assert worker.count() == 2   # "first" and "ping": nothing of the denied client


def test_proxy_v2_with_tlvs_and_an_ipv6_source_sets_the_client_address(start_pplex, worker):
    pplex = start(start_pplex, worker, proxy_protocol="v2", proxy_protocol_from=LB)
    tlvs = [pp.tlv(0x02, b"game.example"), pp.tlv(0x05, b"lb-request-17"),
            pp.ssl_tlv(subs=[(0x21, b"TLSv1.3"), (0x22, b"player-1")]), pp.tlv(0xE0, b"\x01\x02")]
    header = pp.v2(("2001:db8::7", 40000), ("2001:db8::1", 7999), family="inet6", tlvs=tlvs, crc=True)
    client = proxied(pplex, header)
    assert echoes(client)
    v4 = proxied(pplex, pp.v2(("203.0.113.9", 1234), ("192.0.2.1", 7999)))
    assert echoes(v4)
    assert remotes(pplex) == ["203.0.113.9:1234", "[2001:db8::7]:40000"]
    # A LOCAL header (a load balancer's own health check) keeps the socket's address.
    local = proxied(pplex, pp.v2(command="LOCAL", family="unspec", transport="unspec"))
    assert echoes(local)
    assert sum(r.startswith("127.0.0.1:") for r in remotes(pplex)) == 1


def test_a_client_outside_proxy_protocol_from_is_closed(start_pplex, worker):
    pplex = start(start_pplex, worker, proxy_protocol="any", proxy_protocol_from=["192.0.2.0/24"])
    client = proxied(pplex, pp.v1(("203.0.113.7", 51234), ("192.0.2.1", 7999)) + b"hello\n")
    assert client.is_closed_by_peer()
    assert front_door(pplex, "proxy_untrusted") == 1
    assert pplex.stats()["connections_opened"] == 0 and worker.count() == 0


def test_a_slow_or_malformed_header_closes_that_client_alone(start_pplex, worker):
    pplex = start(start_pplex, worker, proxy_protocol="any", proxy_protocol_from=LB, proxy_protocol_timeout=0.5)
    good = proxied(pplex, pp.v1(("203.0.113.7", 51234), ("192.0.2.1", 7999)))
    slow = proxied(pplex, b"PROXY TCP4 203.0.113.8 ")
    malformed = proxied(pplex, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert malformed.is_closed_by_peer(timeout=5)
    assert echoes(good)   # while the slow one is still waiting for its deadline
    assert slow.is_closed_by_peer(timeout=5)
    assert echoes(good)
    stats = pplex.stats()
    assert stats["front_door"] == {"proxy_malformed": 1, "proxy_timeout": 1}
    assert stats["connections_open"] == 1
    assert "bad PROXY header: not a PROXY v1 or v2 header" in pplex.log()
    assert "no whole PROXY header within 0.5 s" in pplex.log()


def test_arrivals_count_against_max_connections(start_pplex, worker):
    pplex = start(start_pplex, worker, proxy_protocol="v1", proxy_protocol_from=LB, max_connections=2,
                  proxy_protocol_timeout=1)
    waiting = proxied(pplex, b"PROXY ")           # holds a slot until its deadline
    opened = proxied(pplex, pp.v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
    assert echoes(opened)
    third = proxied(pplex, pp.v1(("203.0.113.8", 1), ("192.0.2.1", 2)))
    # Not accepted while two slots are taken; accepted once the waiting one is closed at its deadline.
    assert waiting.is_closed_by_peer(timeout=5)
    assert echoes(third)
    assert remotes(pplex) == ["203.0.113.7:1", "203.0.113.8:1"]


# -- TLS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tls_client_round_trips_and_shows_its_version(start_pplex, worker, certs):
    pplex = start(start_pplex, worker, tls=tls_server(certs))
    client = TlsClient(pplex.port, certs.ca)
    assert client.round_trip(b"over TLS\n") == b"over TLS\n"
    assert client.round_trip(b"x" * 200_000 + b"\n") == b"x" * 200_000 + b"\n"
    [conn] = pplex.admin("GET", "/connections")[1]["connections"]
    assert conn["tls_version"] == "TLSv1.3" and conn["remote"].startswith("127.0.0.1:")
    client.close()
    wait_for(lambda: pplex.stats()["connections_open"] == 0, message="the client's close")
    assert pplex.stats()["closes"] == {"client_closed": 1}


def test_with_ca_file_a_client_needs_a_certificate_the_ca_signed(start_pplex, worker, certs):
    pplex = start(start_pplex, worker, tls=tls_server(certs, ca_file=certs.ca))
    good = TlsClient(pplex.port, certs.ca, certs.client_cert, certs.client_key)
    assert good.round_trip() == b"over TLS\n"
    assert TlsClient(pplex.port, certs.ca).refused()
    assert TlsClient(pplex.port, certs.ca, certs.other_client_cert, certs.other_client_key).refused()
    assert good.round_trip() == b"over TLS\n"
    wait_for(lambda: front_door(pplex, "tls_handshake") == 2, message="two failed handshakes counted")
    assert pplex.stats()["connections_opened"] == 1 and worker.count() == 2
    # One line per kind of failure per 10 s: the second refusal is counted, not logged.
    lines = [line for line in pplex.log().splitlines() if "closed before it was open" in line]
    assert len(lines) == 1 and lines[0].endswith("(tls_handshake): TLS: the peer sent no certificate and one "
                                                 "is required")


def test_a_silent_or_plaintext_client_at_the_tls_port_is_closed_alone(start_pplex, worker, certs):
    pplex = start(start_pplex, worker, tls=tls_server(certs), tls_handshake_timeout=0.5)
    silent = pplex.client()
    plaintext = pplex.client()
    plaintext.send(b"hello in the clear\n")
    good = TlsClient(pplex.port, certs.ca)
    assert plaintext.is_closed_by_peer()
    assert good.round_trip() == b"over TLS\n"
    assert silent.is_closed_by_peer(timeout=5)
    assert good.round_trip() == b"over TLS\n"
    assert pplex.stats()["front_door"] == {"tls_handshake": 1, "tls_timeout": 1}
    assert "handshake timed out after 0.5 s" in pplex.log()


def test_sighup_reloads_the_certificate_for_new_connections_and_open_ones_go_on(start_pplex, worker, tmp_path):
    first = make_certs(tmp_path / "first")
    second = make_certs(tmp_path / "second")   # another CA: a client can tell which certificate it got
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(first.server_cert, cert)
    shutil.copy(first.server_key, key)
    pplex = start(start_pplex, worker, tls={"cert_file": str(cert), "key_file": str(key)})
    before = TlsClient(pplex.port, first.ca)
    assert before.round_trip() == b"over TLS\n"

    shutil.copy(second.server_cert, cert)
    shutil.copy(second.server_key, key)
    os.kill(pplex.proc.pid, signal.SIGHUP)
    wait_for(lambda: "server.tls: reloaded" in pplex.log(), message="the reload's log line")
    after = TlsClient(pplex.port, second.ca)
    assert after.round_trip() == b"over TLS\n"
    with pytest.raises(ssl.SSLCertVerificationError):
        TlsClient(pplex.port, first.ca)
    assert before.round_trip(b"still here\n") == b"still here\n"

    # A reload that fails keeps serving the certificate it had, and says so.
    cert.write_text("not a certificate\n")
    os.kill(pplex.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving the previous certificate" in pplex.log(),
             message="the failed reload's log line")
    assert TlsClient(pplex.port, second.ca).round_trip() == b"over TLS\n"
    assert after.round_trip() == b"over TLS\n" and pplex.proc.poll() is None


def test_tls_after_a_proxy_header(start_pplex, worker, certs):
    pplex = start(start_pplex, worker, tls=tls_server(certs), proxy_protocol="any", proxy_protocol_from=LB)
    v2 = TlsClient(pplex.port, certs.ca, header=pp.v2(("203.0.113.7", 51234), ("192.0.2.1", 443),
                                                       tlvs=[pp.tlv(0x01, b"h2")]))
    v1 = TlsClient(pplex.port, certs.ca, header=pp.v1(("2001:db8::9", 4433), ("2001:db8::1", 443)))
    assert v2.round_trip() == b"over TLS\n" and v1.round_trip() == b"over TLS\n"
    connections = pplex.admin("GET", "/connections")[1]["connections"]
    assert sorted(c["remote"] for c in connections) == ["203.0.113.7:51234", "[2001:db8::9]:4433"]
    assert {c["tls_version"] for c in connections} == {"TLSv1.3"}
    # A TLS client that skips the header is not a PROXY header: closed alone.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TlsClient(pplex.port, certs.ca)
    assert front_door(pplex, "proxy_malformed") == 1
    assert v2.round_trip() == b"over TLS\n"


def test_a_bad_server_tls_setting_names_its_path(tmp_path, certs):
    from tests.helpers import PplexProcess
    config = {"server": {"tls": {"cert_file": certs.server_cert, "key_file": certs.other_client_key}}}
    with pytest.raises(AssertionError, match=r"exited with 2.*server\.tls\.cert_file: cannot load with key_file"):
        PplexProcess(tmp_path, config=config)
