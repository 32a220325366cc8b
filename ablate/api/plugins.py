"""The plugin manager: hookspecs, entry points (group `ablate`), and `--plugin file.py`.

Built-ins live in `plugins/ablate_builtins` and arrive through the same entry-point group a
third-party package uses. A broken plugin is remembered, not fatal: one whose entry point fails
to import, that implements a hook ablate does not define (a typo such as `ablate_probe`), whose
hook signature is wrong, or whose hook raises or registers something that is not a Component.
It is left out whole (none of its components are registered, so it never half-works), `ablate
plugins` lists it with the reason, and only a spec that names a component it may provide fails.
Two plugins (different sources) registering one name for one kind is a conflict: the name is
registered by neither, and `Registry.get` of it fails naming both; other specs still run.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from ablate.api import hookspecs
from ablate.api.components import Component
from ablate.errors import AblateError, InputError

KINDS = {"corpus": "ablate_corpora", "teacher": "ablate_teachers", "objective": "ablate_objectives", "probe": "ablate_probes",
         "executor": "ablate_executors", "logger": "ablate_loggers"}
HOOKS = sorted(KINDS.values())
ENTRY_POINT_GROUP = "ablate"


@dataclass
class Registered:
    cls: type[Component]
    source: str  # distribution name and version, or the --plugin path


@dataclass
class Registry:
    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    broken: dict[str, str] = field(default_factory=dict)  # plugin source → why it is not used
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (kind, name) → sources
    plugin_files: list[str] = field(default_factory=list)  # the --plugin files, absolute (for remote executors)

    def add(self, kind: str, cls: type[Component], source: str) -> None:
        """Register `cls`; a second source for the same kind and name makes it a conflict."""
        clash = self.conflicts.get((kind, cls.name))
        taken = self.components[kind].get(cls.name)
        if clash is not None:
            if source not in clash:
                clash.append(source)
        elif taken is None or taken.source == source:
            self.components[kind][cls.name] = Registered(cls, source)
        else:
            del self.components[kind][cls.name]
            self.conflicts[(kind, cls.name)] = [taken.source, source]

    def conflict_message(self, kind: str, name: str) -> str:
        sources = " and ".join(self.conflicts[(kind, name)])
        return (f"The {kind} {name!r} is registered by more than one plugin: {sources}. Uninstall one of "
                f"them (or drop its --plugin file), or rename the component in one of them.")

    def get(self, kind: str, name: str) -> type[Component]:
        if (kind, name) in self.conflicts:
            raise AblateError(self.conflict_message(kind, name))
        found = self.components[kind].get(name)
        if found is not None:
            return found.cls
        available = ", ".join(self.names(kind)) or "none"
        msg = f"Unknown {kind} plugin {name!r}. Available: {available}."
        if self.broken:
            fails = "; ".join(f"plugin {src} is broken: {why}" for src, why in self.broken.items())
            msg += f" Note: {fails} — it may be the one that provides {name!r}."
        raise AblateError(msg)

    def names(self, kind: str) -> list[str]:
        """Registered names, conflicting ones included (so that using them fails loudly)."""
        return sorted({*self.components[kind], *(n for k, n in self.conflicts if k == kind)})


def _source_of(dist: importlib.metadata.Distribution | None, fallback: str) -> str:
    if dist is None:
        return fallback
    return f"{dist.metadata['Name']} {dist.version}"


def load_registry(plugin_files: list[str | Path] = ()) -> Registry:
    """Build the registry: entry points of group `ablate`, then explicit plugin files."""
    pm = pluggy.PluginManager("ablate")
    pm.add_hookspecs(hookspecs)
    registry = Registry(plugin_files=[str(Path(p).resolve()) for p in plugin_files])
    loaded: list[tuple[object, str, str]] = []  # (module, source, key in registry.broken)

    def add(module, name: str, source: str, key: str) -> None:
        why = _unknown_hook(pm, module)
        if why is None:
            try:
                pm.register(module, name=name)
            except pluggy.PluginValidationError as exc:  # e.g. a hook with the wrong arguments
                pm.unregister(name=name)
                why = str(exc).replace("\n", "; ")
        if why is None:
            loaded.append((module, source, key))
        else:
            registry.broken[key] = why

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = _source_of(ep.dist, ep.value)
        key = f"{source} ({ep.name} = {ep.value})"
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break other specs
            registry.broken[key] = f"failed to import: {type(exc).__name__}: {exc}"
            continue
        if not pm.is_registered(module):
            add(module, ep.value, source, key)

    seen: set[Path] = set()
    for path in map(Path, plugin_files):
        if path.resolve() not in seen:  # the same file twice is one plugin, not a conflict
            seen.add(path.resolve())
            add(_import_file(path), str(path), str(path), str(path))

    for module, source, key in loaded:
        found: list[tuple[str, type]] = []
        try:
            for kind, hook_name in KINDS.items():
                def register(cls, _kind=kind):
                    found.append((_kind, _check_component(cls, _kind, source)))

                for impl in getattr(pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is module:
                        impl.function(register=register)
        except Exception as exc:  # a plugin's own bug must not break other specs
            registry.broken[key] = f"its {hook_name} hook failed: {type(exc).__name__}: {exc}"
            continue
        for kind, cls in found:
            registry.add(kind, cls, source)
    return registry


def _unknown_hook(pm: pluggy.PluginManager, module) -> str | None:
    """Why `module` is broken when a @hookimpl function of it names no ablate hook, else None."""
    for attr in dir(module):
        opts = pm.parse_hookimpl_opts(module, attr)
        hook = None if opts is None else opts.get("specname") or attr
        if hook is not None and hook not in HOOKS:
            close = difflib.get_close_matches(hook, HOOKS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"ablate's hooks are {', '.join(HOOKS)}."
            return f"implements hook {hook!r}, which ablate does not define; {hint}"
    return None


def _check_component(cls, kind: str, label: str) -> type[Component]:
    if not (isinstance(cls, type) and issubclass(cls, Component) and isinstance(getattr(cls, "name", None), str)):
        raise AblateError(f"Plugin {label} registered {cls!r} as a {kind}, but it is not an "
                          f"ablate.api.components.Component subclass with a string `name`.")
    return cls


def _import_file(path: Path):
    if not path.is_file():
        raise InputError(f"Plugin file {path} does not exist. Pass --plugin with the path of a "
                         f"Python file that defines hook implementations.")
    mod_name = f"ablate_local_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"Plugin file {path} failed to import: {type(exc).__name__}: {exc}. "
                         f"Fix the error in that file or drop the --plugin option.") from exc
    return module


def validate_params(kind: str, section: str, name: str, cls, table: dict) -> tuple[Any, list[tuple[str, str]]]:
    """A component's parameters from its spec table ([probes.<name>], [loggers.<name>]):
    (cls.Params instance, []) or (None, problems) naming each bad key and what the component accepts."""
    from pydantic import ValidationError

    try:
        return cls.Params.model_validate(table), []
    except ValidationError as exc:
        allowed = ", ".join(cls.Params.model_fields) or "none"
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = (f"unknown key (remove it or check its spelling) — {kind} {name!r} accepts: {allowed}"
                   if e["type"] == "extra_forbidden" else e["msg"])
            problems.append((f"{section}.{name}.{loc}" if loc else f"{section}.{name}", msg))
        return None, problems
