"""Assembles a running pplex from a validated config: startup and shutdown order.

Order matters: plugins are validated and configured before anything listens;
the client listener comes up before the admin API (so `/healthz` answering
means clients can connect); configured upstreams are added last and join
rotation as their ready probes answer.
"""
import logging
import resource

from pplex import admin_cluster, limits, node
from pplex.admin import AdminServer, Control, build_app
from pplex.bridge import GrpcTransport
from pplex.config import ADMIN_LOG_LEVELS
from pplex.connection import format_peer
from pplex.errors import ConfigError
from pplex.h2link import H2Transport
from pplex.manager import Context, PluginSet
from pplex.metrics import metrics_exporter
from pplex.proxy import Proxy
from pplex.reactor import Reactor

log = logging.getLogger("pplex")

# config "transport" -> how pplex speaks gRPC to workers (both implement pplex.transport.Transport)
TRANSPORTS = {"grpcio": GrpcTransport, "h2": H2Transport}


def raise_file_limit():
    """Let pplex hold as many sockets as the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def check_frame_limits(plugin_settings, upstreams, source=None):
    """A plugin's `max_frame_bytes` may not exceed the smallest upstream max_message_bytes: a frame
    larger than a worker's gRPC limit would break the stream every client of that worker shares.
    `source` (the config file) starts the error line, as it does the config's own."""
    smallest = min((u["max_message_bytes"] for u in upstreams), default=limits.MAX_MESSAGE_BYTES.default)
    for name, settings in plugin_settings.items():
        value = settings.get("max_frame_bytes") if isinstance(settings, dict) else None
        if isinstance(value, int) and value > smallest:
            prefix = f"{source}: " if source else ""
            raise ConfigError(f"{prefix}plugins.{name}.max_frame_bytes: must not be above the upstreams' "
                              f"max_message_bytes ({smallest}) (got {value})")


class App:
    def __init__(self, config, admin_token=None, source=None):
        """`source`: the config file's name (or "config"), for config errors found here (plugins)."""
        self.config = config
        self.admin_token = admin_token
        self.reactor = Reactor()
        self.plugins = PluginSet(enabled=list(config["plugins"]), settings=config["plugins"], source=source)
        check_frame_limits(self.plugins.settings, config["upstream"], source)
        self.context = Context(self.reactor, config, proxy=None)
        self.plugins.configure(self.context, source)
        self.transport = TRANSPORTS[config["transport"]](self.reactor)
        log.info("workers are reached with the %s transport", config["transport"])
        self.proxy = Proxy(self.reactor, config, self.plugins, self.transport)
        self.context.proxy = self.proxy
        self.control = Control(self.reactor)
        self.admin = None
        self.listen_address = None
        self.admin_address = None
        self.cluster = None
        self.shutdown_requested = False   # a graceful stop began (SIGTERM or POST /shutdown)
        if config["cluster"].get("broker"):
            from pplex.cluster import Cluster
            self.cluster = Cluster(self.reactor, self.proxy, node.current, config["cluster"],
                                   describe=lambda: admin_cluster.describe(self),
                                   ops=admin_cluster.local_ops(self))
            self.proxy.cluster = self.cluster
        self.discovery = None

    def start(self, reuse_port=False):
        """Listen for clients, serve the admin API, join the cluster, register configured upstreams."""
        raise_file_limit()
        server = self.config["server"]
        self.listen_address = self.proxy.listen(server["host"], server["port"], reuse_port=reuse_port)
        management = self.config["management_server"]
        if "log_level" in management:
            level = ADMIN_LOG_LEVELS[management["log_level"]]
            for name in ("pplex.admin", "waitress"):
                logging.getLogger(name).setLevel(level)
        if "tls" in management:
            log.warning("management_server.tls: the admin API does not serve TLS; it answers plain HTTP on "
                        "%s:%s: keep it on loopback, or put a TLS terminator in front of it",
                        management["host"], management["port"])
        app = build_app(self, token=self.admin_token, metrics=metrics_exporter(self),
                        max_body_bytes=management["max_body_bytes"])
        self.admin = AdminServer(app, management["host"], management["port"], threads=management["threads"],
                                 max_body_bytes=management["max_body_bytes"],
                                 connection_limit=management["connection_limit"],
                                 idle_timeout=management["idle_timeout"])
        self.admin_address = self.admin.start()
        if self.admin_token is None and management["host"] not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the admin API listens on %s with no token: anyone who reaches it can "
                        "change upstreams; set management_server.token or PPLEX_ADMIN_TOKEN",
                        management["host"])
        if self.cluster is not None:
            self.cluster.start()
        for spec in self.config["upstream"]:
            if "dns" in spec:
                if self.discovery is None:
                    from pplex.discovery import Discovery
                    self.discovery = Discovery(self.reactor, self.proxy.upstreams)
                self.discovery.add(spec)
                continue
            self.proxy.upstreams.add(spec)
        if not self.config["upstream"]:
            log.warning("no upstream configured: clients' messages wait until one is added "
                        "(POST /upstream/add on the admin API)")
        return self.listen_address, self.admin_address

    def describe_addresses(self):
        return (f"pplex listening on {format_peer(self.listen_address)}, "
                f"admin API on http://{format_peer(self.admin_address)}, node {node.current.id}")

    def run(self):
        self.reactor.run()

    def stop(self):
        """Ask the loop to end now; safe from any thread or a signal handler."""
        self.reactor.stop()

    def begin_shutdown(self):
        """The graceful stop (SIGTERM): stop accepting, /readyz 503, close clients spread over
        server.shutdown_spread without losing what is in flight, let lifecycle workers take every
        DISCONNECTED, then end the loop. Safe from any thread or a signal handler."""
        self.shutdown_requested = True
        self.reactor.call_soon_threadsafe(self.start_shutdown)

    def start_shutdown(self):
        """`begin_shutdown` on the reactor thread (POST /shutdown): the number of clients it closes,
        or None when a shutdown had begun already."""
        self.shutdown_requested = True
        return self.proxy.begin_shutdown(self.stop)

    def reload_tls(self):
        """SIGHUP: the client certificate (server.tls) is read again for new connections, in the
        reactor thread; logged either way. Safe from any thread or a signal handler."""
        self.reactor.call_soon_threadsafe(self.proxy.front_door.reload_tls)

    def close(self):
        if self.discovery is not None:
            self.discovery.close()
        if self.cluster is not None:
            self.cluster.close()
        self.proxy.shutdown()
        if self.admin is not None:
            self.admin.close()
        self.transport.close()
        self.reactor.close()
