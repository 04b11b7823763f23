"""auth_token and auth_allow end to end: real pplex, real sockets, a real gRPC worker."""
import json
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, wait_for


def upstream_args(*workers):
    return [a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")]


def token_config(**settings):
    return {"plugins": {"framing_line": {}, "auth_token": {"tokens": ["alpha", "s3cret"], **settings}}}


def test_a_right_token_authenticates_and_is_not_forwarded(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker), config=token_config())
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"s3cret\nhello\n")  # the token and a first message in one read
    assert client.recv_line() == b"hello"
    client.send(b"s3cret\n")  # once in, a token is a message like any other
    assert client.recv_line() == b"s3cret"
    assert [payload for _, payload in worker.received] == [b"hello", b"s3cret"]


def test_a_wrong_token_closes_the_client_and_nothing_reaches_a_worker(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker), config=token_config())
    pplex.wait_ready_upstreams(1)
    bad = pplex.client()
    bad.send(b"s3cre\nsneaky message\n")
    assert bad.is_closed_by_peer(timeout=5)
    # A good client afterwards: what reaches the worker is its message alone.
    good = pplex.client()
    good.send(b"alpha\nmine\n")
    assert good.recv_line() == b"mine"
    assert [payload for _, payload in worker.received] == [b"mine"]
    assert pplex.stats()["drops"].get("auth_rejected") == 1
    assert "authentication failed" in pplex.log()


def test_a_token_that_never_comes_closes_the_client_after_auth_timeout(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker), config=token_config(auth_timeout=0.5))
    pplex.wait_ready_upstreams(1)
    patient = pplex.client()
    patient.send(b"alpha\n")
    silent = pplex.client()
    started = time.monotonic()
    assert silent.is_closed_by_peer(timeout=5)
    took = time.monotonic() - started
    assert 0.3 < took < 3, took
    wait_for(lambda: "no token within 0.5 s" in pplex.log(), message="the reason in the log")
    # The authenticated client outlives the deadline (its own passed before the silent one's).
    assert not patient.is_closed_by_peer(timeout=0.2)
    patient.send(b"still here\n")
    assert patient.recv_line() == b"still here"
    assert [payload for _, payload in worker.received] == [b"still here"]


def test_raw_framing_token_with_a_trailing_newline(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--plugins", "auth_token", *upstream_args(worker),
                        config={"plugins": {"auth_token": {"tokens": ["s3cret"]}}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"s3cret\r\n")
    wait_for(lambda: re.search(r"authenticated [0-9a-f-]{36}", pplex.log()), message="the client authenticated")
    client.send(b"raw hello\n")
    assert client.recv_line() == b"raw hello"
    assert [payload for _, payload in worker.received] == [b"raw hello\n"]


@pytest.mark.parametrize("settings", [
    {"deny": ["127.0.0.1/32"]},
    {"allow": ["10.0.0.0/8", "::1/128"]},
    {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1"]},  # deny wins
], ids=["denied", "not-in-allow", "deny-beats-allow"])
def test_a_client_from_a_refused_address_is_closed_at_once(start_pplex, start_worker, settings):
    worker = start_worker()
    pplex = start_pplex(*upstream_args(worker), config={"plugins": {"auth_allow": settings}})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    started = time.monotonic()
    assert client.is_closed_by_peer(timeout=5)
    assert time.monotonic() - started < 2
    assert pplex.stats()["connections_refused"] == 1
    assert pplex.stats()["connections_opened"] == 0
    assert "not allowed by the accept rules" in pplex.log()
    assert worker.count() == 0


def test_a_client_from_an_allowed_address_gets_through(start_pplex, start_worker):
    worker = start_worker()
    config = {"plugins": {"auth_allow": {"allow": ["10.0.0.0/8", "127.0.0.0/8"], "deny": ["127.0.0.2"]}}}
    pplex = start_pplex(*upstream_args(worker), config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"let me in\n")
    assert client.recv_line() == b"let me in"
    assert pplex.stats()["connections_refused"] == 0


def test_a_bad_cidr_exits_2_with_one_line_naming_it(tmp_path):
    config_path = tmp_path / "pplex.json"
    config_path.write_text(json.dumps({"plugins": {"auth_allow": {"allow": ["10.0.0.300/8"]}}}))
    result = subprocess.run([sys.executable, "-m", "pplex", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{config_path}: plugins.auth_allow.allow[0]: not an IPv4 or IPv6 network")
    assert "10.0.0.300/8" in lines[0]
