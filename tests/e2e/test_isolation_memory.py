"""No client or worker can grow pplex's memory without bound (fault isolation: memory).

Each test drives a real pplex process with real sockets and real gRPC workers,
on both transports, and reads pplex's resident memory from /proc.
"""
import os
import socket
import subprocess
import threading
import time

import pytest

from pplex.worker import Worker
from tests.helpers import ROOT, TRANSPORTS, wait_for

MiB = 1024 * 1024


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def rss(pid):
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PushWorker(Worker):
    """`push N SIZE`: sends N replies of SIZE bytes to the sender; `flood N SIZE`: N broadcasts to all."""

    def on_message(self, stream, client_uuid, payload):
        command, count, size = payload.split()
        chunk = b"x" * int(size)
        for _ in range(int(count)):
            if command == b"push":
                stream.reply(client_uuid, chunk)
            else:
                stream.broadcast(chunk)
        if command == b"push":
            stream.reply(client_uuid, b"end")


def test_a_client_that_never_reads_is_closed_as_a_slow_consumer_and_memory_stays_bounded(start_pplex, start_worker):
    worker = start_worker(PushWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"client_buffer_limit": 4 * MiB, "client_buffer_high": MiB}})
    pplex.wait_ready_upstreams(1)
    bystander = pplex.client()
    sink = socket.create_connection(("127.0.0.1", pplex.port))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = rss(pplex.proc.pid)
    sink.sendall(b"push 256 262144")  # 64 MiB at a client that never reads
    wait_for(lambda: pplex.stats()["closes"].get("slow_consumer") == 1, timeout=30,
             message="the never-reading client closed as a slow consumer")
    grown = rss(pplex.proc.pid) - before
    assert grown < 40 * MiB, f"pplex grew by {grown / MiB:.1f} MiB for a client limited to 4 MiB"
    # It was closed with a reset: the client can tell it lost data.
    sink.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while sink.recv(1 << 20):
            pass
    # Everyone else goes on.
    bystander.send(b"push 1 5")
    assert bystander.recv_exact(8) == b"xxxxxend"
    assert "slow_consumer" in pplex.log() and "reset" in pplex.log()


def test_a_worker_broadcasting_faster_than_clients_read_is_slowed_not_buffered(start_pplex, start_worker):
    worker = start_worker(PushWorker())
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"server": {"output_budget": 2 * MiB, "client_buffer_limit": 64 * MiB,
                                           "client_buffer_high": 32 * MiB, "slow_consumer_timeout": 60}})
    pplex.wait_ready_upstreams(1)
    count, size = 1000, 16384
    clients = [pplex.client() for _ in range(5)]
    wait_for(lambda: pplex.stats()["connections_open"] == 5, message="5 clients")
    received = [0] * len(clients)
    peak = [0]

    def read(index, client):
        client.sock.settimeout(30)
        while received[index] < count * size:
            data = client.sock.recv(1 << 16)
            if not data:
                return
            received[index] += len(data)
            time.sleep(0.002)  # a client that reads steadily (~30 MB/s), slower than the worker sends

    readers = [threading.Thread(target=read, args=(i, c)) for i, c in enumerate(clients)]
    for reader in readers:
        reader.start()
    before = rss(pplex.proc.pid)
    clients[0].send(b"flood %d %d" % (count, size))  # 16 MiB to each of 5 clients
    while any(r.is_alive() for r in readers):
        peak[0] = max(peak[0], rss(pplex.proc.pid))
        for reader in readers:
            reader.join(0.05)
    assert received == [count * size] * len(clients), "every ordinary client got every broadcast"
    stats = pplex.stats()
    assert stats["backpressure_episodes"] >= 1, "the output budget pushed back on the worker"
    assert stats["closes"] == {} and stats["connections_open"] == 5
    grown = peak[0] - before
    # 80 MiB went out; what pplex held at once stays near the budget plus one HTTP/2 window per stream.
    assert grown < 48 * MiB, f"pplex grew by {grown / MiB:.1f} MiB while 80 MiB were broadcast"


def test_merged_raw_bytes_respect_the_upstream_batch_bound(start_pplex, go_worker):
    worker = go_worker("echo")
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}",
                        config={"upstream": [{"host": "127.0.0.1", "port": worker.port, "stall_timeout": 120,
                                              "alive_timeout": 60}]})
    pplex.wait_ready_upstreams(1)
    worker.freeze()  # its stream stops taking anything: the batch for it grows
    senders = [socket.create_connection(("127.0.0.1", pplex.port)) for _ in range(100)]
    chunk = b"r" * 65536
    stop = time.monotonic() + 4
    for sock in senders:
        sock.setblocking(False)
    while time.monotonic() < stop:
        for sock in senders:
            try:
                sock.send(chunk)
            except BlockingIOError:
                pass  # pplex stopped reading it: backpressure reached the client
    queued = pplex.upstreams()[0]["queued_bytes"]
    # The bound (8 MiB) holds, give or take one read per client (64 KiB each) before it is paused.
    assert queued <= 8 * MiB + 100 * 65536, f"{queued / MiB:.1f} MiB queued for one upstream"
    assert queued > 2 * MiB, "the test did fill the batch"
    worker.thaw()
    for sock in senders:
        sock.close()


def test_memory_stays_flat_under_a_steady_pipelined_load(start_pplex, go_worker):
    worker = go_worker("echo")
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}")
    pplex.wait_ready_upstreams(1)
    loadgen = os.path.join(ROOT, "bench", "bin", "loadgen")
    if not os.path.exists(loadgen):
        subprocess.run(["bash", os.path.join(ROOT, "bench", "build.sh")], check=True, capture_output=True)

    def load(seconds):
        done = subprocess.run([loadgen, "-addr", f"127.0.0.1:{pplex.port}", "-clients", "50", "-pipeline", "8",
                               "-size", "256", "-seconds", str(seconds), "-warmup", "0"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    load(2)  # warm-up: pools, buffers, caches reach their size
    before = rss(pplex.proc.pid)
    messages_before = pplex.stats()["messages_in"]
    load(4)
    load(4)
    moved = pplex.stats()["messages_in"] - messages_before
    grown = rss(pplex.proc.pid) - before
    assert moved > 20_000, f"only {moved} messages went through"
    # The h2 leak kept ~130 B per message: here that would have been tens of MiB.
    assert grown < 6 * MiB, f"RSS grew {grown / MiB:.1f} MiB over {moved} messages ({grown / moved:.0f} B each)"
