"""Plugin selection, slot rules and resolution into direct calls."""
import types

import pytest

from pplex import hookimpl
from pplex.config import validate
from pplex.errors import ConfigError
from pplex.manager import DEFAULT_PLUGINS, Context, PluginSet, _chain, _positional


def test_defaults_fill_every_slot():
    plugins = PluginSet()
    assert set(plugins.names()) == set(DEFAULT_PLUGINS)
    assert plugins.slot_owner == {"framing": "framing_raw", "route": "route_any", "balance": "rr",
                                  "broadcast": "broadcast_activity"}


def test_unknown_plugin_lists_the_valid_names():
    with pytest.raises(ConfigError) as error:
        PluginSet(enabled=["nope"])
    assert str(error.value).startswith("plugins: unknown plugin 'nope'; valid names: ")
    assert "rr" in str(error.value)


def test_resolved_hooks_are_the_plugin_functions_themselves():
    plugins = PluginSet()
    import pplex_plugins.rr as rr
    assert plugins.resolve("pplex_balance").__code__ is not rr.pplex_balance.__code__  # adapted: takes a subset
    balance = plugins.resolve("pplex_balance")
    picks = [balance(None, b"", ["a", "b"]) for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]
    assert plugins.resolve("pplex_authenticate") is None


def test_adapter_passes_only_the_parameters_an_impl_takes():
    def impl(candidates):
        return candidates[0]
    adapted = _positional(impl, ("candidates",), ("conn", "payload", "candidates"))
    assert adapted("conn", b"payload", ["x"]) == "x"
    assert _positional(impl, ("conn", "payload", "candidates"), ("conn", "payload", "candidates")) is impl


def test_chain_keeps_first_result_semantics():
    calls = []

    def declines(x):
        calls.append("declines")

    def answers(x):
        calls.append("answers")
        return x * 2

    def never(x):
        calls.append("never")
        return 0
    assert _chain([declines, answers, never], first_result=True)(21) == 42
    assert calls == ["declines", "answers"]


def test_two_plugins_in_one_slot_is_an_error(monkeypatch):
    other = types.ModuleType("other_balance")
    other.pplex_balance = hookimpl(lambda candidates: candidates[-1])
    entries = _fake_entries(monkeypatch, {"other": other})
    with pytest.raises(ConfigError, match="rr and other both fill the balance slot"):
        PluginSet(enabled=["rr", "other"])
    assert entries


def test_an_enabled_plugin_replaces_the_default_of_its_slot(monkeypatch):
    other = types.ModuleType("other_balance")
    other.pplex_balance = hookimpl(lambda candidates: candidates[-1])
    _fake_entries(monkeypatch, {"other": other})
    plugins = PluginSet(enabled=["other"])
    assert "rr" not in plugins.names()
    assert plugins.resolve("pplex_balance")(None, b"", [1, 2, 3]) == 3


def test_plugin_settings_are_validated_by_the_plugin_schema(monkeypatch):
    configurable = types.ModuleType("configurable")
    configurable.pplex_settings_schema = hookimpl(lambda: {"width": int})
    seen = {}
    configurable.pplex_configure = hookimpl(lambda settings: seen.update(settings))
    _fake_entries(monkeypatch, {"configurable": configurable})
    with pytest.raises(ConfigError, match=r"^plugins.configurable.width: expected int"):
        PluginSet(settings={"configurable": {"width": "wide"}})
    plugins = PluginSet(settings={"configurable": {"width": 2}})
    plugins.configure(Context(reactor=None, config=validate({}), proxy=None))
    assert seen == {"width": 2}


def _fake_entries(monkeypatch, modules):
    import pplex.manager as manager
    real = manager.available_plugins

    class Entry:
        def __init__(self, name, module):
            self.name, self.module, self.value = name, module, f"fake:{name}"

        def load(self):
            return self.module

    def available():
        found = real()
        found.update({name: Entry(name, module) for name, module in modules.items()})
        return found
    monkeypatch.setattr(manager, "available_plugins", available)
    return modules


def test_a_wrapper_sees_before_and_after_and_keeps_pluggy_semantics(monkeypatch):
    seen = []
    watcher = types.ModuleType("watcher")

    def around(candidates):
        seen.append(("before", len(candidates)))
        chosen = yield
        seen.append(("after", chosen))
        return chosen

    watcher.pplex_balance = hookimpl(wrapper=True)(around)
    _fake_entries(monkeypatch, {"watcher": watcher})
    plugins = PluginSet(enabled=["watcher"])
    balance = plugins.resolve("pplex_balance")
    first = balance(None, b"", ["a", "b"])
    assert first in ("a", "b")
    assert seen == [("before", 2), ("after", first)]
