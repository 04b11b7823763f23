"""pplex: a TCP-to-gRPC demultiplexing proxy.

Plugin authors need one name from here, the marker for hook implementations::

    # my_rooms/plugin.py
    from pplex import hookimpl

    @hookimpl
    def pplex_balance(conn, candidates):
        return candidates[hash(conn.uuid) % len(candidates)]

and one line in their package's setup.py::

    entry_points={"pplex.plugins": ["rooms = my_rooms.plugin"]}

then `pplex --plugins rooms`. The hooks are documented in `pplex.hookspecs`.
"""
import pluggy

from pplex.errors import FrameError

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("pplex")

__all__ = ["hookimpl", "FrameError", "__version__"]
