"""Balancing: rendezvous hashing of the client's UUID, so a client keeps its worker.

Each candidate gets a score, a stable hash (BLAKE2b, 64 bits) of the client
UUID and the worker's id; the highest score wins (highest random weight).
While the candidates stay the same, a client's messages all go to one worker.
Adding a worker moves only the clients that now score highest on it (about
1/n of them, none between the old workers); removing one moves only its own
clients. The hash is not Python's `hash()` (salted per process): the same
client and workers give the same choice in any process.

Upstream ids (`u1`, `u2`, ...) are given by one pplex process in the order
workers are registered, as client UUIDs are. The choice for a connection is
cached on it (`conn.plugin_data()`), keyed on the candidates. No settings.
"""
import hashlib

from pplex import hookimpl

CACHE_KEY = "pplex_plugins.hash"


def score(client_uuid, upstream_id):
    digest = hashlib.blake2b(f"{client_uuid}\x00{upstream_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def pick(client_uuid, candidates):
    """The candidate with the highest score for this client (ties: the first)."""
    best = None
    best_score = -1
    for upstream in candidates:
        value = score(client_uuid, upstream.id)
        if value > best_score:
            best, best_score = upstream, value
    return best


@hookimpl
def pplex_balance(conn, candidates):
    if len(candidates) == 1:
        return candidates[0]
    key = tuple(candidates)
    data = conn.plugin_data()
    cached = data.get(CACHE_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    chosen = pick(conn.uuid, key)
    data[CACHE_KEY] = (key, chosen)
    return chosen
