"""Workers come and go; clients never notice (issue: health checks and failover).

Workers here are real processes (`python -m pplex.worker`), so they can be
killed with SIGKILL or frozen with SIGSTOP like a crashed or hung service.
"""
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import ROOT, TRANSPORTS, RecordingWorker, free_port, wait_for


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """Every test here that starts pplex runs once per transport: grpcio, then h2."""
    return request.param


class WorkerProcess:
    def __init__(self, port=None):
        self.port = port or free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "pplex.worker", "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        line = self.proc.stdout.readline().decode()
        assert "listening on" in line, line

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def worker_processes():
    started = []

    def start(port=None):
        worker = WorkerProcess(port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.signal(signal.SIGCONT)
        except ProcessLookupError:
            pass
        worker.stop()


class SteadyClients:
    """N clients each sending a numbered line every `interval` s, counting echoed replies.

    One thread drives every socket through a selector; it stops by itself after
    `max_seconds` so a failing test cannot leave it running.
    """

    def __init__(self, port, count, interval=0.05, max_seconds=60):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        self.sent = [0] * count
        self.replies = [0] * count
        self.closed = [False] * count
        self.interval = interval
        self.deadline = time.monotonic() + max_seconds
        self.running = True
        self.pause_sending = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        selector = selectors.DefaultSelector()
        buffers = {}
        for index, sock in enumerate(self.socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
            buffers[index] = b""
        next_send = time.monotonic()
        while self.running and time.monotonic() < self.deadline:
            now = time.monotonic()
            if now >= next_send and not self.pause_sending:
                for index, sock in enumerate(self.socks):
                    if not self.closed[index]:
                        try:
                            sock.send(b"%d:%d\n" % (index, self.sent[index]))
                            self.sent[index] += 1
                        except OSError:
                            self.closed[index] = True
                next_send = now + self.interval
            for key, _ in selector.select(0.01):
                index = key.data
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed[index] = True
                    selector.unregister(key.fileobj)
                    continue
                buffers[index] += data
                lines = buffers[index].split(b"\n")
                buffers[index] = lines.pop()
                self.replies[index] += len(lines)

    def snapshot(self):
        return list(self.replies)

    def stop(self):
        self.running = False
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def test_kill_9_one_of_three_workers_under_200_clients(start_pplex, worker_processes):
    workers = [worker_processes() for _ in range(3)]
    alive_timeout = 1.0
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "alive_timeout": alive_timeout}
                           for w in workers]}
    pplex = start_pplex(config=config)
    pplex.wait_ready_upstreams(3)
    clients = SteadyClients(pplex.port, 200, interval=0.1)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=20, message="every client getting replies")
        killed_at = time.monotonic()
        workers[0].signal(signal.SIGKILL)
        victim = f"127.0.0.1:{workers[0].port}"
        wait_for(lambda: [u for u in pplex.upstreams() if u["address"] == victim][0]["state"] != "ready",
                 timeout=2 * alive_timeout, message="the killed worker out of rotation")
        left_after = time.monotonic() - killed_at
        after_kill = clients.snapshot()
        # Every client keeps getting replies, now from the two others.
        wait_for(lambda: all(now >= then + 5 for now, then in zip(clients.snapshot(), after_kill)),
                 timeout=20, message="every client getting replies after the kill")
        assert not any(clients.closed), "a client lost its connection"
        assert left_after < 2 * alive_timeout
        # Counted while the clients are still connected: stop() closes them.
        assert pplex.stats()["connections_open"] == 200
    finally:
        clients.stop()
    states = sorted(u["state"] for u in pplex.upstreams())
    assert states == ["ready", "ready", "unready"]


def test_sigstop_is_ejected_by_the_live_deadline_and_sigcont_brings_it_back(start_pplex, worker_processes):
    workers = [worker_processes(), worker_processes()]
    alive_timeout = 0.3
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "alive_timeout": alive_timeout,
                            "ready_timeout": 0.5} for w in workers]}
    pplex = start_pplex(config=config)
    pplex.wait_ready_upstreams(2)
    frozen = f"127.0.0.1:{workers[0].port}"

    def state_of(address):
        return [u for u in pplex.upstreams() if u["address"] == address][0]

    clients = SteadyClients(pplex.port, 10, interval=0.05)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=10, message="replies flowing")
        workers[0].signal(signal.SIGSTOP)
        wait_for(lambda: state_of(frozen)["state"] == "unready", timeout=3 * alive_timeout + 1,
                 message="the stopped worker ejected by the live deadline")
        assert "live" in state_of(frozen)["last_error"]
        after_eject = clients.snapshot()
        wait_for(lambda: all(n >= t + 3 for n, t in zip(clients.snapshot(), after_eject)), timeout=10,
                 message="replies flowing from the other worker")
        workers[0].signal(signal.SIGCONT)
        wait_for(lambda: state_of(frozen)["state"] == "ready", timeout=10,
                 message="the continued worker back in rotation after a ready probe")
        assert not any(clients.closed)
    finally:
        clients.stop()


class SlowReadyWorker(RecordingWorker):
    def is_ready(self):
        time.sleep(1.0)
        return True


def test_not_ready_and_slow_ready_workers_never_get_traffic(start_pplex, start_worker):
    good = start_worker()
    refusing = RecordingWorker("refusing")
    refusing.ready = False
    refusing = start_worker(refusing)
    slow = start_worker(SlowReadyWorker("slow"))
    config = {"upstream": [{"host": "127.0.0.1", "port": w.port, "ready_timeout": 0.3}
                           for w in (good, refusing, slow)]}
    pplex = start_pplex(config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    for i in range(30):
        client.send(b"m%d\n" % i)
        assert client.recv_line() == b"m%d" % i
    assert good.count() == 30
    assert refusing.count() == 0 and slow.count() == 0
    def error_of(worker):
        return [u for u in pplex.upstreams() if u["port"] == worker.port][0]["last_error"] or ""
    wait_for(lambda: "DEADLINE_EXCEEDED" in error_of(slow), timeout=5, message="the slow probe's deadline")
    assert "ready=false" in error_of(refusing)
    # Probes go on (with backoff), and still nothing reaches them.
    for i in range(30):
        client.send(b"n%d\n" % i)
        assert client.recv_line() == b"n%d" % i
    assert refusing.count() == 0 and slow.count() == 0


def test_add_under_load_takes_traffic_and_drain_loses_nothing(start_pplex, start_worker):
    first = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{first.port}")
    pplex.wait_ready_upstreams(1)
    clients = SteadyClients(pplex.port, 20, interval=0.02)
    try:
        wait_for(lambda: min(clients.snapshot()) >= 3, timeout=10, message="replies flowing")
        second = start_worker()
        status, body = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": second.port,
                                                             "ready_timeout": 1})
        assert status == 201
        wait_for(lambda: second.count() > 0, timeout=5, message="the added worker taking traffic")
        status, _ = pplex.admin("POST", f"/upstreams/{body['id']}/drain")
        assert status == 200
        wait_for(lambda: body["id"] not in [u["id"] for u in pplex.upstreams()], timeout=10,
                 message="the drained worker removed")
        clients.pause_sending = True
        # Every message sent, including those routed to the drained worker, got its reply.
        wait_for(lambda: clients.snapshot() == clients.sent, timeout=10,
                 message="a reply for every message sent")
        assert not any(clients.closed)
        assert pplex.stats()["drops"] == {}
    finally:
        clients.stop()


class SilentWorker(RecordingWorker):
    """Takes every message and never answers: all pplex wrote to it is unconfirmed when it dies."""

    def on_message(self, stream, client_uuid, payload):
        with self.lock:
            self.received.append((client_uuid, payload))


def test_messages_written_to_a_worker_that_dies_before_reading_them_are_counted_unconfirmed(start_pplex,
                                                                                            go_worker):
    frozen = go_worker("echo")
    pplex = start_pplex("--upstream", f"127.0.0.1:{frozen.port}", "--plugins", "framing_line")
    pplex.wait_ready_upstreams(1)
    frozen.freeze()  # its kernel takes the bytes; the worker never reads them
    client = pplex.client()
    for i in range(5):
        client.send(b"message %d\n" % i)
    wait_for(lambda: pplex.stats()["messages_in"] == 5 and pplex.upstreams()[0]["queued_bytes"] == 0
             and pplex.upstreams()[0]["backlog"] == 0, message="the messages written to the stream")
    frozen.kill()
    wait_for(lambda: pplex.stats()["unconfirmed"] == 5, message="5 unconfirmed")
    assert "unconfirmed (at-most-once)" in pplex.log()
    status, metrics = pplex.admin("GET", "/metrics")
    node = pplex.stats()["node"]
    assert f'pplex_messages_unconfirmed_total{{node="{node}"}} 5.0' in metrics
    # Counted, not resent, and the client keeps its connection while it waits for a worker.
    assert pplex.stats()["rerouted"] == 0
    assert pplex.stats()["connections_open"] == 1


def test_messages_a_worker_read_are_not_unconfirmed_though_it_never_answered(start_pplex, start_worker, transport):
    silent = start_worker(SilentWorker("silent"))
    pplex = start_pplex("--upstream", f"127.0.0.1:{silent.port}", "--plugins", "framing_line")
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    for i in range(5):
        client.send(b"message %d\n" % i)
    wait_for(lambda: silent.count() == 5, message="the worker read every message")
    silent.stop(grace=0)
    wait_for(lambda: pplex.upstreams()[0]["state"] != "ready", message="the worker gone")
    # h2 knows from the worker's flow control that it read them; grpcio, which shows no HTTP/2
    # frames, counts what came after the worker's last message as unconfirmed.
    assert pplex.stats()["unconfirmed"] == (0 if transport == "h2" else 5)
