"""auth_allow and auth_token, through the real plugin manager with fake connections and timers."""
import pytest

from pplex.config import validate
from pplex.errors import ConfigError
from pplex.manager import Context, PluginSet


class FakeTimer:
    def __init__(self, delay, fn, args):
        self.delay, self.fn, self.args, self.cancelled = delay, fn, args, False

    def cancel(self):
        self.cancelled = True

    def fire(self):
        if not self.cancelled:
            self.fn(*self.args)


class FakeReactor:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, fn, *args):
        timer = FakeTimer(delay, fn, args)
        self.timers.append(timer)
        return timer

    def clock(self):
        return 0.0


class FakeProxy:
    def __init__(self, merges=False):
        self.merges = merges
        self.closed = []

    def close(self, conn, reason, detail=None):
        conn.closed = True
        self.closed.append((conn, reason, detail))


class Conn:
    def __init__(self):
        self.authenticated = False
        self.closed = False


def configured(name, settings, proxy=None):
    reactor = FakeReactor()
    plugins = PluginSet(enabled=[name], settings={name: settings})
    context = Context(reactor=reactor, config=validate({}), proxy=None)
    plugins.configure(context)
    context.proxy = proxy or FakeProxy()  # as pplex does: the proxy exists after configure
    return plugins, reactor, context.proxy


# -- auth_allow ------------------------------------------------------------------
@pytest.mark.parametrize("settings, address, verdict", [
    ({}, "127.0.0.1", None),
    ({"deny": ["127.0.0.1/32"]}, "127.0.0.1", False),
    ({"deny": ["127.0.0.1/32"]}, "127.0.0.2", None),
    ({"allow": ["10.0.0.0/8", "::1/128"]}, "127.0.0.1", False),
    ({"allow": ["10.0.0.0/8", "::1/128"]}, "10.200.0.1", True),
    ({"allow": ["10.0.0.0/8", "::1/128"]}, "::1", True),
    ({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1"]}, "127.0.0.1", False),  # deny wins
    ({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1"]}, "127.0.0.9", True),
    ({"allow": ["fd00::/8"]}, "fd12:3456::1", True),
    ({"allow": ["fd00::/8"]}, "fe80::1%eth0", False),
    ({"deny": ["fe80::/10"]}, "fe80::1%eth0", False),
    ({"allow": ["192.168.1.0/24"]}, "::ffff:192.168.1.20", True),  # IPv4-mapped, dual-stack listener
    ({"deny": ["192.168.1.0/24"]}, "::ffff:192.168.1.20", False),
    ({"allow": ["10.1.2.3/8"]}, "10.9.9.9", True),  # host bits set: still the /8
])
def test_accept_rules(settings, address, verdict):
    plugins, _, _ = configured("auth_allow", settings)
    assert plugins.resolve("pplex_accept")((address, 50000)) is verdict


@pytest.mark.parametrize("settings, message", [
    ({"allow": ["10.0.0.0/33"]}, "plugins.auth_allow.allow[0]: not an IPv4 or IPv6 network"),
    ({"allow": ["10.0.0.0/8", "nope"]}, "plugins.auth_allow.allow[1]: not an IPv4 or IPv6 network"),
    ({"deny": [7]}, "plugins.auth_allow.deny[0]: expected a CIDR string"),
    ({"allow": "10.0.0.0/8"}, "plugins.auth_allow.allow: expected a list"),
])
def test_bad_cidr_is_one_line_naming_it(settings, message):
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["auth_allow"], settings={"auth_allow": settings})
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


# -- auth_token ------------------------------------------------------------------
def test_token_match_authenticates_and_cancels_the_deadline():
    plugins, reactor, proxy = configured("auth_token", {"tokens": ["alpha", "s3cret"], "auth_timeout": 2})
    opened = plugins.notifier("pplex_connection_opened")
    authenticate = plugins.resolve("pplex_authenticate")
    conn = Conn()
    opened(conn)
    [timer] = reactor.timers
    assert timer.delay == 2.0
    assert authenticate(conn, b"s3cret") is True
    assert timer.cancelled
    conn.authenticated = True
    timer.fire()
    assert proxy.closed == []


@pytest.mark.parametrize("payload", [b"s3cre", b"s3cret ", b"s3cret\n", b"S3CRET", b"", b"s3crets3cret"])
def test_anything_but_a_token_is_refused(payload):
    plugins, _, _ = configured("auth_token", {"tokens": ["s3cret"]})
    assert plugins.resolve("pplex_authenticate")(Conn(), payload) is False


def test_raw_framing_strips_one_trailing_newline():
    plugins, _, _ = configured("auth_token", {"tokens": ["s3cret"]}, proxy=FakeProxy(merges=True))
    authenticate = plugins.resolve("pplex_authenticate")
    assert authenticate(Conn(), b"s3cret\n") is True
    assert authenticate(Conn(), b"s3cret\r\n") is True
    assert authenticate(Conn(), b"s3cret") is True
    assert authenticate(Conn(), b"s3cret\n\n") is False


def test_no_token_before_the_deadline_closes_the_client():
    plugins, reactor, proxy = configured("auth_token", {"tokens": ["s3cret"], "auth_timeout": 0.5})
    conn = Conn()
    plugins.notifier("pplex_connection_opened")(conn)
    reactor.timers[0].fire()
    assert proxy.closed == [(conn, "auth_failed", "no token within 0.5 s")]


def test_closing_cancels_the_deadline():
    plugins, reactor, proxy = configured("auth_token", {"tokens": ["s3cret"]})
    conn = Conn()
    plugins.notifier("pplex_connection_opened")(conn)
    plugins.notifier("pplex_connection_closed")(conn, "client closed")
    assert reactor.timers[0].cancelled
    import pplex_plugins.auth_token as auth_token
    assert conn not in auth_token._timers


@pytest.mark.parametrize("settings, message", [
    ({}, "plugins.auth_token.tokens: required key is missing"),
    ({"tokens": []}, "plugins.auth_token.tokens: expected a non-empty list"),
    ({"tokens": ["ok", ""]}, "plugins.auth_token.tokens[1]: expected a non-empty string"),
    ({"tokens": ["ok"], "auth_timeout": 0}, "plugins.auth_token.auth_timeout: expected a number of seconds"),
])
def test_bad_token_settings_name_their_path(settings, message):
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["auth_token"], settings={"auth_token": settings})
    assert str(error.value).startswith(message)
