"""Policy registry: names -> factories, plus ``kvcast.policies`` entry points from other packages.

A spec string is ``name`` or ``name:argument``; ``fixed:cachegen-2`` creates ``fixed`` with the argument
``"cachegen-2"``. The registry is an object (no module-level mutable state); `default_registry()` builds
one with kvcast's own policies (`BUILTIN_POLICIES`) and the installed entry points.

Factories are resolved lazily: kvcast's policies are ``"module:Class"`` strings (like vLLM's KV-connector
factory) and entry points are kept unloaded, so a policy's module is imported only when that policy is
created, and `PolicyRegistry.names` imports none of them.

Plug-ins. Another package adds a policy with an entry point in the group ``kvcast.policies`` (`ENTRY_POINT_GROUP`)
of its ``pyproject.toml``::

    [project.entry-points."kvcast.policies"]
    loss-budget = "kvcast_policy_example:LossBudgetPolicy"

(``docs/writing-a-policy.md`` walks through one.) The rules, all checked when the name is *used*, so that one
broken plug-in never stops the other policies:

* A plug-in that fails to import, or names no attribute of its module, raises `PolicyPluginError` naming the
  policy, the package and the entry point, with the import error as its cause.
* A name is kvcast's or one package's: an entry point that reuses a built-in name, or the name of another
  package's entry point, makes that name ambiguous, and creating it raises `PolicyPluginError` naming every
  package that claims it (rename the entry point). Nothing silently runs another policy than the one meant.
* An entry point whose name could never be asked for (empty, or with ``:`` or ``,``) is left out; an unknown
  name's error lists it.

>>> registry = default_registry()
>>> policy = registry.create("fixed:int8")
>>> type(policy).__name__, policy.level
('FixedLevelPolicy', 'int8')
>>> "mpc" in registry.names(), registry.origin("mpc")
(True, 'kvcast')
>>> registry.create("nope")  # doctest: +ELLIPSIS
Traceback (most recent call last):
kvcast.policies.registry.UnknownPolicyError: "unknown policy 'nope'; known: cachegen, cachegen-code, ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points

from kvcast.policies.base import Policy

__all__ = ["BUILTIN_POLICIES", "ENTRY_POINT_GROUP", "PolicyFactory", "PolicyPluginError", "PolicyRegistry",
           "UnknownPolicyError", "default_registry"]

PolicyFactory = Callable[..., Policy]
ENTRY_POINT_GROUP = "kvcast.policies"
"""The entry-point group of third-party policies: ``name = "module:Class"``."""

BUILTIN_POLICIES: Mapping[str, str] = {
    "fixed": "kvcast.policies.fixed:FixedLevelPolicy",
    "raw": "kvcast.policies.raw:RawPolicy",
    "text": "kvcast.policies.text:TextPolicy",
    "cachegen": "kvcast.policies.cachegen:CacheGenPolicy",
    "cachegen-code": "kvcast.policies.cachegen_code:CacheGenCodePolicy",
    "mpc": "kvcast.policies.mpc:MpcPolicy",
    "hybrid": "kvcast.policies.hybrid:HybridPolicy",
    "oracle": "kvcast.policies.oracle:OraclePolicy",
    "learned": "kvcast.policies.learned:LearnedPolicy",
    "cake": "kvcast.policies.cake:CakePolicy",
    "cake-cachegen": "kvcast.policies.cake_cachegen:CakeCacheGenPolicy",
    "rate": "kvcast.policies.rate:RatePolicy",
    "slack": "kvcast.policies.slack:SlackPolicy",
}
"""kvcast's own policies: spec name -> ``"module:attribute"`` of the factory (a Policy subclass), imported by
`PolicyRegistry.create` on first use. Adding a built-in policy is one module and one line here."""


class UnknownPolicyError(KeyError):
    """The spec names no registered policy."""


class PolicyPluginError(ValueError):
    """A policy name cannot be created because of a plug-in: its entry point does not load, or two packages
    (or a package and kvcast) claim the name. The message names the packages."""


def _import_target(target: str) -> PolicyFactory:
    """The object that ``"module:attribute"`` names (the attribute may be dotted)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"bad factory path {target!r}: expected 'module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _entry_point_origin(ep: EntryPoint) -> str:
    """Where an entry point comes from, for messages: its package and its line."""
    package = ep.dist.name if ep.dist is not None else "an unnamed package"
    return f"package {package!r} (entry point {ep.name} = {ep.value!r} in group {ep.group!r})"


def _bad_name(name: str) -> bool:
    return not name or ":" in name or "," in name


class PolicyRegistry:
    """Maps policy names to factories ``factory(argument: str | None) -> Policy``.

    A factory is registered as a callable, as a ``"module:attribute"`` string, or as an unloaded entry
    point; the last two are imported on first `create` (then kept).
    """

    def __init__(self) -> None:
        self._factories: dict[str, PolicyFactory | str | EntryPoint] = {}
        self._origins: dict[str, str] = {}
        self._claims: dict[str, list[str]] = {}
        """Per name claimed more than once (by entry points): every claimant, the first one included."""
        self._unusable: list[str] = []
        """Entry points left out because their name can never be asked for."""

    def register(self, name: str, factory: PolicyFactory | str | EntryPoint | None = None, *,
                 origin: str = "registered"):
        """Register `factory` under `name`; usable as a decorator on a Policy subclass.

        `factory` may be a ``"module:attribute"`` string (imported when the policy is first created).
        `origin` says where it comes from, in messages and in `origin`."""
        def add(f):
            if _bad_name(name):
                raise ValueError(f"bad policy name {name!r}: non-empty, no ':' or ','")
            if name in self._factories:
                raise ValueError(f"policy {name!r} is already registered")
            self._factories[name] = f
            self._origins[name] = origin
            return f
        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        """Registered names, sorted; imports no policy module."""
        return sorted(self._factories)

    def origin(self, name: str) -> str:
        """Where `name` comes from: ``"kvcast"`` for a built-in, the package and entry point for a plug-in,
        ``"registered"`` (or `register`'s `origin`) for one added with `register`; imports nothing."""
        self._lookup(name)
        return self._origins[name]

    def _lookup(self, name: str) -> PolicyFactory | str | EntryPoint:
        try:
            return self._factories[name]
        except KeyError:
            ignored = "".join(f"; ignored for its name: {o}" for o in self._unusable)
            raise UnknownPolicyError(f"unknown policy {name!r}; known: {', '.join(self.names())}{ignored}") \
                from None

    def factory(self, name: str) -> PolicyFactory:
        """The factory of `name`, imported now if it was registered by path or entry point.

        `UnknownPolicyError` for a name nobody registered; `PolicyPluginError` for a plug-in that does not
        load or a name that several packages claim."""
        factory = self._lookup(name)
        claims = self._claims.get(name)
        if claims:
            raise PolicyPluginError(f"policy name {name!r} is claimed {len(claims)} times: by "
                                    f"{' and by '.join(claims)}; rename the plug-in's entry point")
        if isinstance(factory, str):
            factory = self._factories[name] = _import_target(factory)
        elif isinstance(factory, EntryPoint):
            try:
                loaded = factory.load()
            except Exception as exc:
                raise PolicyPluginError(f"policy {name!r} from {_entry_point_origin(factory)} does not load: "
                                        f"{type(exc).__name__}: {exc}") from exc
            if not callable(loaded):
                raise PolicyPluginError(f"policy {name!r} from {_entry_point_origin(factory)} names "
                                        f"{type(loaded).__name__} {loaded!r}, not a Policy class or factory")
            factory = self._factories[name] = loaded
        return factory

    def create(self, spec: str) -> Policy:
        """Create a fresh policy from ``name`` or ``name:argument``."""
        name, _, arg = spec.partition(":")
        factory = self.factory(name)
        policy = factory(arg) if arg else factory()
        if not isinstance(policy, Policy):
            raise TypeError(f"factory of {name!r} ({self.origin(name)}) returned {type(policy).__name__}, "
                            "not a Policy")
        return policy

    def load_entry_points(self) -> None:
        """Register every installed ``kvcast.policies`` entry point, unloaded (see the module's rules: a name
        claimed twice becomes an error when used; a name that cannot be asked for is left out)."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            origin = _entry_point_origin(ep)
            if _bad_name(ep.name):
                if origin not in self._unusable:
                    self._unusable.append(origin)
            elif ep.name not in self._factories:
                self.register(ep.name, ep, origin=origin)
            elif origin != self._origins[ep.name] and origin not in self._claims.get(ep.name, ()):
                self._claims[ep.name] = [*(self._claims.get(ep.name) or [self._origins[ep.name]]), origin]


def default_registry() -> PolicyRegistry:
    """A registry with kvcast's built-in policies and installed third-party ones; imports none of them."""
    registry = PolicyRegistry()
    for name, target in BUILTIN_POLICIES.items():
        registry.register(name, target, origin="kvcast")
    registry.load_entry_points()
    return registry
