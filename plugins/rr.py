"""Balancing (default): round-robin over the candidates, per message."""
from pplex import hookimpl

_turn = [0]


@hookimpl
def pplex_configure():
    _turn[0] = 0


@hookimpl
def pplex_balance(candidates):
    turn = _turn[0] + 1
    _turn[0] = turn
    return candidates[turn % len(candidates)]
