"""TlsEngine, its contexts and its config shapes: real handshakes between two engines, bytes pumped in memory."""
import hashlib
import os
import socket
import ssl

import pytest
import voluptuous as vol

from pplex.tls import (
    ServerTls, TlsEngine, TlsError, handshake_timed_out, upstream_context, validate_server_tls,
    validate_upstream_tls)
from tests.tlsutil import Authority, make_certs, write_cert, write_key


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path)


def pump(client, server, rounds=50):
    """Move ciphertext both ways until neither side has any; return the plaintext each received."""
    got = {client: [], server: []}
    for _ in range(rounds):
        moved = False
        for sender, receiver in ((client, server), (server, client)):
            data = sender.data_to_send()
            if data:
                moved = True
                got[receiver].append(receiver.receive(data))
        if not moved:
            break
    return b"".join(got[client]), b"".join(got[server])


def pair(certs, client_spec=None, server_spec=None, host="127.0.0.1", alpn=("h2",)):
    """A client engine to a worker and a server engine playing the worker (offering `alpn`)."""
    client = upstream_context(client_spec or {"ca_file": certs.ca}, host).engine()
    server_tls = ServerTls(server_spec or {"cert_file": certs.server_cert, "key_file": certs.server_key})
    if alpn:
        server_tls.context.set_alpn_protocols(list(alpn))
    server = server_tls.engine()
    client.start()
    return client, server


def test_handshake_with_the_right_ca_agrees_on_h2_and_reports_what_was_agreed(certs):
    client, server = pair(certs, {"ca_file": certs.ca, "server_name": "localhost"})
    pump(client, server)
    assert client.established and server.established
    info = client.info()
    assert info["version"] == "TLSv1.3" and info["alpn"] == "h2"
    assert info["sni"] == "localhost"
    assert info["peer_subject"] == "O=pplex tests,CN=localhost"
    assert info["cipher"]
    assert server.info()["sni"] == "localhost"


def test_handshake_with_an_ip_literal_checks_the_ip_san(certs):
    client, server = pair(certs, {"ca_file": certs.ca}, host="::1")
    pump(client, server)
    assert client.established


def test_wrong_ca_fails_with_one_line_reason(certs):
    client, server = pair(certs, {"ca_file": certs.other_ca})
    with pytest.raises(TlsError) as caught:
        pump(client, server)
    assert str(caught.value) == "certificate verify failed: unable to get local issuer certificate"
    assert not client.established
    with pytest.raises(TlsError):   # a failed engine takes nothing more
        client.receive(b"x")


def test_a_name_the_certificate_does_not_carry_fails_verification(certs):
    client, server = pair(certs, {"ca_file": certs.ca, "server_name": "worker.example"})
    with pytest.raises(TlsError, match=r"^certificate verify failed: Hostname mismatch.*worker\.example"):
        pump(client, server)


def test_mtls_accepts_a_client_certificate_signed_by_the_ca(certs):
    client, server = pair(certs, {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key},
                          {"cert_file": certs.server_cert, "key_file": certs.server_key, "ca_file": certs.ca})
    client.send(b"hello")
    _, to_server = pump(client, server)
    assert to_server == b"hello"
    assert server.info()["peer_subject"] == "O=pplex tests,CN=pplex test client"


def test_mtls_refuses_a_client_without_a_certificate_on_both_sides(certs):
    client, server = pair(certs, None, {"cert_file": certs.server_cert, "key_file": certs.server_key,
                                        "ca_file": certs.ca})
    client.send(b"hello")
    with pytest.raises(TlsError) as server_side:
        for _ in range(5):
            server.receive(client.data_to_send())
            client.receive(server.data_to_send())
    assert str(server_side.value) == "the peer sent no certificate and one is required"
    # TLS 1.3: the client learns it from the server's alert, after its side of the handshake.
    with pytest.raises(TlsError, match=r"^the peer refused the TLS handshake: certificate required$"):
        client.receive(server.data_to_send())


def test_mtls_refuses_a_client_certificate_from_another_ca(certs):
    client, server = pair(certs, {"ca_file": certs.ca, "cert_file": certs.other_client_cert,
                                  "key_file": certs.other_client_key},
                          {"cert_file": certs.server_cert, "key_file": certs.server_key, "ca_file": certs.ca})
    with pytest.raises(TlsError, match="^certificate verify failed: unable to get local issuer certificate$"):
        pump(client, server)


def test_a_peer_that_does_not_agree_on_h2_is_refused(certs):
    client, server = pair(certs, alpn=("http/1.1",))
    with pytest.raises(TlsError, match="^peer did not agree on ALPN h2$"):
        pump(client, server)
    assert not client.established


def test_a_handshake_cut_in_the_middle_is_one_line(certs):
    client, server = pair(certs)
    server.receive(client.data_to_send())
    flight = server.data_to_send()
    client.receive(flight[: len(flight) // 2])
    assert not client.established
    with pytest.raises(TlsError, match="^the connection closed during the TLS handshake$"):
        client.receive_eof()


def test_a_peer_that_speaks_plaintext_is_named(certs):
    client, _ = pair(certs)
    with pytest.raises(TlsError, match="^the peer does not speak TLS"):
        client.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 100)


def test_close_notify_reaches_the_peer_and_nothing_is_sent_after(certs):
    client, server = pair(certs, {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key},
                          {"cert_file": certs.server_cert, "key_file": certs.server_key, "ca_file": certs.ca})
    pump(client, server)
    client.send(b"last words")
    client.close()
    assert server.receive(client.data_to_send()) == b"last words"
    assert server.peer_closed
    with pytest.raises(TlsError, match="after close_notify"):
        client.send(b"more")


def test_eof_after_the_handshake_is_a_close_not_an_error(certs):
    client, server = pair(certs)
    pump(client, server)
    client.receive_eof()
    assert client.peer_closed


def test_plaintext_sent_before_the_handshake_waits_and_is_counted(certs):
    client, server = pair(certs)
    client.send(b"early")
    assert client.buffered() >= len(b"early")
    _, to_server = pump(client, server)
    assert to_server == b"early"


def test_large_payloads_cross_both_ways_intact(certs):
    client, server = pair(certs)
    pump(client, server)
    up, down = os.urandom(3 * 1024 * 1024 + 17), os.urandom(2 * 1024 * 1024 + 5)
    client.send(up)
    server.send(down)
    to_client, to_server = pump(client, server)
    assert hashlib.sha256(to_server).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(to_client).digest() == hashlib.sha256(down).digest()


def test_engines_over_a_real_socketpair(certs):
    client, server = pair(certs)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payload = os.urandom(1024 * 1024)
    client.send(payload)
    received, out = [], {client: bytearray(), server: bytearray()}
    ends = {client: a, server: b}
    try:
        for _ in range(10_000):
            for engine in (client, server):
                out[engine] += engine.data_to_send()
                if out[engine]:
                    try:
                        sent = ends[engine].send(out[engine])
                        del out[engine][:sent]
                    except BlockingIOError:
                        pass
                try:
                    data = ends[engine].recv(65536)
                except BlockingIOError:
                    continue
                plain = engine.receive(data)
                if engine is server:
                    received.append(plain)
            if sum(map(len, received)) == len(payload):
                break
    finally:
        a.close()
        b.close()
    assert b"".join(received) == payload


def test_handshake_timed_out_is_one_line():
    assert str(handshake_timed_out(5)) == "handshake timed out after 5 s"


# -- the server context -------------------------------------------------------------------
def test_reload_serves_the_new_certificate_to_new_connections(certs, tmp_path):
    server_tls = ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key})
    before = server_tls.engine()
    second_ca = Authority("second CA")
    cert, key = second_ca.issue("localhost", ("localhost",))
    write_cert(certs.server_cert, cert)
    write_key(certs.server_key, key)
    server_tls.reload()
    # The engine made before the reload still has the old certificate; a new one has the new.
    for engine, ca in ((before, certs.ca), (server_tls.engine(), write_cert(tmp_path / "second.pem", second_ca.cert))):
        client = TlsEngine(ssl.create_default_context(cafile=ca), server_hostname="localhost")
        client.start()
        pump(client, engine)
        assert client.established


def test_a_failed_reload_keeps_the_current_certificate(certs):
    server_tls = ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key})
    current = server_tls.context
    with open(certs.server_cert, "w") as handle:
        handle.write("not a certificate")
    with pytest.raises(TlsError, match=r"^cert_file: cannot load .*server.pem and .*server.key: "):
        server_tls.reload()
    assert server_tls.context is current


def test_min_version_tls13_refuses_a_tls12_client(certs):
    server = ServerTls({"cert_file": certs.server_cert, "key_file": certs.server_key,
                        "min_version": "TLSv1.3"}).engine()
    context = ssl.create_default_context(cafile=certs.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = TlsEngine(context, server_hostname="localhost")
    client.start()
    with pytest.raises(TlsError, match="^TLS error: unsupported protocol$|^TLS error: no shared"):
        pump(client, server)


# -- config shapes --------------------------------------------------------------------------
def invalid(validate, value):
    with pytest.raises(vol.Invalid) as caught:
        validate(value)
    error = caught.value
    return ".".join(map(str, error.path)), error.error_message


def test_upstream_tls_shapes(certs):
    assert validate_upstream_tls(True) is True
    assert validate_upstream_tls(False) is None
    spec = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key,
            "server_name": "worker.internal"}
    assert validate_upstream_tls(spec) == spec
    assert invalid(validate_upstream_tls, "yes")[1].startswith("expected true, false or an object")


def test_upstream_tls_errors_name_the_key_and_the_file(certs, tmp_path):
    assert invalid(validate_upstream_tls, {"ca_file": str(tmp_path / "nope.pem")}) == ("ca_file", "no such file")
    assert invalid(validate_upstream_tls, {"cert_file": certs.client_cert}) == (
        "key_file", "cert_file and key_file go together")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    path, message = invalid(validate_upstream_tls, {"ca_file": str(garbage)})
    assert (path, message) == ("ca_file", "cannot load: no certificate or crl found")
    path, message = invalid(validate_upstream_tls, {"cert_file": certs.client_cert, "key_file": certs.server_key})
    assert (path, message) == ("cert_file", "cannot load with key_file: key values mismatch")
    assert invalid(validate_upstream_tls, {"insecure": True})[0] == "insecure"


def test_server_tls_shapes(certs):
    spec = {"cert_file": certs.server_cert, "key_file": certs.server_key, "ca_file": certs.ca,
            "min_version": "TLSv1.3"}
    assert validate_server_tls(spec) == spec
    assert invalid(validate_server_tls, {"cert_file": certs.server_cert})[0] == "key_file"
    assert invalid(validate_server_tls, {**spec, "min_version": "SSLv3"}) == (
        "min_version", "expected one of TLSv1.2, TLSv1.3")
