"""Idle memory per client connection at the front door: plaintext, behind a PROXY header, over TLS.

    .venv/bin/python -m bench.frontdoor [--conns 5000] [--kinds plain,proxy,tls]

For each kind, a fresh pplex (no worker: the clients stay idle) is started on
127.0.0.1, its VmRSS read once stable, then `--conns` clients connect and
finish arriving (a PROXY v1 header; a TLS 1.3 handshake with Python's `ssl`,
EC P-256 certificates made for the run) and stay idle; once pplex holds them
all (/proc/PID/fd) and its RSS is stable again, `(after - before) / conns` is
printed. The plaintext row is the same measurement as `python -m bench`'s
idle-memory figure, with fewer connections by default (TLS handshakes from
one Python client take a while); RSS moves with the allocator, so compare
rows of one run.
"""
import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import time

from . import procs, runner, targets

KINDS = ("plain", "proxy", "tls")


def start(ps, tmpdir, kind, certs):
    server = {"max_connections": 1_000_000}
    if kind == "proxy":
        server.update(proxy_protocol="v1", proxy_protocol_from=["127.0.0.1"])
    if kind == "tls":
        server["tls"] = {"cert_file": certs.server_cert, "key_file": certs.server_key}
    path = os.path.join(tmpdir, f"{kind}.json")
    with open(path, "w") as handle:
        json.dump({"server": server}, handle)
    argv = targets.pplex_argv() + ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                                   "--log-level", "error", "--config", path]
    proc = ps.start(f"pplex-{kind}", argv, cwd=targets.REPO, env=targets.python_env())
    line = proc.wait_line(lambda text: text.startswith("pplex listening on "), 30)
    host_port = line.split()[3].rstrip(",")
    return proc, ("127.0.0.1", int(host_port.rsplit(":", 1)[1]))


def connect(kind, addr, context):
    sock = socket.create_connection(addr, timeout=10)
    if kind == "proxy":
        local = sock.getsockname()
        sock.sendall(f"PROXY TCP4 203.0.113.7 {local[0]} {local[1]} {addr[1]}\r\n".encode())
    if kind == "tls":
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def measure(ps, tmpdir, kind, conns, certs, context):
    proc, addr = start(ps, tmpdir, kind, certs)
    try:
        before, stable_before = runner._wait_stable_rss(proc.pid, timeout=10)
        fds_before = procs.fd_count(proc.pid)
        socks = []
        started = time.monotonic()
        try:
            for _ in range(conns):
                socks.append(connect(kind, addr, context))
            # A PROXY client is open once its header is parsed; a TLS one once its handshake is done.
            held = runner._wait_fds(proc.pid, fds_before + len(socks), timeout=15) - fds_before
            after, stable_after = runner._wait_stable_rss(proc.pid, timeout=15)
            seconds = time.monotonic() - started
        finally:
            for sock in socks:
                sock.close()
        return {"kind": kind, "connections": len(socks), "held": held, "rss_before": before,
                "rss_after": after, "bytes_per_conn": round((after - before) / max(1, len(socks))),
                "rss_stable": stable_before and stable_after, "open_s": round(seconds, 1)}
    finally:
        ps.stop(proc)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.frontdoor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=5000, help="idle connections per kind (default 5000)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="plain,proxy,tls (default all)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if args.conns < 1 or not set(kinds) <= set(KINDS):
        parser.error("--conns >= 1; --kinds from plain, proxy, tls")
    nofile = procs.raise_nofile()
    conns = min(args.conns, nofile - 300)
    sys.path.insert(0, targets.REPO)
    from tests.tlsutil import make_certs   # the test suite's certificate maker (cryptography)
    with tempfile.TemporaryDirectory(prefix="pplex-bench-frontdoor-") as tmpdir:
        certs = make_certs(os.path.join(tmpdir, "certs"))
        context = ssl.create_default_context(cafile=certs.ca)
        ps = procs.ProcSet(tmpdir)
        results = []
        try:
            for kind in kinds:
                print(f"[{kind}] opening {conns} idle connections", file=sys.stderr, flush=True)
                results.append(measure(ps, tmpdir, kind, conns, certs, context))
        finally:
            ps.stop_all()
    print(f"idle memory per client connection ({conns} idle connections per row, VmRSS after - before, "
          "fresh process each):")
    for row in results:
        note = "" if row["rss_stable"] else ", RSS not stable"
        print(f"  {row['kind']:<6} {row['bytes_per_conn']:>8,} bytes/conn   RSS {row['rss_before'] / 2**20:.1f} -> "
              f"{row['rss_after'] / 2**20:.1f} MiB, {row['held']:,} held, opened in {row['open_s']} s{note}")


if __name__ == "__main__":
    main()
