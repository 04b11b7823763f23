"""A worker's name with several addresses: the first blackholed, the next live; IPv6 and IPv4; EMFILE.

Two ways to give a name its addresses, both on loopback only:
- the h2 transport's resolver seam (`H2Transport(reactor, resolve=...)`), with
  the link in a real Reactor on the test thread and a real grpcio worker;
- a hosts file bind-mounted on /etc/hosts in a private mount namespace
  (`unshare`) around a real pplex process, for both transports: grpcio
  resolves the name itself.
The dead address is a `Blackhole`: a loopback listener whose accept queue is
full, so connects to it hang.
"""
import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from pplex.h2link import H2Transport
from pplex.reactor import Reactor
from tests.helpers import TRANSPORTS, PplexProcess, RecordingWorker, wait_for
from tests.netutil import Blackhole, hosts_namespace, namespaces_work
from tests.unit.test_h2link import Recorder, run_until

READY_TIMEOUT = 1.0


class Upstream:
    """What a transport reads from an upstream."""

    def __init__(self, host, port):
        self.host, self.port, self.tls = host, port, None
        self.max_message_bytes = 4 * 1024 * 1024


@pytest.fixture
def worker():
    made = []

    def start(host="127.0.0.1", port=0):
        served = RecordingWorker().serve(port=port, host=host)
        made.append(served)
        return served

    yield start
    for served in made:
        served.stop(grace=0)


@pytest.fixture
def blackhole():
    made = []

    def make(host="127.0.0.1", port=0):
        hole = Blackhole(host, port)
        made.append(hole)
        return hole

    yield make
    for hole in made:
        hole.close()


@pytest.fixture
def h2_link():
    """`h2_link(addresses)`: an h2 link to `worker.test` whose name resolves to `addresses` (each time)."""
    made = []

    def make(addresses, host="worker.test", port=50051):
        reactor = Reactor()
        calls = []

        def resolve(name, number):
            calls.append((name, number))
            return list(addresses)

        events = Recorder()
        link = H2Transport(reactor, resolve=resolve).connect(Upstream(host, port), events)
        made.append((reactor, link))
        return reactor, link, events, calls

    yield make
    for reactor, link in made:
        link.close()
        reactor.close()


def probe(reactor, link, events, timeout=2 * READY_TIMEOUT):
    """Probe once; (ok, detail, seconds it took)."""
    events.log.clear()
    started = time.monotonic()
    link.probe_ready(READY_TIMEOUT)
    run_until(reactor, lambda: events.kinds("ready"), timeout=timeout)
    _, ok, detail = events.kinds("ready")[0]
    return ok, detail, time.monotonic() - started


V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.mark.parametrize("dead_host, live_host", [("127.0.0.1", "127.0.0.1"), ("::1", "127.0.0.1"),
                                                  ("127.0.0.1", "::1")])
def test_h2_reaches_the_second_address_when_the_first_is_blackholed(h2_link, worker, blackhole, dead_host,
                                                                     live_host):
    hole, live = blackhole(dead_host), worker(live_host)
    dead_address = hole.address
    live_address = (live_host, live.port, 0, 0) if ":" in live_host else (live_host, live.port)
    reactor, link, events, calls = h2_link([(hole.family, dead_address),
                                            (V6 if ":" in live_host else V4, live_address)])
    ok, detail, seconds = probe(reactor, link, events)
    assert (ok, detail) == (True, "ready")
    # The dead address cost its share of the probe's budget (half: two addresses), not the whole of it.
    assert READY_TIMEOUT / 2 <= seconds < READY_TIMEOUT
    assert calls == [("worker.test", 50051)]


def test_h2_resolves_again_for_a_new_connection_and_tries_the_last_good_address_first(h2_link, worker, blackhole):
    hole, live = blackhole(), worker()
    reactor, link, events, calls = h2_link([(V4, hole.address), (V4, ("127.0.0.1", live.port))])
    assert probe(reactor, link, events)[:2] == (True, "ready")
    link.open_stream()
    link.stop_stream()   # drops the connection: the next probe makes a new one
    ok, detail, seconds = probe(reactor, link, events)
    assert (ok, detail) == (True, "ready")
    assert len(calls) == 2
    assert seconds < READY_TIMEOUT / 2   # the blackhole was not waited for again


def test_h2_every_address_dead_is_a_clear_not_ready_within_the_probe(h2_link, blackhole):
    first, second = blackhole(), blackhole()
    reactor, link, events, _ = h2_link([(V4, first.address), (V4, second.address)])
    ok, detail, seconds = probe(reactor, link, events)
    assert not ok and detail == "DEADLINE_EXCEEDED: no ready answer within 1 s (connecting)"
    assert seconds < 2 * READY_TIMEOUT


def test_h2_refused_addresses_are_skipped_at_once_and_the_last_error_is_reported(h2_link, worker):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))   # bound, not listening: connects are refused
    try:
        reactor, link, events, _ = h2_link([(V4, refused.getsockname())] * 2)
        ok, detail, _ = probe(reactor, link, events)
    finally:
        refused.close()
    assert not ok and detail == "UNAVAILABLE: cannot connect to worker.test:50051: Connection refused"


def test_h2_a_resolver_that_raises_is_a_not_ready_not_a_stuck_probe(h2_link):
    reactor = Reactor()
    events = Recorder()

    def broken(host, port):
        raise ValueError("resolver bug")

    link = H2Transport(reactor, resolve=broken).connect(Upstream("worker.test", 1), events)
    try:
        ok, detail, _ = probe(reactor, link, events)
    finally:
        link.close()
        reactor.close()
    assert not ok and detail == "UNAVAILABLE: cannot resolve worker.test:1: ValueError('resolver bug')"


def test_h2_too_many_open_files_is_a_failed_connect_and_the_cycle_goes_on(worker):
    live = worker()
    reactor = Reactor()
    events = Recorder()
    link = H2Transport(reactor).connect(Upstream("127.0.0.1", live.port), events)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    try:
        # An IP literal connects inside probe_ready: the socket is made under the lowered limit.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            link.probe_ready(READY_TIMEOUT)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        run_until(reactor, lambda: events.kinds("ready"))
        assert events.kinds("ready") == [
            ("ready", False, f"UNAVAILABLE: cannot connect to 127.0.0.1:{live.port}: Too many open files")]
        assert probe(reactor, link, events)[:2] == (True, "ready")
    finally:
        link.close()
        reactor.close()


# -- a real pplex process, a name from /etc/hosts in a private mount namespace ------------------------------
@pytest.mark.skipif(not namespaces_work(), reason="unshare cannot make a mount namespace here")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_name_whose_first_address_is_blackholed_is_in_rotation_within_two_ready_timeouts(
        tmp_path, worker, blackhole, transport):
    # glibc sorts 127.0.0.1 before 127.0.0.2 (longest prefix with the source address), c-ares keeps the
    # file's order: with the dead address on 127.0.0.1 and first in the file, both try it first.
    hole = blackhole("127.0.0.1")
    live = worker("127.0.0.2", hole.port)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 two-addresses.test\n127.0.0.2 two-addresses.test\n")
    prefix = hosts_namespace(hosts)
    order = subprocess.run([*prefix, sys.executable, "-c", "import socket; print([a[4][0] for a in socket."
                            "getaddrinfo('two-addresses.test', 1, type=socket.SOCK_STREAM)])"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    assert order == "['127.0.0.1', '127.0.0.2']"
    pplex = PplexProcess(tmp_path, "--transport", transport, prefix=prefix)
    try:
        status, body = pplex.admin("POST", "/upstream/add", {"host": "two-addresses.test", "port": hole.port,
                                                             "ready_timeout": READY_TIMEOUT})
        assert status == 201, body
        added = time.monotonic()
        wait_for(lambda: pplex.upstreams()[0]["state"] == "ready", timeout=2 * READY_TIMEOUT,
                 message=f"the worker in rotation; log:\n{pplex.log()[-2000:]}")
        assert time.monotonic() - added < 2 * READY_TIMEOUT
        client = pplex.client()
        client.send(b"through the second address\n")
        assert client.recv_line() == b"through the second address"
        client.close()
    finally:
        pplex.stop()
