"""The `pplex` command: arguments, config loading, startup, signals and exit codes.

    pplex [--config pplex.json] [--listen HOST:PORT] [--upstream HOST:PORT]...
          [--admin HOST:PORT] [--plugins NAME,...] [--transport h2|grpcio]
          [--processes N] [--broker URL] [--log-level LEVEL] [--log-format text|json]
    pplex demo [same flags]     # plus an embedded echo worker: nc 127.0.0.1 7999
    pplex plugins [same flags]  # list every available plugin
    pplex check [same flags] [--resolve]  # validate all a start would, print the effective config

With --processes N > 1 this process supervises N pplex processes sharing the
client port (pplex.supervisor); each is a node of the cluster on the broker.

Exit codes: 0 after a clean stop (SIGINT/SIGTERM), 1 when a socket cannot be
bound, 2 for a bad configuration or flag (one line naming the bad value).
`pplex check` exits 0, or 2 with the line `pplex` would print (a socket that
cannot be bound included).
"""
import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from pplex import __version__, logs, node, supervisor
from pplex.config import load_file, parse_address, parse_count, validate, validate_upstream, validate_values
from pplex.errors import ConfigError

log = logging.getLogger("pplex")
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pplex", description="TCP-to-gRPC demultiplexing proxy.",
        epilog="Flags override the config file. See README.md.")
    parser.add_argument("command", nargs="?", default="run", choices=("run", "demo", "plugins", "check"),
                        help="run (default): the proxy; demo: the proxy plus an embedded echo worker; "
                             "plugins: list available plugins; check: validate everything a start would "
                             "and print the effective config as JSON")
    parser.add_argument("--config", metavar="FILE", help="pplex.json, or a config.toml of the original layout")
    parser.add_argument("--listen", metavar="HOST:PORT", help="client listener (default 0.0.0.0:7999)")
    parser.add_argument("--upstream", metavar="HOST:PORT", action="append", default=[],
                        help="an upstream worker; repeat for several (replaces the config's list)")
    parser.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP API (default 127.0.0.1:8000)")
    parser.add_argument("--plugins", metavar="NAME,...", help="plugins to enable, by short name")
    parser.add_argument("--transport", choices=("h2", "grpcio"),
                        help="gRPC client for workers: h2 (default: HTTP/2 in the reactor thread) or grpcio "
                             "(gRPC's own C-core client on its threads)")
    parser.add_argument("--processes", metavar="N",
                        help="reactor processes sharing the client port (default 1; more needs a broker)")
    parser.add_argument("--broker", metavar="URL",
                        help="cluster broker: nats://host:port or redis://host:port (cluster.broker)")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=LOG_LEVELS,
                        help="debug, info (default), warning or error; wins over the config's log_level")
    parser.add_argument("--log-format", choices=logs.LOG_FORMATS,
                        help="text (default): for people; json: one object per line, for log systems")
    parser.add_argument("--resolve", action="store_true",
                        help="with check: also resolve every upstream host name")
    parser.add_argument("--version", action="version", version=f"pplex {__version__}")
    return parser


def load_config(args, prepare=None):
    """The validated config: file (if any), then flags on top; `prepare(raw)` may change it first."""
    source = args.config or "config"
    raw = load_file(args.config) if args.config else {}
    if args.config:
        validate_values(raw, source)  # a bad value gives the file's own line, whichever flags follow
    raw = dict(raw)
    if args.listen:
        host, port = parse_address(args.listen, "--listen")
        raw["server"] = {**(raw.get("server") or {}), "host": host, "port": port}
    if args.admin:
        host, port = parse_address(args.admin, "--admin")
        raw["management_server"] = {**(raw.get("management_server") or {}), "host": host, "port": port}
    if args.upstream:
        raw["upstream"] = [dict(zip(("host", "port"), parse_address(a, "--upstream"))) for a in args.upstream]
    if args.transport:
        raw["transport"] = args.transport
    if args.log_format:
        raw["log_format"] = args.log_format
    if args.processes is not None:
        raw["server"] = {**(raw.get("server") or {}), "processes": parse_count(args.processes, "--processes")}
    if args.broker:
        raw["cluster"] = {**(raw.get("cluster") or {}), "broker": args.broker}
    if args.plugins is not None:
        names = [n.strip() for n in args.plugins.split(",") if n.strip()]
        configured = raw.get("plugins") or {}
        if isinstance(configured, list):
            configured = {name: {} for name in configured}
        raw["plugins"] = {**{name: {} for name in names}, **(configured if isinstance(configured, dict) else {})}
    if prepare is not None:
        prepare(raw)
    return validate(raw, source)


def main(argv=None):
    args = build_parser().parse_args(argv)
    child = supervisor.child_settings()
    demo_broker = None
    try:
        if child is not None:
            config = validate(child["config"], "config from the parent process")
            source = child["source"]
        else:
            source = args.config or "config"
            demo_broker = DemoBroker()
            config = load_config(args, prepare=demo_broker.prepare if args.command == "demo" else None)
    except ConfigError as error:
        print(error, file=sys.stderr)
        if demo_broker is not None:
            demo_broker.stop()
        return 2
    level = args.log_level or config.get("log_level") or "info"
    if args.command == "check" and LOG_LEVELS.index(level) < LOG_LEVELS.index("warning"):
        level = "warning"  # check's stderr is its one error line, not a startup's info lines
    logs.configure(level, config["log_format"])
    # gRPC's C core writes its own lines on stderr, not through Python's logging: only errors in text,
    # none in JSON (where every line must be one JSON object). Read when grpc is first imported.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE" if config["log_format"] == "json" else "ERROR")
    node.install_log_field()
    args.log_level = level   # what --processes passes on to its children
    try:
        if args.command == "plugins":
            return list_plugins(config, source)
        cluster = config["cluster"]
        node.configure(cluster.get("node") if child is None else child["node"],
                       None if child is None else child["index"],
                       cluster["name"] if cluster.get("broker") else None)
        token = config["management_server"].get("token") or os.environ.get("PPLEX_ADMIN_TOKEN") or None
        if args.command == "check":
            return run_check(args, config, token, source)
        demo_worker = None
        if args.command == "demo":
            demo_worker = start_demo_worker(config)
        if config["server"]["processes"] > 1:
            return run_processes(config, args, demo_worker, demo_broker, source)
        from pplex.app import App
        app = App(config, admin_token=token, source=source)
    except ConfigError as error:
        print(error, file=sys.stderr)
        if demo_broker is not None:
            demo_broker.stop()
        return 2
    try:
        app.start(reuse_port=child is not None)
    except OSError as error:
        print(f"pplex: {error.strerror or error}", file=sys.stderr)
        app.close()
        return 1
    print(app.describe_addresses(), flush=True)
    if child is not None:
        supervisor.watch_parent(app.stop)
    if demo_worker is not None:
        demo_hint(demo_worker, *app.listen_address[:2])
    install_signal_handlers(app)
    try:
        app.run()
    finally:
        app.close()
        if demo_worker is not None:
            demo_worker.stop(grace=0.5)
    log.info("stopped")
    return 0


def install_signal_handlers(app):
    """SIGTERM or SIGINT: a graceful stop (see `App.begin_shutdown`); one while a graceful stop runs
    (a second signal, or after POST /shutdown) stops at once. SIGHUP: read server.tls's certificate
    again (`App.reload_tls`)."""

    def on_signal(signum, frame):
        if not app.shutdown_requested:
            log.info("%s: stopping gracefully (send it again to stop at once)", signal.Signals(signum).name)
            app.begin_shutdown()
        else:
            app.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: app.reload_tls())


def run_check(args, config, token, source):
    from pplex.check import check
    effective = check(config, source, token=token, resolve=args.resolve)
    print(json.dumps(effective, indent=2))
    return 0
def run_processes(config, args, demo_worker, demo_broker, source):
    """--processes N > 1: supervise N children until stopped; the exit code."""
    def started(host, port):
        if demo_worker is not None:
            demo_hint(demo_worker, host, port)
    try:
        code = supervisor.Supervisor(config, args.log_level, on_started=started, source=source).run()
    except OSError as error:
        print(f"pplex: {error.strerror or error}", file=sys.stderr)
        code = 1
    if demo_worker is not None:
        demo_worker.stop(grace=0.5)
    if demo_broker is not None:
        demo_broker.stop()
    return code


class DemoBroker:
    """`pplex demo --processes N`: start a local nats-server when no broker is configured."""

    def __init__(self):
        self.proc = None

    def prepare(self, raw):
        server, cluster = raw.get("server") or {}, raw.get("cluster") or {}
        processes = server.get("processes", 1) if isinstance(server, dict) else 1
        if not isinstance(processes, int) or processes <= 1 or not isinstance(cluster, dict) \
                or cluster.get("broker"):
            return
        binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise ConfigError("demo: --processes needs a broker and nats-server is not installed: "
                              "apt-get install nats-server (or pass --broker nats://host:port or "
                              "redis://host:port)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError("demo: the local nats-server did not start") from None
                time.sleep(0.05)  # polling a child's port until it accepts, with a deadline
        print(f"demo: started nats-server on 127.0.0.1:{port} (pid {self.proc.pid}) as the cluster broker",
              flush=True)
        raw["cluster"] = {**cluster, "broker": f"nats://127.0.0.1:{port}"}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def demo_hint(demo_worker, host, port):
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"demo: echo worker on 127.0.0.1:{demo_worker.port}; try: nc {shown} {port}", flush=True)


def start_demo_worker(config):
    from pplex.worker import EchoWorker
    worker = EchoWorker().serve(port=0, host="127.0.0.1")
    config["upstream"] = [validate_upstream({"host": "127.0.0.1", "port": worker.port}), *config["upstream"]]
    return worker


def list_plugins(config, source):
    from pplex.manager import PluginSet
    plugins = PluginSet(enabled=list(config["plugins"]), settings=config["plugins"], source=source)
    rows = plugins.describe()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        mark = "enabled" if row["enabled"] else ("default" if row["default"] else "")
        print(f"{row['name']:<{width}}  {mark:<8} {', '.join(row['hooks'])}")
        if row.get("settings"):
            print(f"{'':<{width}}  settings: {row['settings']}")
        if row.get("error"):
            print(f"{'':<{width}}  cannot load: {row['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
