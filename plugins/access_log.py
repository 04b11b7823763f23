"""Access log: one INFO line per connection opened and closed, and per upstream change.

An observer of the lifecycle hooks (it fills no slot and changes nothing),
and an example of them. It logs on the `pplex.access` logger, so the lines
can be routed or filtered on their own, as `key=value` fields with quoted
strings:

    open uuid=... remote=127.0.0.1:50312
    auth uuid=...
    close uuid=... remote=127.0.0.1:50312 duration=12.345s bytes_in=80 bytes_out=120 reason="client_closed"
    upstream added id=u1 address=127.0.0.1:50051
    upstream ready id=u1 address=127.0.0.1:50051
    upstream lost id=u1 address=127.0.0.1:50051 reason="data stream closed: ..."

`duration` is the reactor clock from accept to close. No settings.
"""
import json
import logging

from pplex import hookimpl
from pplex.connection import format_peer

log = logging.getLogger("pplex.access")
_state = {"clock": None}


@hookimpl
def pplex_configure(context):
    _state["clock"] = context.reactor.clock


@hookimpl
def pplex_connection_opened(conn):
    log.info("open uuid=%s remote=%s", conn.uuid, format_peer(conn.peer), extra={"uuid": conn.uuid})


@hookimpl
def pplex_connection_authenticated(conn):
    log.info("auth uuid=%s", conn.uuid, extra={"uuid": conn.uuid})


@hookimpl
def pplex_connection_closed(conn, reason):
    clock = _state["clock"]
    duration = clock() - conn.opened if clock is not None else 0.0
    log.info("close uuid=%s remote=%s duration=%.3fs bytes_in=%d bytes_out=%d reason=%s",
             conn.uuid, format_peer(conn.peer), duration, conn.bytes_in, conn.bytes_out, json.dumps(reason),
             extra={"uuid": conn.uuid, "reason": reason})


@hookimpl
def pplex_upstream_added(upstream):
    log.info("upstream added id=%s address=%s", upstream.id, upstream.address, extra={"upstream": upstream.address})


@hookimpl
def pplex_upstream_ready(upstream):
    log.info("upstream ready id=%s address=%s", upstream.id, upstream.address, extra={"upstream": upstream.address})


@hookimpl
def pplex_upstream_lost(upstream, reason):
    log.info("upstream lost id=%s address=%s reason=%s", upstream.id, upstream.address, json.dumps(reason),
             extra={"upstream": upstream.address, "reason": reason})
