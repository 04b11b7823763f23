"""gRPC-direct load: N logical clients, 1 message in flight each, on one stream.

This is the "what does the worker cost without pplex" row of the benchmark.
It opens ONE `bidirectionalStreaming` call to an echo worker, exactly as pplex
does, and plays N logical clients on it: each client (a UUIDv4) has one
InputStreamRequest in flight; when the worker's OutputStreamRequest for that
client comes back (client_uuid = the sender, same payload), the client's
round trip is recorded and its next message is queued.

Requests are fed to gRPC from a queue-backed iterator; responses are consumed
in the main thread. Output has the same shape as bench/loadgen: optional
{"event": "measure_start"} / {"event": "measure_end"} lines, then one JSON
result line on stdout.

Run:  .venv/bin/python -m bench.grpc_direct --target 127.0.0.1:PORT --clients 100
"""
import argparse
import json
import queue
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import grpc
from google.protobuf import empty_pb2

from pplex._proto import upstream_pb2, upstream_pb2_grpc

_END = object()


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-q * len(sorted_values) // 1)))  # ceil, at least 1
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Clock:
    """RFC 3339 UTC timestamps with microseconds, re-formatted at most once a ms.

    The worker treats `time` as opaque text; formatting a datetime for every
    message would mostly measure this generator's own Python overhead.
    """

    def __init__(self):
        self._ms = -1
        self._text = ""

    def text(self):
        now = time.time()
        ms = int(now * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self._text


def wait_ready(target, timeout):
    """Poll the worker's `ready` RPC until it answers ready=True or timeout passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        channel = grpc.insecure_channel(target)
        try:
            stub = upstream_pb2_grpc.UpstreamPeerServiceStub(channel)
            left = max(0.1, min(2.0, deadline - time.monotonic()))
            result = stub.ready(empty_pb2.Empty(), timeout=left)
            if result.ready:
                return True
            last = "answered ready=false"
        except grpc.RpcError as exc:
            last = "%s" % (exc.code(),)
        finally:
            channel.close()
        time.sleep(0.05)
    raise TimeoutError("worker at %s not ready after %.0fs (%s)" % (target, timeout, last))


def run(target, clients, seconds, warmup, size, io_timeout, events):
    payloads = []
    uuids = [str(uuid.uuid4()) for _ in range(clients)]
    for i in range(clients):
        body = ("c%d-" % i).encode()
        payloads.append((body * (size // len(body) + 1))[:size])
    index = {u: i for i, u in enumerate(uuids)}
    sent_at = [0] * clients
    clock = _Clock()
    requests = queue.SimpleQueue()

    def request_iter():
        while True:
            item = requests.get()
            if item is _END:
                return
            yield item

    def send(i):
        sent_at[i] = time.perf_counter_ns()
        requests.put(upstream_pb2.InputStreamRequest(
            time=clock.text(), client_uuid=uuids[i], payload=payloads[i]))

    channel = grpc.insecure_channel(target)
    stub = upstream_pb2_grpc.UpstreamPeerServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=io_timeout)
    rpc_deadline = warmup + seconds + io_timeout + 10
    call = stub.bidirectionalStreaming(request_iter(), timeout=rpc_deadline)

    t0 = time.perf_counter_ns()
    measure_start = t0 + int(warmup * 1e9)
    measure_end = measure_start + int(seconds * 1e9)
    latencies = []
    record = latencies.append
    errors = 0
    mismatches = 0
    progress = [time.monotonic()]
    stop = threading.Event()

    def watchdog():
        # Cancels the call if no reply arrived for io_timeout, or after the window.
        while not stop.wait(0.1):
            now = time.perf_counter_ns()
            if now >= measure_end + int(0.5e9):
                call.cancel()
                return
            if time.monotonic() - progress[0] > io_timeout:
                call.cancel()
                return

    emitted = []
    emit_lock = threading.Lock()

    def emit_event(name):
        with emit_lock:
            if events and name not in emitted:
                emitted.append(name)
                _emit({"event": name})

    def event_timer():
        delay = (measure_start - time.perf_counter_ns()) / 1e9
        if not stop.wait(max(0.0, delay)):
            emit_event("measure_start")
        delay = (measure_end - time.perf_counter_ns()) / 1e9
        if not stop.wait(max(0.0, delay)):
            emit_event("measure_end")

    threads = [threading.Thread(target=watchdog, daemon=True),
               threading.Thread(target=event_timer, daemon=True)]
    for t in threads:
        t.start()
    for i in range(clients):
        send(i)

    stalled = False
    try:
        for resp in call:
            now = time.perf_counter_ns()
            progress[0] = time.monotonic()
            i = index.get(resp.client_uuid)
            if i is None:
                mismatches += 1
                continue
            if resp.payload != payloads[i]:
                mismatches += 1
            if measure_start <= now < measure_end:
                record(now - sent_at[i])
            if now >= measure_end:
                emit_event("measure_start")
                emit_event("measure_end")
                break
            send(i)
    except grpc.RpcError as exc:
        if time.perf_counter_ns() < measure_end:
            errors += 1
            stalled = exc.code() == grpc.StatusCode.CANCELLED
            print("grpc_direct: stream ended early: %s %s" % (exc.code(), exc.details()),
                  file=sys.stderr)
    finally:
        stop.set()
        emit_event("measure_start")
        emit_event("measure_end")
        requests.put(_END)
        call.cancel()
        channel.close()
    if stalled:
        print("grpc_direct: no reply for %.1fs: cancelled" % io_timeout, file=sys.stderr)

    end = min(time.perf_counter_ns(), measure_end)
    elapsed = max(1e-9, (end - measure_start) / 1e9)
    latencies.sort()
    n = len(latencies)
    us = lambda ns: round(ns / 1e3, 1)
    result = {
        "rt_per_s": round(n / elapsed, 1),
        "p50_us": us(_percentile(latencies, 0.50)),
        "p99_us": us(_percentile(latencies, 0.99)),
        "errors": errors + mismatches,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "p90_us": us(_percentile(latencies, 0.90)),
        "p999_us": us(_percentile(latencies, 0.999)),
        "mean_us": us(sum(latencies) / n) if n else 0.0,
        "max_us": us(latencies[-1]) if n else 0.0,
        "messages": n,
        "connected": clients,
        "mismatches": mismatches,
        "pipeline": 1,
        "size": size,
        "warmup": warmup,
        "addr": target,
    }
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="worker host:port")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--io-timeout", type=float, default=5.0)
    ap.add_argument("--ready-timeout", type=float, default=10.0,
                    help="first wait this long for the worker's ready RPC")
    ap.add_argument("--events", action="store_true",
                    help="print measure_start/measure_end event lines")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.size < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error("--clients and --size must be >= 1, --seconds > 0, --warmup >= 0")
    try:
        wait_ready(args.target, args.ready_timeout)
        result = run(args.target, args.clients, args.seconds, args.warmup, args.size,
                     args.io_timeout, args.events)
    except Exception as exc:  # report, don't trace: the harness shows stderr
        print("grpc_direct: %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1
    _emit(result)
    if result["messages"] == 0:
        print("grpc_direct: no round trip completed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
