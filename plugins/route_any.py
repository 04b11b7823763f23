"""Routing (default): every worker in rotation is a candidate for every message."""
from pplex import hookimpl


@hookimpl
def pplex_route(ready):
    return ready
