"""pplex benchmark: pplex against HAProxy, gRPC-direct and the generator's ceiling.

Run from the repository root:

    .venv/bin/python -m bench                       # defaults, about 3 minutes
    .venv/bin/python -m bench --clients 1,100,1000 --seconds 5 --json out.json
    .venv/bin/python -m bench --rows haproxy,pplex --clients 100 --sizes 1024,262144

See bench/README.md for what each row means and how to read the ratios.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from . import procs, report, runner, targets
from .procs import StartError
from .runner import RowError

ROWS = ("ceiling", "haproxy", "pplex", "grpc")
ROW_TITLES = {
    "ceiling": "generator ceiling",
    "haproxy": "HAProxy",
    "pplex": "pplex",
    "grpc": "gRPC direct",
}

_T0 = time.monotonic()


def progress(msg):
    sys.stderr.write("[%6.1fs] %s\n" % (time.monotonic() - _T0, msg))
    sys.stderr.flush()


def _int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got %r" % text)
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected integers >= 1, got %r" % text)
    return values


MAX_SIZE = 16 * 1024 * 1024   # bytes: far above any row worth running, far below pplex's 64 MiB message cap


def _size_list(text):
    """Comma-separated sizes in bytes; a K or M suffix multiplies by 1024 or 1024 * 1024. "" or 0: none."""
    sizes = []
    for item in (x.strip().upper() for x in text.split(",")):
        if not item:
            continue
        scale = {"K": 1024, "M": 1024 * 1024}.get(item[-1], 1)
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise argparse.ArgumentTypeError("expected sizes like 32,1K,16K,256K, got %r" % text)
        if value == 0:
            continue
        if not 1 <= value <= MAX_SIZE:
            raise argparse.ArgumentTypeError("sizes are 1 B to %d B, got %r" % (MAX_SIZE, item))
        sizes.append(value)
    return list(dict.fromkeys(sizes))


def _row_list(text):
    rows = [x.strip() for x in text.split(",") if x.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise argparse.ArgumentTypeError("rows are a comma-separated subset of %s" % ",".join(ROWS))
    return rows


TRANSPORTS = ("h2", "grpcio")  # the default first: its row is the headline


def _default_transports():
    try:
        import h2  # noqa: F401 - only whether pplex's h2 transport can run
        return list(TRANSPORTS)
    except ImportError:
        return ["grpcio"]


def _transport_list(text):
    """grpcio,h2 - and TRANSPORT@REV: the same transport, pplex as it was at git revision REV
    (a before/after comparison in one run)."""
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    if not chosen or any(t.partition("@")[0] not in TRANSPORTS or t.endswith("@") for t in chosen):
        raise argparse.ArgumentTypeError("transports are a comma-separated subset of %s, each optionally "
                                         "@REV (pplex at that git revision)" % ",".join(TRANSPORTS))
    return list(dict.fromkeys(chosen))


def checkout_revision(rev, tmpdir):
    """pplex's tree at git revision `rev` in tmpdir (git archive), runnable with this venv."""
    tree = os.path.join(tmpdir, "rev-" + rev.replace("/", "_"))
    if not os.path.isdir(tree):
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", targets.REPO, "archive", rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        # The venv's entry points name the built-in plugins `pplex_plugins`: that revision's own ones.
        os.symlink("plugins", os.path.join(tree, "pplex_plugins"))
    return tree


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Closed-loop TCP benchmark of pplex vs HAProxy (TCP mode), gRPC-direct "
                    "and the load generator's own ceiling; see bench/README.md.")
    ap.add_argument("--clients", type=_int_list, default=[1, 100, 1000],
                    help="client counts N, comma-separated (default 1,100,1000)")
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="measured seconds per row (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="unmeasured warm-up seconds before each row (default 1)")
    ap.add_argument("--size", type=int, default=32,
                    help="message size in bytes of the client-count and pipelined rows (default 32)")
    ap.add_argument("--sizes", type=_size_list, default=_size_list("32,1K,16K,256K"),
                    help="message sizes for the size rows: HAProxy and pplex at --sizes-clients "
                         "closed-loop clients, one block per size (default 32,1K,16K,256K; 0 skips them)")
    ap.add_argument("--sizes-clients", type=int, default=100,
                    help="clients of the size rows (default 100)")
    ap.add_argument("--pipeline", type=int, default=16,
                    help="messages in flight per client for the pipelined figure (default 16; 0 skips it)")
    ap.add_argument("--pipeline-clients", type=int, default=100,
                    help="clients for the pipelined figure (default 100)")
    ap.add_argument("--idle-conns", type=int, default=10000,
                    help="idle connections for the memory figure (default 10000; 0 skips it)")
    ap.add_argument("--memory-haproxy", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure HAProxy's idle memory per connection (default on)")
    ap.add_argument("--worker", choices=("auto", "go", "python"), default="auto",
                    help="echo worker behind pplex and gRPC-direct (default: go if "
                         "conformance/go-upstream/bin/go-upstream exists, else python)")
    ap.add_argument("--rows", type=_row_list, default=list(ROWS),
                    help="subset of rows to run: %s (default all)" % ",".join(ROWS))
    ap.add_argument("--transport", type=_transport_list, default=None,
                    help="pplex transports to measure, one pplex row each: grpcio,h2 "
                         "(default: both when h2 is importable, else grpcio)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the temp dir with configs and child stderr logs")
    args = ap.parse_args(argv)
    if args.transport is None:
        args.transport = _default_transports()
    if args.seconds <= 0 or args.warmup < 0 or not 1 <= args.size <= MAX_SIZE or args.pipeline < 0 \
            or args.pipeline_clients < 1 or args.idle_conns < 0 or args.sizes_clients < 1:
        ap.error("--seconds > 0, --warmup >= 0, 1 <= --size <= %d, --pipeline >= 0, "
                 "--pipeline-clients >= 1, --idle-conns >= 0, --sizes-clients >= 1" % MAX_SIZE)
    return args


def build():
    script = os.path.join(targets.BENCH, "build.sh")
    r = subprocess.run(["bash", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    if r.returncode != 0:
        raise SystemExit("bench/build.sh failed:\n" + r.stdout.decode("utf-8", "replace"))


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    try:
        hv = subprocess.run([haproxy, "-v"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            timeout=10).stdout.decode().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        hv = "haproxy: not found"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": hv,
    }


class Bench:
    def __init__(self, args, ps, tmpdir, nofile):
        self.args = args
        self.ps = ps
        self.tmpdir = tmpdir
        self.nofile = nofile
        self.echo = self.haproxy = self.worker = self.pplex = None
        self.echo_addr = self.haproxy_addr = self.pplex_addr = None
        self.pplexes = {}  # transport -> (process, address): one pplex per transport
        self.worker_target = None
        self.errors = {}  # target -> why it is unavailable
        self.rows = []
        self.pipelined = []
        self.sized = []   # the size rows: HAProxy and pplex at --sizes-clients, per message size
        self.memory = []

    # -- targets -----------------------------------------------------------

    def start_targets(self):
        a = self.args
        self.echo, self.echo_addr = targets.start_echo(self.ps)
        progress("echo server on %s:%d" % self.echo_addr)
        if "haproxy" in a.rows or (a.idle_conns and a.memory_haproxy):
            try:
                self.haproxy, self.haproxy_addr, maxconn = targets.start_haproxy(
                    self.ps, self.tmpdir, self.echo_addr, self.nofile)
                progress("haproxy (nbthread 1, maxconn %d) on %s:%d" % ((maxconn,) + self.haproxy_addr))
            except StartError as exc:
                self.errors["haproxy"] = str(exc)
                progress("HAProxy unavailable: %s" % exc)
        if {"pplex", "grpc"} & set(a.rows) or a.idle_conns:
            kind, why = targets.choose_worker(a.worker)
            self.worker_kind = kind
            progress("worker: %s (%s)" % (kind, why))
            try:
                self.worker, self.worker_target = targets.start_worker(self.ps, kind)
                progress("worker ready on %s" % self.worker_target)
            except StartError as exc:
                self.errors["worker"] = str(exc)
                progress("worker unavailable: %s" % exc)
        if "pplex" in a.rows:
            for transport in a.transport:
                self.start_pplex(transport)

    def start_pplex(self, transport=None):
        """Start pplex with `transport` (default: the first asked for); it becomes the current one."""
        transport = transport or self.args.transport[0]
        self.pplex = self.pplex_addr = None
        self.pplexes.pop(transport, None)
        key = "pplex" if len(self.args.transport) == 1 else "pplex (%s)" % transport
        if self.worker is None:
            self.errors[key] = "no worker: %s" % self.errors.get("worker", "not started")
            return
        kind, _, rev = transport.partition("@")
        try:
            tree = checkout_revision(rev, self.tmpdir) if rev else None
            self.pplex, self.pplex_addr, admin = targets.start_pplex(
                self.ps, self.worker_target, name="pplex-" + transport.replace("@", "-"),
                extra=("--transport", kind), tree=tree)
            self.pplexes[transport] = (self.pplex, self.pplex_addr)
            self.errors.pop(key, None)
            progress("pplex (%s) on %s:%d (admin %s:%d), upstream %s" % (
                (transport,) + self.pplex_addr + admin + (self.worker_target,)))
        except (StartError, subprocess.CalledProcessError) as exc:
            self.errors[key] = str(exc)
            progress("pplex (%s) unavailable: %s" % (transport, exc))

    def use_pplex(self, transport):
        self.pplex, self.pplex_addr = self.pplexes.get(transport, (None, None))

    # -- rows --------------------------------------------------------------

    def _watch(self, row):
        w = {}
        if row == "ceiling":
            w["echo"] = self.echo.pid
        elif row == "haproxy":
            w["haproxy"] = self.haproxy.pid
            w["echo"] = self.echo.pid
        elif row == "pplex":
            w["pplex"] = self.pplex.pid
            w["worker"] = self.worker.pid
        elif row == "grpc":
            w["worker"] = self.worker.pid
        return w

    def _unavailable(self, row, transport=None):
        if row == "haproxy" and self.haproxy is None:
            return self.errors.get("haproxy", "not started")
        if row == "pplex" and self.pplex is None:
            return self.errors.get("pplex (%s)" % transport, self.errors.get("pplex", "not started"))
        if row == "grpc" and self.worker is None:
            return self.errors.get("worker", "not started")
        if row == "pplex" and not self.pplex.alive():
            return "pplex process has exited%s" % self.pplex.diagnostics()
        return None

    def run_row(self, row, clients, pipeline=1, transport=None, size=None):
        a = self.args
        size = size or a.size
        title = ROW_TITLES[row]
        entry = {"row": row, "title": title, "clients": clients, "pipeline": pipeline, "size": size}
        if row == "pplex":
            transport = transport or a.transport[0]
            self.use_pplex(transport)
            entry["transport"] = transport
            entry["title"] = title = "pplex (%s)" % transport
        why = self._unavailable(row, transport)
        label = "N=%d%s%s %s" % (clients, " x%d in flight" % pipeline if pipeline > 1 else "",
                                 " %s" % report.fmt_size(size) if size != a.size else "", title)
        if why:
            entry["error"] = why.splitlines()[0]
            progress("%s: skipped: %s" % (label, entry["error"]))
            return entry
        progress("%s: running (%gs + %gs warm-up)" % (label, a.seconds, a.warmup))
        try:
            if row == "grpc":
                res = runner.run_grpc_direct(self.ps, self.worker_target, clients, a.seconds,
                                             a.warmup, size, self._watch(row))
            else:
                addr = {"ceiling": self.echo_addr, "haproxy": self.haproxy_addr,
                        "pplex": self.pplex_addr}[row]
                res = runner.run_loadgen(self.ps, addr, clients, a.seconds, a.warmup,
                                         size, pipeline, self._watch(row))
        except (RowError, StartError, OSError) as exc:
            entry["error"] = str(exc)
            progress("%s: FAILED: %s" % (label, exc))
            return entry
        entry.update(res)
        progress("%s: %s rt/s  p50 %s us  p99 %s us  errors %d  cpu %s" % (
            label, report.fmt_int(res["rt_per_s"]), res["p50_us"], res["p99_us"],
            res.get("errors", 0), report.fmt_cpu(res.get("cpu", {}))))
        return entry

    def run_all(self):
        a = self.args
        for n in a.clients:
            for row in ROWS:
                if row in a.rows:
                    for transport in (a.transport if row == "pplex" else (None,)):
                        self.rows.append(self.run_row(row, n, transport=transport))
        if a.pipeline:
            for row in ("ceiling", "haproxy", "pplex"):
                if row in a.rows:
                    for transport in (a.transport if row == "pplex" else (None,)):
                        self.pipelined.append(self.run_row(row, a.pipeline_clients, a.pipeline, transport))
        self.run_sizes()
        if a.idle_conns:
            self.run_memory()

    def run_sizes(self):
        """HAProxy and pplex (each transport) at --sizes-clients clients, once per message size.

        A block the client-count rows already measured (same size and clients) is reused, not rerun.
        """
        a = self.args
        for size in a.sizes:
            for row in ("haproxy", "pplex"):
                if row not in a.rows:
                    continue
                for transport in (a.transport if row == "pplex" else (None,)):
                    done = [r for r in self.rows if r["row"] == row and r["clients"] == a.sizes_clients
                            and r["size"] == size and r.get("transport") == transport]
                    self.sized.append(dict(done[0]) if done else
                                      self.run_row(row, a.sizes_clients, transport=transport, size=size))

    # -- idle memory -------------------------------------------------------

    def run_memory(self):
        a = self.args
        # Fresh processes: after the load rows their allocators hold freed
        # memory that new connections would reuse, hiding the real cost.
        # (The transport does not change per-connection memory: the first one is measured.)
        for proc, _ in list(self.pplexes.values()):
            self.ps.stop(proc)
        self.pplexes.clear()
        self.start_pplex()
        self.memory.append(self._memory_one("pplex", self.pplex, self.pplex_addr, 1))
        if self.pplex is not None:
            self.ps.stop(self.pplex)
            self.pplex = None
        if a.memory_haproxy:
            if self.haproxy is not None:
                self.ps.stop(self.haproxy)
                self.haproxy = None
            try:
                self.haproxy, self.haproxy_addr, _ = targets.start_haproxy(
                    self.ps, self.tmpdir, self.echo_addr, self.nofile)
            except StartError as exc:
                self.errors["haproxy"] = str(exc)
            # HAProxy holds two descriptors per connection (client + backend):
            # if RLIMIT_NOFILE cannot be raised enough, measure fewer.
            conns = min(a.idle_conns, (self.nofile - 300) // 2)
            self.memory.append(self._memory_one("HAProxy", self.haproxy, self.haproxy_addr, 2, conns))

    def _memory_one(self, name, proc, addr, fds_per_conn, conns=None):
        a = self.args
        conns = conns or a.idle_conns
        if proc is None:
            why = self.errors.get(name.lower(), "not started").splitlines()[0]
            progress("idle memory %s: skipped: %s" % (name, why))
            return {"target": name, "error": why}
        note = "" if conns == a.idle_conns else " (not %d: RLIMIT_NOFILE %d)" % (a.idle_conns, self.nofile)
        progress("idle memory %s: opening %d idle connections%s" % (name, conns, note))
        try:
            res = runner.idle_memory(proc.pid, addr, conns, fds_per_conn=fds_per_conn,
                                     progress=progress)
        except (OSError, RuntimeError) as exc:
            progress("idle memory %s: FAILED: %s" % (name, exc))
            return {"target": name, "error": str(exc)}
        res["target"] = name
        if not proc.alive():
            res["error"] = "process exited during the test%s" % proc.diagnostics()
        progress("idle memory %s: %s accepted, %s bytes/conn" % (
            name, res["accepted"], report.fmt_int(res["bytes_per_conn"])))
        return res


def _terminate(signum, frame):
    # Turn SIGTERM/SIGHUP into the Ctrl-C path so every child group is stopped.
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    nofile = procs.raise_nofile()
    progress("RLIMIT_NOFILE %d; building Go helpers (bench/build.sh)" % nofile)
    build()
    info = machine_info()
    tmpdir = tempfile.mkdtemp(prefix="pplex-bench-")
    ps = procs.ProcSet(tmpdir)
    bench = Bench(args, ps, tmpdir, nofile)
    started = time.time()
    failed = False
    try:
        bench.start_targets()
        bench.run_all()
    except KeyboardInterrupt:
        progress("interrupted: stopping everything")
        failed = True
    except Exception as exc:  # noqa: BLE001 - report what we have, then fail
        progress("benchmark aborted: %s" % exc)
        traceback.print_exc(file=sys.stderr)
        failed = True
    finally:
        ps.stop_all()
        if args.keep_logs:
            progress("logs kept in %s" % tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)

    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "config": {
            "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
            "size": args.size, "pipeline": args.pipeline, "sizes": args.sizes,
            "sizes_clients": args.sizes_clients,
            "pipeline_clients": args.pipeline_clients, "idle_conns": args.idle_conns,
            "worker": getattr(bench, "worker_kind", None), "rows": args.rows,
            "transports": args.transport,
            "rlimit_nofile": nofile,
        },
        "unavailable": bench.errors,
        "rows": bench.rows,
        "pipelined": bench.pipelined,
        "sized": bench.sized,
        "memory": bench.memory,
    }
    results["ratios"] = report.ratios(bench.rows, bench.pipelined, bench.sized)
    sys.stdout.write(report.render(results))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        progress("results written to %s" % args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
