"""The plugin manager: hookspecs, entry points (group `ablate`), and `--plugin file.py`.

Built-ins live in `plugins/ablate_builtins` and arrive through the same entry-point group a
third-party package uses. A plugin that fails to import is remembered, not fatal: only a spec
that names one of its components fails, with the plugin's error in the message.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from ablate import hookspecs
from ablate.components import Component
from ablate.errors import AblateError, InputError

KINDS = {"corpus": "ablate_corpora", "teacher": "ablate_teachers", "objective": "ablate_objectives", "probe": "ablate_probes"}
ENTRY_POINT_GROUP = "ablate"


@dataclass
class Registered:
    cls: type[Component]
    source: str  # distribution name and version, or the --plugin path


@dataclass
class Registry:
    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    broken: dict[str, str] = field(default_factory=dict)  # plugin source → import error

    def get(self, kind: str, name: str) -> type[Component]:
        found = self.components[kind].get(name)
        if found is not None:
            return found.cls
        available = ", ".join(sorted(self.components[kind])) or "none"
        msg = f"Unknown {kind} plugin {name!r}. Available: {available}."
        if self.broken:
            fails = "; ".join(f"{src} failed to import ({err})" for src, err in self.broken.items())
            msg += f" Note: {fails} — it may be the one that provides {name!r}."
        raise AblateError(msg)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])


def _source_of(dist: importlib.metadata.Distribution | None, fallback: str) -> str:
    if dist is None:
        return fallback
    return f"{dist.metadata['Name']} {dist.version}"


def load_registry(plugin_files: list[str | Path] = ()) -> Registry:
    """Build the registry: entry points of group `ablate`, then explicit plugin files."""
    pm = pluggy.PluginManager("ablate")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    sources: dict[int, str] = {}

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = _source_of(ep.dist, ep.value)
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break other specs
            registry.broken[f"{label} ({ep.name} = {ep.value})"] = f"{type(exc).__name__}: {exc}"
            continue
        if pm.is_registered(module):
            continue
        pm.register(module, name=f"{ep.value}")
        sources[id(module)] = label

    for path in plugin_files:
        module = _import_file(Path(path))
        pm.register(module, name=str(path))
        sources[id(module)] = str(path)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise AblateError(f"A plugin implements a hook ablate does not define: {exc}. "
                          f"Hooks are: {', '.join(sorted(KINDS.values()))}.") from exc

    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            label = sources.get(id(impl.plugin), impl.plugin_name)

            def register(cls, _kind=kind, _label=label):
                _check_component(cls, _kind, _label)
                registry.components[_kind][cls.name] = Registered(cls, _label)

            impl.function(register=register)
    return registry


def _check_component(cls, kind: str, label: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Component) and isinstance(getattr(cls, "name", None), str)):
        raise AblateError(f"Plugin {label} registered {cls!r} as a {kind}, but it is not an "
                          f"ablate.components.Component subclass with a string `name`.")


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
