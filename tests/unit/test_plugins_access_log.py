"""access_log: one line per connection open and close, and per upstream change, on `pplex.access`."""
import logging

from pplex.config import validate
from pplex.manager import Context, PluginSet


class Reactor:
    now = 100.0

    def clock(self):
        return self.now


class Conn:
    uuid = "0f0f0f0f-0000-4000-8000-000000000001"
    peer = ("::1", 50312, 0, 0)
    opened = 88.0
    bytes_in = 80
    bytes_out = 120


class Up:
    id = "u2"
    address = "127.0.0.1:50051"


def test_lines_for_connections_and_upstreams(caplog):
    plugins = PluginSet(enabled=["access_log"])
    plugins.configure(Context(reactor=Reactor(), config=validate({}), proxy=None))
    caplog.set_level(logging.INFO, logger="pplex.access")
    plugins.notifier("pplex_connection_opened")(Conn())
    plugins.notifier("pplex_connection_closed")(Conn(), 'bad input: "x"')
    plugins.notifier("pplex_upstream_added")(Up())
    plugins.notifier("pplex_upstream_ready")(Up())
    plugins.notifier("pplex_upstream_lost")(Up(), "removed")
    assert {r.name for r in caplog.records} == {"pplex.access"}
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert [r.getMessage() for r in caplog.records] == [
        f"open uuid={Conn.uuid} remote=[::1]:50312",
        f"close uuid={Conn.uuid} remote=[::1]:50312 duration=12.000s bytes_in=80 bytes_out=120 "
        r'reason="bad input: \"x\""',
        "upstream added id=u2 address=127.0.0.1:50051",
        "upstream ready id=u2 address=127.0.0.1:50051",
        'upstream lost id=u2 address=127.0.0.1:50051 reason="removed"',
    ]
