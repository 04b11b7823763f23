"""The front door (pplex/frontdoor.py): arrivals on real loopback sockets, a real reactor, a stand-in proxy.

The stand-in opens clients the way `Proxy._open` does (the arrival's class,
`hand_over`, `deliver`) and records what reaches it, so each test sees what a
client looks like once it is open: its address, its facts, its first bytes.
"""
import socket
import ssl
import threading

import pytest

from pplex import limits
from pplex.connection import Connection
from pplex.errors import ConfigError
from pplex.frontdoor import FrontDoor
from pplex.logs import FAULTS
from pplex.reactor import Reactor
from pplex.stats import Stats
from tests import proxyheaders as pp
from tests.tlsutil import make_certs
from tests.helpers import run_until

SERVER = {"proxy_protocol": "off", "proxy_protocol_from": [], "proxy_protocol_timeout": 5,
          "tls_handshake_timeout": 5}


class StandIn:
    """What the front door needs of the proxy: open a client, and take its bytes."""

    def __init__(self, reactor, refuse=False):
        self.reactor = reactor
        self.refuse = refuse
        self.opened = []
        self.got = bytearray()   # the clients' bytes, as the message path would receive them
        self.eofs = 0
        self.dirty_clients = []
        self.client_output_bytes = 0

    def open(self, sock, peer, arrival=None):
        if self.refuse:
            sock.close()
            return None
        conn = arrival.client_class(self, sock, f"uuid-{len(self.opened)}", peer, self.reactor.clock())
        arrival.hand_over(conn)
        self.opened.append(conn)
        arrival.deliver(conn)
        return conn

    def received(self, conn, data):
        self.got += data

    def client_eof(self, conn):
        self.eofs += 1


class Listener:
    def __init__(self):
        self.left = 0

    def client_left(self):
        self.left += 1


@pytest.fixture
def reactor():
    loop = Reactor()
    yield loop
    loop.close()


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path)


def door_for(reactor, refuse=False, **server):
    proxy = StandIn(reactor, refuse)
    door = FrontDoor(reactor, {**SERVER, **server}, Connection, proxy.open, Stats())
    door.listener = Listener()
    return door, proxy


def accept(door, peer=None):
    """(client socket, the door's peer) after handing the server side to the door as the listener would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        sock, address = listener.accept()
    door.on_accept(sock, peer or address)
    return client


def closed_by_door(client):
    client.settimeout(5)
    try:
        return client.recv(100) == b""
    except ConnectionResetError:
        return True


def test_with_neither_setting_the_listener_calls_the_proxy_itself():
    door, proxy = door_for(Reactor())
    conns = {}
    assert door.on_accept == proxy.open and door.counter(conns) == conns.__len__
    # Plain clients keep their class and size; only the door's own classes carry the new slots.
    assert door.proxied_class.__basicsize__ > Connection.__basicsize__
    assert door.tls_class.__basicsize__ > Connection.__basicsize__
    assert Connection.tls is None and Connection.tls_facts is None and Connection.proxy_header is None


def test_a_v2_header_fed_byte_by_byte_gives_the_address_the_facts_and_the_bytes_after_it(reactor):
    door, proxy = door_for(reactor, proxy_protocol="any", proxy_protocol_from=["127.0.0.0/8"])
    client = accept(door)
    header = pp.v2(("203.0.113.7", 51234), ("192.0.2.1", 7999),
                   tlvs=[pp.tlv(0x02, b"game.example"), pp.ssl_tlv(subs=[(0x22, b"player-1")])], crc=True)
    for byte in header[:-1]:
        client.send(bytes([byte]))
        run_until(reactor, lambda: True)
    assert not proxy.opened and door.counter({})() == 1   # still arriving: it holds a slot
    client.send(header[-1:] + b"\x00binary after the header\r\n")
    run_until(reactor, lambda: proxy.opened)
    [conn] = proxy.opened
    assert conn.peer == ("203.0.113.7", 51234) and type(conn).__name__ == "ProxiedClient"
    assert conn.proxy_facts["proxy_authority"] == "game.example"
    assert conn.proxy_facts["proxy_ssl_cn"] == "player-1" and conn.proxy_facts["proxy_version"] == "2"
    assert conn.tls is None and conn.tls_facts is None
    run_until(reactor, lambda: proxy.got == b"\x00binary after the header\r\n")
    assert conn.bytes_in == len(proxy.got)
    assert door.counter({})() == 0 and door.listener.left == 0   # it became a client: no slot freed


def test_a_peer_outside_the_trusted_networks_is_closed_at_once(reactor):
    door, proxy = door_for(reactor, proxy_protocol="v1", proxy_protocol_from=["10.0.0.0/8"])
    client = accept(door)
    client.send(pp.v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
    assert closed_by_door(client)
    assert door.stats.front_door == {"proxy_untrusted": 1} and not door.arriving and not proxy.opened


@pytest.mark.parametrize("sent, kind", [(b"PROXY TCP4 203.0.113.7", "proxy_timeout"),
                                        (b"PROXY TCP9 x\r\n", "proxy_malformed"),
                                        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "proxy_malformed"),
                                        (b"", "proxy_timeout")])
def test_a_slow_or_bad_header_closes_that_client_and_frees_its_slot(reactor, sent, kind):
    door, proxy = door_for(reactor, proxy_protocol="any", proxy_protocol_from=["127.0.0.1"],
                           proxy_protocol_timeout=0.2)
    client = accept(door)
    other = accept(door)
    if sent:
        client.send(sent)
    other.send(pp.v1(("203.0.113.8", 1), ("192.0.2.1", 2)))
    run_until(reactor, lambda: door.stats.front_door)
    assert door.stats.front_door == {kind: 1} and door.listener.left == 1
    assert closed_by_door(client)
    assert [conn.peer for conn in proxy.opened] == [("203.0.113.8", 1)]   # the other one, undisturbed


def test_a_client_that_leaves_or_is_refused_by_the_accept_rules_frees_its_slot(reactor):
    door, proxy = door_for(reactor, proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"])
    client = accept(door)
    client.close()
    run_until(reactor, lambda: door.stats.front_door)
    assert door.stats.front_door == {"client_left": 1} and door.listener.left == 1
    proxy.refuse = True
    client = accept(door)
    client.send(pp.v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
    run_until(reactor, lambda: door.listener.left == 2)
    assert closed_by_door(client) and not door.arriving


def tls_client(port, ca, header=b"", payload=b"hello\n", results=None):
    """A blocking Python ssl client in a thread: header, handshake, payload, then read until EOF."""
    def run():
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            raw.sendall(header)
            tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
            tls.sendall(payload)
            results.append(tls.recv(100))
            tls.close()
        except Exception as error:  # the test thread asserts on it
            results.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_tls_after_a_proxy_header_opens_a_tls_client_with_its_facts(reactor, certs):
    door, proxy = door_for(reactor, proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"],
                           tls={"cert_file": certs.server_cert, "key_file": certs.server_key})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        results = []
        thread = tls_client(listener.getsockname()[1], certs.ca, pp.v1(("203.0.113.7", 9), ("192.0.2.1", 443)),
                            results=results)
        sock, address = listener.accept()
        door.on_accept(sock, address)
        run_until(reactor, lambda: proxy.got == b"hello\n")
    [conn] = proxy.opened
    assert type(conn).__name__ == "TlsClient" and conn.peer == ("203.0.113.7", 9)
    assert conn.tls_facts["tls_version"] == "TLSv1.3" and conn.tls_facts["tls_sni"] == "localhost"
    assert conn.tls_facts["tls_cipher"] and "tls_client_subject" not in conn.tls_facts
    assert conn.proxy_facts["proxy_source_addr"] == "203.0.113.7"
    conn.write(b"world\n")
    run_until(reactor, lambda: results)
    assert results == [b"world\n"]
    thread.join(5)


def test_a_client_that_sends_too_much_before_it_is_open_is_closed(reactor, certs):
    door, proxy = door_for(reactor, tls={"cert_file": certs.server_cert, "key_file": certs.server_key})
    client = accept(door)
    # A ClientHello that says it is 100,000 bytes long, sent in records: OpenSSL keeps waiting for it.
    message = b"\x01" + (100_000).to_bytes(3, "big") + b"\x03\x03" + bytes(16_000)
    records = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    body = bytes(16_000)
    for _ in range(4):
        records += b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    assert len(records) > limits.FRONT_DOOR_MAX_BYTES
    client.setblocking(False)
    sent = 0
    while sent < len(records) and not door.stats.front_door:
        try:
            sent += client.send(records[sent:])
        except BlockingIOError:
            pass
        run_until(reactor, lambda: True)
    run_until(reactor, lambda: door.stats.front_door)
    assert door.stats.front_door == {"too_large": 1} and not proxy.opened


def test_an_error_while_opening_closes_that_client_alone_and_is_counted(reactor):
    door, proxy = door_for(reactor, proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"])
    before = FAULTS.snapshot().get("front door", 0)
    proxy.open = lambda sock, peer, arrival: 1 / 0
    door.open_client = proxy.open
    client = accept(door)
    client.send(pp.v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
    run_until(reactor, lambda: door.listener.left == 1)
    assert closed_by_door(client) and not door.arriving
    assert door.stats.front_door == {"internal_error": 1}
    assert FAULTS.snapshot()["front door"] == before + 1


def test_close_all_closes_every_arrival(reactor):
    door, proxy = door_for(reactor, proxy_protocol="v2", proxy_protocol_from=["127.0.0.1"])
    clients = [accept(door) for _ in range(3)]
    assert door.counter({"a": 1})() == 4
    door.close_all()
    assert not door.arriving and all(closed_by_door(c) for c in clients)


def test_reload_keeps_the_certificate_when_the_files_do_not_load(reactor, certs, tmp_path, caplog):
    spec = {"cert_file": str(tmp_path / "live.pem"), "key_file": certs.server_key}
    (tmp_path / "live.pem").write_bytes(open(certs.server_cert, "rb").read())
    door, _ = door_for(reactor, tls=spec)
    before = door.tls.context
    assert door.reload_tls() and door.tls.context is not before
    current = door.tls.context
    (tmp_path / "live.pem").write_text("garbage")
    assert not door.reload_tls() and door.tls.context is current
    assert "reload failed, still serving the previous certificate: cert_file: cannot load" in caplog.text
    door_without, _ = door_for(reactor)
    assert not door_without.reload_tls()


def test_tls_files_gone_since_validation_are_a_config_error(reactor, tmp_path, certs):
    with pytest.raises(ConfigError, match=r"^server\.tls\.key_file: cannot load .*missing\.key"):
        door_for(reactor, tls={"cert_file": certs.server_cert, "key_file": str(tmp_path / "missing.key")})
