"""Finds, enables, validates and resolves plugins: the one place that talks to pluggy.

Built-in plugins (`plugins/`, installed as the `pplex_plugins` package) and
third-party ones are found the same way, through the `pplex.plugins` entry
point group, and enabled by short name. Each slot hook (framing, route,
balance, broadcast) is filled by exactly one plugin: the one you enable, else
the default. At startup the enabled hook implementations are resolved into
plain callables, so the per-message path makes direct calls, not pluggy calls.
"""
import importlib.metadata
import types

import pluggy
import voluptuous

from pplex import hookspecs
from pplex.errors import ConfigError
from pplex.logs import FAULTS

ENTRY_POINT_GROUP = "pplex.plugins"
SLOTS = {
    "pplex_framing": "framing",
    "pplex_route": "route",
    "pplex_balance": "balance",
    "pplex_broadcast": "broadcast",
}
DEFAULT_PLUGINS = ("framing_raw", "route_any", "rr", "broadcast_activity")


class Context:
    """What `pplex_configure` gets: the reactor, the validated config, the proxy."""

    def __init__(self, reactor, config, proxy):
        self.reactor = reactor
        self.config = config
        self.proxy = proxy


def available_plugins():
    """Every installed plugin: short name -> entry point."""
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def _load(name, entry):
    try:
        return entry.load()
    except Exception as error:
        raise ConfigError(f"plugins.{name}: cannot load {entry.value}: {error}") from error


def _slots_of(pm, plugin):
    """The slots a plugin fills; a wrapper only watches a slot, so it fills none."""
    return {SLOTS[impl_name] for impl_name in SLOTS
            if any(impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper)
                   for impl in getattr(pm.hook, impl_name).get_hookimpls())}


class PluginSet:
    """The enabled plugins, validated and resolved; built once at startup."""

    def __init__(self, enabled=(), settings=None, source=None):
        """`source`, the config file's name (or "config"), starts each error line, as in pplex.config."""
        try:
            self._build(enabled, settings)
        except ConfigError as error:
            if source is None:
                raise
            raise ConfigError(f"{source}: {error}") from error

    def _build(self, enabled, settings):
        settings = dict(settings or {})
        self.pm = pluggy.PluginManager("pplex")
        self.pm.add_hookspecs(hookspecs)
        self.available = available_plugins()
        names = list(dict.fromkeys(list(enabled) + list(settings)))
        unknown = [n for n in names if n not in self.available]
        if unknown:
            raise ConfigError(
                f"plugins: unknown plugin {unknown[0]!r}; valid names: {', '.join(sorted(self.available))}")
        claimed = {}
        for name in names:
            self.pm.register(_load(name, self.available[name]), name=name)
            for slot in _slots_of(self.pm, self.pm.get_plugin(name)):
                if slot in claimed:
                    raise ConfigError(
                        f"plugins: {claimed[slot]} and {name} both fill the {slot} slot; enable only one")
                claimed[slot] = name
        for name in DEFAULT_PLUGINS:
            if name in names or name not in self.available:
                continue
            module = _load(name, self.available[name])
            self.pm.register(module, name=name)
            plugin_slots = _slots_of(self.pm, module)
            if plugin_slots & set(claimed):
                self.pm.unregister(module)
                continue
            for slot in plugin_slots:
                claimed[slot] = name
        missing = sorted(set(SLOTS.values()) - set(claimed))
        if missing:
            raise ConfigError(f"plugins: no plugin fills the {missing[0]} slot")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            raise ConfigError(f"plugins.{error.plugin}: {error}") from error
        self.slot_owner = claimed
        self.settings = {name: self._validate(name, settings.get(name) or {}) for name in self.names()}

    def names(self):
        return [name for name, _ in self.pm.list_name_plugin()]

    def _only(self, hook_name, name):
        others = [p for n, p in self.pm.list_name_plugin() if n != name]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def schema_of(self, name):
        schema = self._only("pplex_settings_schema", name)()
        return schema if schema is not None else {}

    def _validate(self, name, value):
        """The plugin's schema applied to its settings, a fault boundary: a bad value, and a validator
        that raises anything else (a bug in a third-party plugin), are one line naming the setting."""
        from pplex.config import describe_invalid
        try:
            return _guarded(self.schema_of(name))(value)
        except voluptuous.MultipleInvalid as error:
            raise ConfigError(describe_invalid(error.errors[0], ("plugins", name))) from error
        except Exception as error:  # the schema as a whole (not a dict of keys) failed
            raise ConfigError(describe_invalid(voluptuous.Invalid(_failure(error)), ("plugins", name))) from error

    def configure(self, context, source=None):
        """Each plugin's `pplex_configure`; whatever one raises stops startup with one line naming it."""
        for name in self.names():
            try:
                self._only("pplex_configure", name)(settings=self.settings[name], context=context)
            except Exception as error:
                detail = str(error) if isinstance(error, ConfigError) else \
                    f"pplex_configure failed: {type(error).__name__}: {error}"
                line = f"plugins.{name}: {' '.join(detail.split())}"
                raise ConfigError(f"{source}: {line}" if source else line) from error

    # -- resolution into direct calls --------------------------------------
    def resolve(self, hook_name):
        """A plain callable taking the hook's arguments positionally, in spec order.

        One implementation: that function itself (or a thin adapter when it
        takes fewer parameters). Several: a loop keeping pluggy's order and
        its firstresult rule. Wrappers: pluggy's own caller, for exactness.
        """
        caller = getattr(self.pm.hook, hook_name)
        spec_args = tuple(caller.spec.argnames)
        impls = caller.get_hookimpls()
        if not impls:
            return None
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            return _keyword_adapter(caller, spec_args)
        functions = [_positional(impl.function, impl.argnames, spec_args) for impl in reversed(impls)]
        if len(functions) == 1:
            return functions[0]
        first_result = caller.spec.opts.get("firstresult")
        return _chain(functions, first_result)

    def notifier(self, hook_name):
        """A callable for an observer hook, or None when no plugin implements it.

        A fault boundary: each implementation runs on its own, in pluggy's order,
        and one that raises is counted and logged (`pplex_errors_total{where="plugin
        HOOK"}`) without stopping the others or the caller. Callers commit their
        state before they notify, so a raise can leave nothing half made.
        """
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if not impls:
            return None
        spec_args = tuple(caller.spec.argnames)
        where = f"plugin {hook_name}"
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            whole = _keyword_adapter(caller, spec_args)
            named = [(", ".join(self.pm.get_name(impl.plugin) for impl in impls), whole)]
        else:
            named = [(self.pm.get_name(impl.plugin), _positional(impl.function, impl.argnames, spec_args))
                     for impl in reversed(impls)]

        def notify(*args):
            for name, function in named:
                try:
                    function(*args)
                except Exception:
                    FAULTS.report(where, "in plugin %s; the others still ran", name)
        return notify

    def framing(self):
        framing = self.pm.hook.pplex_framing()
        for attribute in ("decode", "encode", "merges"):
            if not hasattr(framing, attribute):
                raise ConfigError(
                    f"plugins.{self.slot_owner['framing']}: its framing object has no {attribute!r}")
        return framing

    def describe(self):
        """Every available plugin: name, hooks, enabled, settings schema (for CLI and admin)."""
        enabled = set(self.names())
        rows = []
        for name, entry in sorted(self.available.items()):
            row = {"name": name, "module": entry.value, "enabled": name in enabled,
                   "default": name in DEFAULT_PLUGINS, "hooks": [], "settings": {}}
            try:
                module = self.pm.get_plugin(name) or entry.load()
            except Exception as error:
                row["error"] = str(error)
                rows.append(row)
                continue
            row["hooks"] = sorted(attr for attr in dir(module)
                                  if attr.startswith("pplex_")
                                  and self.pm.parse_hookimpl_opts(module, attr) is not None)
            row["slot"] = sorted(SLOTS[h] for h in row["hooks"] if h in SLOTS)
            schema = getattr(module, "pplex_settings_schema", None)
            if schema is not None:
                row["settings"] = describe_schema(schema())
            rows.append(row)
        return rows


def _guarded(schema):
    """A plugin's settings schema with each key's validator wrapped by `_caught`, so that whatever it
    raises is a `voluptuous.Invalid` at that key's path."""
    required, extra = False, voluptuous.PREVENT_EXTRA
    if isinstance(schema, voluptuous.Schema):
        schema, required, extra = schema.schema, schema.required, schema.extra
    if isinstance(schema, dict):
        schema = {key: _caught(voluptuous.Schema(inner, required=required, extra=extra))
                  for key, inner in schema.items()}
    return voluptuous.Schema(schema, required=required, extra=extra)


def _caught(validate):
    def caught(value):
        try:
            return validate(value)
        except voluptuous.Invalid:
            raise
        except Exception as error:
            raise voluptuous.Invalid(_failure(error)) from error
    return caught


def _failure(error):
    return f"the plugin's settings check failed: {type(error).__name__}: {error}"


def _positional(function, impl_args, spec_args):
    if tuple(impl_args) == spec_args:
        return function
    # An implementation may take a subset of the spec's parameters: build the
    # adapter once, as code, so each call costs one extra frame and no packing.
    source = f"lambda {', '.join(spec_args)}: function({', '.join(impl_args)})"
    return eval(source, {"function": function})  # names come from the hookspec and impl signatures


def _keyword_adapter(caller, spec_args):
    source = f"lambda {', '.join(spec_args)}: caller({', '.join(f'{a}={a}' for a in spec_args)})"
    return eval(source, {"caller": caller})


def _chain(functions, first_result):
    if first_result:
        def call_first(*args):
            for function in functions:
                result = function(*args)
                if result is not None:
                    return result
            return None
        return call_first

    def call_all(*args):
        return [r for r in (function(*args) for function in functions) if r is not None]
    return call_all


def describe_schema(schema):
    """A JSON-friendly rendering of a voluptuous schema: key -> type or rule."""
    if isinstance(schema, voluptuous.Schema):
        schema = schema.schema
    if isinstance(schema, dict):
        return {_key_text(k): describe_schema(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [describe_schema(v) for v in schema]
    if isinstance(schema, type):
        return schema.__name__
    if isinstance(schema, types.FunctionType):  # a validator: its doc's first line, else its name
        return (schema.__doc__ or "").strip().split("\n")[0] or schema.__name__
    return str(schema)


def _key_text(key):
    if isinstance(key, voluptuous.Marker):
        text = str(key.schema)
        if isinstance(key, voluptuous.Optional) and not isinstance(key.default, voluptuous.Undefined):
            default = key.default() if callable(key.default) else key.default
            return f"{text} (optional, default {default!r})"
        return text + (" (optional)" if isinstance(key, voluptuous.Optional) else "")
    return str(key)
