"""Broadcast (default): ALL, ACTIVE and NOT_ACTIVE by the activity window.

A connection is *active* when it sent data within `server.active_window`
seconds (default 30), otherwise not active: in a game server, playing vs. away.
A connection that never sent anything is not active. Connections still
waiting to authenticate receive no broadcast.
"""
from pplex import hookimpl

ALL, ACTIVE, NOT_ACTIVE = 0, 1, 2
_window = [30.0]


@hookimpl
def pplex_configure(context):
    _window[0] = context.config["server"]["active_window"]


@hookimpl
def pplex_broadcast(kind, connections, now):
    if kind == ALL:
        return [c for c in connections if c.authenticated]
    window = _window[0]
    if kind == ACTIVE:
        return [c for c in connections
                if c.authenticated and c.last_read is not None and now - c.last_read <= window]
    if kind == NOT_ACTIVE:
        return [c for c in connections
                if c.authenticated and (c.last_read is None or now - c.last_read > window)]
    return None
