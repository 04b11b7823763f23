"""TLS and mTLS to workers, end to end: a real pplex process and real Python grpcio workers serving TLS.

Certificates are made per test (tests/tlsutil.py). Every test runs on both
transports: grpcio's own TLS, and the in-reactor engine on h2 (pplex/tlssock.py).
"""
import socket

import grpc
import pytest

from tests.helpers import TRANSPORTS, RecordingWorker, wait_for
from tests.tlsutil import make_certs


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "certs")


@pytest.fixture
def tls_worker(certs):
    """Start a TLS worker: `tls_worker(require_client_cert=False)`; stopped after the test."""
    started = []

    def start(require_client_cert=False):
        credentials = grpc.ssl_server_credentials(
            [(certs.read("server_key"), certs.read("server_cert"))],
            root_certificates=certs.read("ca") if require_client_cert else None,
            require_client_auth=require_client_cert)
        worker = RecordingWorker(f"tls{len(started)}").serve(credentials=credentials)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(grace=0)


def config_with(worker, tls, ready_timeout=2):
    return {"upstream": [{"host": "127.0.0.1", "port": worker.port, "ready_timeout": ready_timeout, "tls": tls}]}


def round_trip(pplex, payload=b"over TLS\n"):
    client = pplex.client()
    try:
        client.send(payload)
        return client.recv_line() + b"\n"
    finally:
        client.close()


def only_upstream(pplex):
    return pplex.upstreams()[0]


def settled_error(pplex):
    """The upstream's last_error once it has one (it stays out of rotation meanwhile)."""
    upstream = wait_for(lambda: (u := only_upstream(pplex))["last_error"] and u, timeout=5,
                        message=f"a last_error; log:\n{pplex.log()[-2000:]}")
    assert upstream["state"] != "ready"
    return upstream["last_error"]


def test_round_trip_with_the_right_ca(start_pplex, tls_worker, certs):
    worker = tls_worker()
    pplex = start_pplex(config=config_with(worker, {"ca_file": certs.ca}))
    pplex.wait_ready_upstreams(1, timeout=5)
    assert round_trip(pplex) == b"over TLS\n"
    assert worker.count() == 1
    big = bytes(range(32, 127)) * 4000 + b"\n"   # 380 KB: many records, frames and flow-control windows
    assert round_trip(pplex, big) == big


def test_server_name_is_the_name_checked_and_a_wrong_one_is_refused(start_pplex, tls_worker, certs):
    worker = tls_worker()
    good = start_pplex(config=config_with(worker, {"ca_file": certs.ca, "server_name": "localhost"}))
    bad = start_pplex(config=config_with(worker, {"ca_file": certs.ca, "server_name": "worker.example"}))
    good.wait_ready_upstreams(1, timeout=5)
    assert round_trip(good) == b"over TLS\n"
    assert settled_error(bad) == ("certificate verify failed: Hostname mismatch, "
                                  "certificate is not valid for 'worker.example'.")


def test_wrong_ca_keeps_the_worker_out_of_rotation_with_one_line(start_pplex, tls_worker, certs):
    worker = tls_worker()
    pplex = start_pplex(config=config_with(worker, {"ca_file": certs.other_ca}))
    assert settled_error(pplex) == "certificate verify failed: unable to get local issuer certificate"
    # Still out after more probes, still the same one line.
    wait_for(lambda: "not ready: certificate verify failed" in pplex.log(), timeout=5)
    upstream = only_upstream(pplex)
    assert upstream["state"] != "ready"
    assert upstream["last_error"] == "certificate verify failed: unable to get local issuer certificate"
    assert worker.stream_count() == 0


def test_tls_true_uses_the_system_roots(start_pplex, tls_worker, certs):
    worker = tls_worker()
    # SSL_CERT_FILE names the system's CA bundle for OpenSSL; here it is the test CA.
    trusting = start_pplex(config=config_with(worker, True), env={"SSL_CERT_FILE": certs.ca})
    trusting.wait_ready_upstreams(1, timeout=5)
    assert round_trip(trusting) == b"over TLS\n"
    # With the machine's real roots, the test CA is unknown: verification is on.
    strict = start_pplex(config=config_with(worker, True), env={"SSL_CERT_FILE": certs.other_ca})
    assert settled_error(strict).startswith("certificate verify failed: ")


def test_mtls_worker_accepts_pplex_certificate_and_refuses_a_connection_without_one(start_pplex, tls_worker,
                                                                                    certs):
    worker = tls_worker(require_client_cert=True)
    with_cert = start_pplex(config=config_with(
        worker, {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}))
    with_cert.wait_ready_upstreams(1, timeout=5)
    assert round_trip(with_cert) == b"over TLS\n"
    streams = worker.stream_count()
    without = start_pplex(config=config_with(worker, {"ca_file": certs.ca}))
    settled_error(without)
    stranger = start_pplex(config=config_with(
        worker, {"ca_file": certs.ca, "cert_file": certs.other_client_cert, "key_file": certs.other_client_key}))
    settled_error(stranger)
    assert only_upstream(without)["state"] != "ready" and only_upstream(stranger)["state"] != "ready"
    assert worker.stream_count() == streams   # neither opened a data stream


def test_admin_api_adds_a_tls_upstream_and_names_a_bad_file(start_pplex, tls_worker, certs, tmp_path):
    worker = tls_worker()
    pplex = start_pplex()
    status, body = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port,
                                                         "tls": {"ca_file": str(tmp_path / "missing.pem")}})
    assert (status, body["field"], body["error"]) == (422, "tls.ca_file", "tls.ca_file: no such file")
    status, body = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port,
                                                         "tls": {"ca_file": certs.ca}})
    assert status == 201 and body["tls"] == {"ca_file": certs.ca}
    pplex.wait_ready_upstreams(1, timeout=5)
    assert round_trip(pplex) == b"over TLS\n"


def test_a_worker_that_never_answers_the_handshake_stays_out_within_the_ready_deadline(start_pplex, transport):
    with socket.socket() as silent:   # connects complete (the kernel's accept queue); nothing is ever said
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pplex = start_pplex(config={"upstream": [{"host": "127.0.0.1", "port": silent.getsockname()[1],
                                                  "ready_timeout": 0.5, "tls": True}]})
        error = settled_error(pplex)
        if transport == "h2":
            assert error == "DEADLINE_EXCEEDED: no ready answer within 0.5 s (TLS handshake)"
        else:   # grpcio's own words: its handshake gave up when the call's deadline closed the endpoint
            assert "Handshake" in error
