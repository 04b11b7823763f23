"""The admin API's cluster views: what this node tells others, and questions to other nodes.

Two halves:

- **this node's answers** (`local_ops`, `describe`), run on the reactor thread:
  the operations other nodes may ask for (`get` and `close` a connection by
  UUID, `stats`, a page of `connections`) and the fields of its heartbeat.
- **the routes' logic** (`cluster_view`, `connection`, `stats`,
  `connections`, `readiness`), run on the admin threads: a connection whose
  UUID names another node is looked up or closed on that node through the
  broker; `scope=cluster` gathers every live node's answer. They wait for the
  answers at most `cluster.admin_timeout` seconds; a node that does not answer
  in time is listed under `missing`, never waited for longer.

Errors are `pplex.errors.AdminRefusal` (status + JSON body), which the admin
app turns into its usual 4xx/5xx JSON error.
"""
import itertools
import threading

from pplex import limits, node, reasons
from pplex.connection import format_peer
from pplex.errors import AdminRefusal
from pplex.logs import FAULTS

STATS_SUMMED = ("connections_open", "connections_opened", "connections_closed", "connections_refused",
                "messages_in", "messages_out", "bytes_in", "bytes_out", "batches", "broadcasts",
                "rerouted", "redelivered", "unconfirmed", "backpressure_episodes", "unread_bytes")


# -- this node (reactor thread) ---------------------------------------------------------
def local_stats(app):
    proxy = app.proxy
    stats = {"node": node.current.id, **proxy.stats.snapshot(
        proxy.conns.values(), {"errors": FAULTS.snapshot(), "unread_bytes": proxy.client_output_bytes,
                               "replies_paused": proxy.replies_paused})}
    if app.cluster is not None:
        stats["cluster"] = app.cluster.snapshot()
    if getattr(app, "discovery", None):
        stats["discovery"] = [pool.as_dict() for pool in app.discovery]
    return stats


def _connection_info(app, client_uuid):
    proxy = app.proxy
    conn = proxy.conns.get(client_uuid) if isinstance(client_uuid, str) else None
    if conn is None:
        return None
    return {**proxy.connection_info(conn, proxy.reactor.clock()), "node": node.current.id}


def _close(app, client_uuid, by=None):
    proxy = app.proxy
    conn = proxy.conns.get(client_uuid) if isinstance(client_uuid, str) else None
    if conn is None:
        return False
    proxy.close(conn, reasons.CLOSED_BY_ADMIN, "closed through the admin API" + (f" of node {by}" if by else ""))
    return True


def _page(app, limit, offset=0, query=""):
    """A page of this node's connections; `query`: only those whose uuid or address contains it."""
    proxy = app.proxy
    now = proxy.reactor.clock()
    page = {"count": len(proxy.conns)}
    if query:
        matched = [c for c in proxy.conns.values() if query in c.uuid or query in format_peer(c.peer)]
        page["matched"] = len(matched)
        shown = matched[offset:offset + limit]
    else:
        shown = itertools.islice(proxy.conns.values(), offset, offset + limit)
    page["connections"] = [{**proxy.connection_info(c, now), "node": node.current.id} for c in shown]
    return page


def local_ops(app):
    """The operations another node may ask this one for: name -> fn(args)."""
    def bounded(value, high):
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high else 0
    return {
        "get": lambda args: _connection_info(app, args.get("uuid")),
        "close": lambda args: _close(app, args.get("uuid"), args.get("by")),
        "stats": lambda args: local_stats(app),
        "connections": lambda args: _page(app, bounded(args.get("limit"), limits.CLUSTER_PAGE_MAX), 0,
                                          args.get("q") if isinstance(args.get("q"), str) else ""),
    }


def describe(app):
    """This node's heartbeat fields beyond its identity: connections, upstreams, addresses."""
    proxy = app.proxy
    upstreams = list(proxy.upstreams)
    return {
        "connections": len(proxy.conns),
        "ready_upstreams": len(proxy.ready),
        "upstreams": [{"id": u.id, "address": u.address, "state": u.state}
                      for u in upstreams[:limits.HEARTBEAT_UPSTREAMS]],
        "upstreams_total": len(upstreams),
        "listen": _address(app.listen_address),
        "admin": _address(app.admin_address),
    }


def _address(address):
    if not address:
        return None
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the routes (admin threads) -------------------------------------------------------------
def _ask(app, op, args, tag=None):
    """Ask the node of `tag` (or every node) and wait: (answers, missing, error)."""
    done = threading.Event()
    box = {}

    def finished(answers, missing, error):
        box["result"] = (answers, missing, error)
        done.set()

    cluster = app.cluster
    app.control.call(cluster.ask, op, args, finished, tag)
    if not done.wait(cluster.admin_timeout + 1.0):
        raise AdminRefusal(504, "the cluster did not answer in time")
    return box["result"]


def cluster_view(app):
    """GET /cluster: this node, the broker, every live node with its connections and upstreams."""
    cluster = app.cluster
    if cluster is None:
        me = app.control.call(lambda: {**_identity(), **describe(app), "self": True, "last_seen_seconds": 0.0})
        return {"node": node.current.id, "broker": None, "nodes": [me]}
    nodes, snapshot = app.control.call(lambda: (cluster.live_nodes(), cluster.snapshot()))
    return {"node": node.current.id, "name": cluster.name,
            "broker": {"url": snapshot["broker"], "up": snapshot["broker_up"], "detail": snapshot["broker_detail"]},
            "heartbeat": cluster.heartbeat, "dead_after": cluster.dead_after, "nodes": nodes}


def _identity():
    return {"node": node.current.id, "tag": node.current.tag}


def connection(app, client_uuid, close=False):
    """GET or DELETE /connections/<uuid>, acting on the node that owns it."""
    tag = node.uuid_tag(client_uuid)
    if app.cluster is None or tag is None or tag == node.current.tag:
        if close:
            found = app.control.call(_close, app, client_uuid)
            result = {"closed": client_uuid, "node": node.current.id} if found else None
        else:
            result = app.control.call(_connection_info, app, client_uuid)
        if result is None:
            raise AdminRefusal(404, f"no connection {client_uuid}")
        return result
    answers, missing, error = _ask(app, "close" if close else "get",
                                   {"uuid": client_uuid, "by": node.current.id}, tag=tag)
    if error is not None and not missing:
        raise AdminRefusal(404, f"no connection {client_uuid} ({error})")
    if error is not None:
        raise AdminRefusal(503, f"cannot reach the node of {client_uuid}: {error}", node=missing[0])
    if missing:
        raise AdminRefusal(504, f"node {missing[0]} did not answer within {app.cluster.admin_timeout:g} s",
                           node=missing[0])
    owner, result = next(iter(answers.items()))
    if isinstance(result, dict) and "error" in result and close:
        raise AdminRefusal(502, result["error"], node=owner)
    if not result:
        raise AdminRefusal(404, f"no connection {client_uuid}", node=owner)
    return {"closed": client_uuid, "node": owner} if close else result


def stats(app, scope=None):
    """GET /stats: this node's counters; `scope=cluster`: every live node's, and their sums."""
    if scope in (None, "", "node"):
        return app.control.call(local_stats, app)
    _check_scope(app, scope)
    answers, missing, error = _ask(app, "stats", {})
    total = {key: 0 for key in STATS_SUMMED}
    drops = {}
    for answer in answers.values():
        if not isinstance(answer, dict):
            continue
        for key in STATS_SUMMED:
            value = answer.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] += value
        for reason, count in (answer.get("drops") or {}).items():
            if isinstance(count, int):
                drops[reason] = drops.get(reason, 0) + count
    return {"scope": "cluster", "node": node.current.id, **total, "drops": drops,
            "nodes": answers, "missing": missing, **({"error": error} if error else {})}


def connections(app, limit, offset, scope=None, query=""):
    """GET /connections: a page of this node's connections (`query`: a part of the uuid or address);
    `scope=cluster`: of every live node's."""
    if scope in (None, "", "node"):
        def page():
            return {"offset": offset, "limit": limit, **_page(app, limit, offset, query)}
        return app.control.call(page)
    _check_scope(app, scope)
    if offset + limit > limits.CLUSTER_PAGE_MAX:
        raise AdminRefusal(400, f"offset + limit must be at most {limits.CLUSTER_PAGE_MAX} with scope=cluster",
                           field="offset")
    answers, missing, error = _ask(app, "connections", {"limit": offset + limit, "q": query})
    listed = []
    count = matched = 0
    per_node = {}
    for node_id in sorted(answers):
        answer = answers[node_id]
        if not isinstance(answer, dict):
            continue
        per_node[node_id] = answer.get("count", 0)
        count += per_node[node_id] if isinstance(per_node[node_id], int) else 0
        matched += answer["matched"] if isinstance(answer.get("matched"), int) else 0
        listed.extend(answer.get("connections") or [])
    return {"scope": "cluster", "count": count, "offset": offset, "limit": limit, "nodes": per_node,
            "missing": missing, "connections": listed[offset:offset + limit],
            **({"matched": matched} if query else {}), **({"error": error} if error else {})}


def _check_scope(app, scope):
    if scope != "cluster":
        raise AdminRefusal(400, "scope: expected node or cluster", field="scope")
    if app.cluster is None:
        raise AdminRefusal(400, "scope=cluster needs cluster.broker", field="scope")


def readiness(app):
    """Extra /readyz fields: `degraded` while the broker is down (clients are still served)."""
    cluster = app.cluster
    if cluster is None:
        return {}
    if cluster.up:
        return {"broker": "up"}
    return {"status": "degraded", "broker": f"down: {cluster.broker_detail}"}
