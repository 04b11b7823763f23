"""Balancing: the candidate with the fewest messages in flight; ties go round-robin.

In flight, for one worker: the messages given to its stream and not yet
followed by an answer from it (`upstream.link.unanswered()`), plus those still
in this pass's batch for it. A slow or stuck worker stops receiving new
messages while faster ones have fewer waiting; idle workers share the load in
turn. No settings.
"""
from pplex import hookimpl

_turn = [0]


@hookimpl
def pplex_configure():
    _turn[0] = 0


@hookimpl
def pplex_balance(candidates):
    if len(candidates) == 1:
        return candidates[0]
    best_load = -1
    tied = None
    for upstream in candidates:
        load = upstream.link.unanswered() + len(upstream.batch) // 3
        if tied is None or load < best_load:
            best_load, tied = load, [upstream]
        elif load == best_load:
            tied.append(upstream)
    if len(tied) == 1:
        return tied[0]
    turn = _turn[0] = _turn[0] + 1
    return tied[turn % len(tied)]
