"""The plugin manager and the domain registry it fills.

Plugins are found through the ``e4t`` entry-point group; the built-in domains
(faces, cats, art) are separate distributions found the same way. Loading is
guarded: a plugin that fails to import or to register costs one warning line,
never the CLI.

Environment:
    E4T_DISABLE_PLUGIN_AUTOLOAD=1  load only the built-in domain plugins
                                   (and those named in E4T_LOAD_PLUGINS)
    E4T_LOAD_PLUGINS=a,b           load these plugins even when autoload is off
    E4T_BLOCK_PLUGINS=a,b          never load these (entry-point or distribution names)
    E4T_DEBUG=1                    show the traceback of a failing plugin
"""

import difflib
import os
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable, Optional

import pluggy

from e4tcli import hookspecs
from e4tcli.domain import Domain, validate_domain
from e4tcli.errors import UsageError

ENTRY_POINT_GROUP = "e4t"
BUILTIN_DISTRIBUTIONS = frozenset({"e4t-faces", "e4t-cats", "e4t-art", "e4t-minifaces"})


def debug_enabled() -> bool:
    return os.environ.get("E4T_DEBUG", "") not in ("", "0")


def _env_names(variable: str) -> set[str]:
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from, for listings and error messages."""

    name: str
    distribution: Optional[str] = None
    version: Optional[str] = None

    def describe(self) -> str:
        if self.distribution:
            return f"plugin '{self.name}' (distribution {self.distribution} {self.version or ''})".replace(" )", ")")
        return f"plugin '{self.name}'"


@dataclass(frozen=True)
class RegisteredDomain:
    domain: Domain
    plugin: PluginInfo


class DomainRegistry:
    """The domains that loaded, and the problems met while loading plugins."""

    def __init__(self) -> None:
        self.domains: dict[str, RegisteredDomain] = {}
        self.plugins: list[PluginInfo] = []
        self.problems: list[str] = []
        """One line per problem, naming the plugin."""
        self.broken: list[tuple[PluginInfo, str]] = []
        """The same problems by plugin (for ``e4t domains --all``)."""

    def names(self) -> list[str]:
        return sorted(self.domains)

    def get(self, name: str) -> RegisteredDomain:
        try:
            return self.domains[name]
        except KeyError:
            installed = ", ".join(self.names()) or "none"
            raise UsageError(
                f"unknown domain '{name}' (installed: {installed})",
                hint="install more with 'pip install <plugin package>' (any package with an 'e4t' entry point)",
            ) from None

    def report(self, plugin: PluginInfo, problem: str) -> None:
        self.problems.append(f"{plugin.describe()} {problem}")
        self.broken.append((plugin, problem))

    def add(self, domain: Any, plugin: PluginInfo) -> None:
        """Validate and add ``domain``; a bad one is skipped with a problem line."""
        problems = validate_domain(domain)
        if not problems and domain.name in self.domains:
            owner = self.domains[domain.name].plugin
            problems = [f"domain name '{domain.name}' is already registered by {owner.describe()}"]
        if problems:
            label = getattr(domain, "name", "?")
            self.report(plugin, f"registered an invalid domain '{label}': {'; '.join(problems)}")
            return
        self.domains[domain.name] = RegisteredDomain(domain, plugin)


def _plugin_info(entry_point: EntryPoint) -> PluginInfo:
    dist = entry_point.dist
    if dist is None:
        return PluginInfo(entry_point.name)
    return PluginInfo(entry_point.name, dist.metadata["Name"], dist.version)


def _wanted(info: PluginInfo) -> bool:
    names = {info.name, info.distribution}
    if names & _env_names("E4T_BLOCK_PLUGINS"):
        return False
    if os.environ.get("E4T_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0"):
        return info.distribution in BUILTIN_DISTRIBUTIONS or bool(names & _env_names("E4T_LOAD_PLUGINS"))
    return True


def _problem(registry: DomainRegistry, info: PluginInfo, action: str, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {error}"
    registry.report(info, f"failed to {action}: {reason}")
    if debug_enabled():
        traceback.print_exception(error, file=sys.stderr)


def _register_strictly(manager: pluggy.PluginManager, plugin: Any, name: str) -> Optional[str]:
    """Register ``plugin``; what is wrong with it as one phrase (then it is not registered), else None.

    pluggy alone would accept a misspelled hook silently (it waits for a spec that never comes) and
    refuse a wrong signature with a multi-line message."""
    known = {hook for hook in dir(hookspecs) if hasattr(getattr(hookspecs, hook), "e4t_spec")}
    try:
        manager.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        hook = next((h for h in known if h in str(error)), "its hook")
        return f"implements {hook} with parameters its spec does not have: use {_signature_hint(hook)}"
    except Exception as error:
        return f"failed to load: {type(error).__name__}: {error}"
    unknown = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [] if not caller.has_spec())
    implemented = [caller.name for caller in manager.get_hookcallers(plugin) or [] if caller.has_spec()]
    if unknown or not implemented:
        manager.unregister(plugin)
        if unknown:
            guess = difflib.get_close_matches(unknown[0], known, n=1)
            fix = f"did you mean '{guess[0]}'?" if guess else "known hooks: " + ", ".join(sorted(known))
            return f"implements unknown hook '{unknown[0]}': {fix}"
        return "implements no e4t hook: mark its register_domains function with @e4tcli.hookimpl"
    return None


def _signature_hint(hook: str) -> str:
    import inspect

    spec = getattr(hookspecs, hook, None)
    return f"def {hook}({', '.join(inspect.signature(spec).parameters)})" if spec else "e4tcli.hookspecs' signature"


def load_registry(extra_plugins: Iterable[tuple[str, Any]] = (), *, use_entry_points: bool = True) -> DomainRegistry:
    """Load plugins (entry points, then ``extra_plugins``) and collect their domains."""
    registry = DomainRegistry()
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    candidates: list[tuple[PluginInfo, Any]] = []
    if use_entry_points:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            info = _plugin_info(entry_point)
            if info.name in infos or not _wanted(info):
                continue
            infos[info.name] = info
            candidates.append((info, entry_point))
    for name, plugin in extra_plugins:
        infos[name] = PluginInfo(name)
        candidates.append((infos[name], plugin))

    for info, source in candidates:
        try:
            plugin = source.load() if isinstance(source, EntryPoint) else source
        except Exception as error:  # a broken plugin must not break e4t
            _problem(registry, info, "load", error)
            continue
        problem = _register_strictly(manager, plugin, info.name)
        if problem:
            registry.report(info, problem)
            continue
        registry.plugins.append(info)

    for impl in manager.hook.register_domains.get_hookimpls():
        info = infos[impl.plugin_name]
        try:
            impl.function(register=lambda domain, _info=info: registry.add(domain, _info))
        except Exception as error:
            _problem(registry, info, "register its domains", error)
    return registry
