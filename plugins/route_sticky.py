"""Routing: a client stays on the worker that first served it, while that worker is in rotation.

A connection's first message goes to any worker in rotation (the balancer
picks, e.g. round-robin); every later message goes to the worker its previous
message went to (`conn.last_upstream`), as long as that worker is still in
`ready`. When the worker leaves rotation (lost, drained, removed), the
client's next message, and any of its messages that worker never took, go to
any ready worker through the balancer, and the client stays on that one. The
client's connection is never closed for it.

For a worker with per-client state (a game session, a parser in mid-stream)
that tolerates a move when its worker dies. No settings.
"""
from pplex import hookimpl


@hookimpl
def pplex_route(conn, ready):
    up = conn.last_upstream
    # Identity test over the (few) workers in rotation: a worker that is
    # leaving is out of `ready` before its unsent messages are routed again.
    if up is not None and up in ready:
        return (up,)
    return ready
