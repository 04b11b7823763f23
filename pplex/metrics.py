"""Prometheus text exposition of pplex's counters, with prometheus_client.

A custom collector reads the proxy's plain counters when scraped (on the
reactor thread, through the admin Control), so the per-message path never
touches a Prometheus object.
"""
from prometheus_client import CollectorRegistry, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pplex import node, reasons
from pplex.logs import FAULTS

UPSTREAM_STATES = ("connecting", "unready", "ready", "draining")


class _ProxyCollector:
    def __init__(self, app):
        self.app = app

    def collect(self):
        """Every family, each sample labelled with this node's id (`node`)."""
        node_id = node.current.id
        for family in self._families():
            family.samples = [s._replace(labels={**s.labels, "node": node_id}) for s in family.samples]
            yield family

    def _families(self):
        proxy = self.app.proxy
        snap, upstreams, unread, groups = self.app.control.call(
            lambda: (proxy.stats.snapshot(proxy.conns.values()), [u.as_dict() for u in proxy.upstreams],
                     proxy.client_output_bytes, len(proxy.groups)))
        yield GaugeMetricFamily("pplex_connections_open", "Open client connections.",
                                value=snap["connections_open"])
        for name, key, text in (
                ("pplex_connections_opened", "connections_opened", "Client connections accepted."),
                ("pplex_connections_closed", "connections_closed", "Client connections closed."),
                ("pplex_connections_refused", "connections_refused", "Connections refused at accept."),
                ("pplex_messages_in", "messages_in", "Messages from clients."),
                ("pplex_messages_out", "messages_out", "Messages written to clients."),
                ("pplex_bytes_in", "bytes_in", "Bytes read from clients."),
                ("pplex_bytes_out", "bytes_out", "Bytes written to clients."),
                ("pplex_broadcasts", "broadcasts", "Broadcasts delivered."),
                ("pplex_messages_rerouted", "rerouted", "Messages re-routed after a worker left."),
                ("pplex_messages_redelivered", "redelivered",
                 "Unconfirmed messages sent again (server.redeliver_unconfirmed)."),
                ("pplex_messages_unconfirmed", "unconfirmed",
                 "Messages written to a stream that broke before the worker answered."),
                ("pplex_backpressure_episodes", "backpressure_episodes",
                 "Times clients fell behind by more than output_budget and replies were paused.")):
            yield CounterMetricFamily(name, text, value=snap[key])
        yield GaugeMetricFamily("pplex_clients_unread_bytes", "Bytes written to clients and not yet sent.",
                                value=unread)
        closes = CounterMetricFamily("pplex_connections_closed_by_reason",
                                     "Client connections closed, by reason (pplex.reasons).", labels=["reason"])
        for reason in reasons.REASONS:
            closes.add_metric([reason], snap["closes"].get(reason, 0))
        yield closes
        errors = CounterMetricFamily("pplex_errors", "Errors contained at a fault boundary, by where.",
                                     labels=["where"])
        for where, count in sorted(FAULTS.snapshot().items()):
            errors.add_metric([where], count)
        yield errors
        drops = CounterMetricFamily("pplex_drops", "Messages or replies dropped, by reason.",
                                    labels=["reason"])
        for reason, count in sorted(snap["drops"].items()):
            drops.add_metric([reason], count)
        yield drops
        door = CounterMetricFamily("pplex_front_door_failures",
                                   "Clients closed before they were open (PROXY header, TLS handshake), by kind.",
                                   labels=["kind"])
        for kind, count in sorted(snap["front_door"].items()):
            door.add_metric([kind], count)
        yield door
        events = CounterMetricFamily("pplex_lifecycle_events", "Lifecycle events queued for workers, by kind.",
                                     labels=["kind"])
        for kind, count in sorted(snap["lifecycle_events"].items()):
            events.add_metric([kind], count)
        yield events
        actions = CounterMetricFamily("pplex_worker_actions", "Session actions applied (README, Sessions), by action.",
                                      labels=["action"])
        for action, count in sorted(snap["actions"].items()):
            actions.add_metric([action], count)
        yield actions
        yield GaugeMetricFamily("pplex_groups", "Groups with at least one member on this node.", value=groups)
        state = GaugeMetricFamily("pplex_upstream_state", "1 for the state each upstream is in.",
                                  labels=["upstream", "address", "state"])
        routed = CounterMetricFamily("pplex_upstream_messages_routed", "Messages routed to each upstream.",
                                     labels=["upstream", "address"])
        live = GaugeMetricFamily("pplex_upstream_live_rtt_seconds",
                                 "Round trip of the latest live heartbeat.", labels=["upstream", "address"])
        ready = GaugeMetricFamily("pplex_upstream_ready_probe_seconds",
                                  "Duration of the latest successful ready probe.", labels=["upstream", "address"])
        ejections = CounterMetricFamily("pplex_upstream_ejections", "Times each upstream was ejected from rotation.",
                                        labels=["upstream", "address"])
        for up in upstreams:
            labels = [up["id"], up["address"]]
            ejections.add_metric(labels, up["ejections"])
            for name in UPSTREAM_STATES:
                state.add_metric(labels + [name], 1 if up["state"] == name else 0)
            routed.add_metric(labels, up["messages_routed"])
            if up["live_rtt_seconds"] is not None:
                live.add_metric(labels, up["live_rtt_seconds"])
            if up["ready_probe_seconds"] is not None:
                ready.add_metric(labels, up["ready_probe_seconds"])
        yield from (state, routed, live, ready, ejections)
        cluster = self.app.cluster
        if cluster is not None:
            yield from _cluster_families(self.app.control.call(cluster.snapshot))


def _cluster_families(snap):
    yield GaugeMetricFamily("pplex_cluster_broker_up", "1 while the broker connection is up.",
                            value=1 if snap["broker_up"] else 0)
    yield GaugeMetricFamily("pplex_cluster_nodes", "Live nodes in the cluster, this one included.",
                            value=snap["nodes"])
    yield CounterMetricFamily("pplex_cluster_relayed", "Broadcasts and replies published for other nodes.",
                              value=snap["relayed_out"])
    applied = CounterMetricFamily("pplex_cluster_applied", "Relays from other nodes applied here, by kind.",
                                  labels=["kind"])
    for kind, count in sorted(snap["relayed_in"].items()):
        applied.add_metric([kind], count)
    yield applied
    unrelayed = CounterMetricFamily(
        "pplex_cluster_unrelayed", "Broadcasts and replies for other nodes that could not be relayed, by reason.",
        labels=["reason"])
    for reason in sorted({"broker_down", *snap["unrelayed"]}):
        unrelayed.add_metric([reason], snap["unrelayed"].get(reason, 0))
    yield unrelayed
    dropped = CounterMetricFamily("pplex_cluster_dropped", "Frames or records from the broker dropped, by reason.",
                                  labels=["reason"])
    for reason, count in sorted(snap["dropped"].items()):
        dropped.add_metric([reason], count)
    yield dropped


def metrics_exporter(app):
    """A function returning (body, content type) for GET /metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProxyCollector(app))

    def export():
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return export
