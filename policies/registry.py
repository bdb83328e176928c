"""Policy registry: names -> factories, plus ``kvcast.policies`` entry points from other packages.

A spec string is ``name`` or ``name:argument``; ``fixed:cachegen-2`` creates ``fixed`` with the argument
``"cachegen-2"``. The registry is an object (no module-level mutable state); `default_registry()` builds
one with kvcast's own policies (`BUILTIN_POLICIES`) and the installed entry points.

Factories are resolved lazily: kvcast's policies are ``"module:Class"`` strings (like vLLM's KV-connector
factory) and entry points are kept unloaded, so a policy's module is imported only when that policy is
created, and `PolicyRegistry.names` imports none of them.

>>> registry = default_registry()
>>> policy = registry.create("fixed:int8")
>>> type(policy).__name__, policy.level
('FixedLevelPolicy', 'int8')
>>> "mpc" in registry.names()
True
>>> registry.create("nope")  # doctest: +ELLIPSIS
Traceback (most recent call last):
kvcast.policies.registry.UnknownPolicyError: "unknown policy 'nope'; known: cachegen, cachegen-code, ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points

from kvcast.policies.base import Policy

__all__ = ["BUILTIN_POLICIES", "ENTRY_POINT_GROUP", "PolicyFactory", "PolicyRegistry", "UnknownPolicyError",
           "default_registry"]

PolicyFactory = Callable[..., Policy]
ENTRY_POINT_GROUP = "kvcast.policies"

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


def _import_target(target: str) -> PolicyFactory:
    """The object that ``"module:attribute"`` names (the attribute may be dotted)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"bad factory path {target!r}: expected 'module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


class PolicyRegistry:
    """Maps policy names to factories ``factory(argument: str | None) -> Policy``.

    A factory is registered as a callable, as a ``"module:attribute"`` string, or as an unloaded entry
    point; the last two are imported on first `create` (then kept).
    """

    def __init__(self) -> None:
        self._factories: dict[str, PolicyFactory | str | EntryPoint] = {}

    def register(self, name: str, factory: PolicyFactory | str | EntryPoint | None = None):
        """Register `factory` under `name`; usable as a decorator on a Policy subclass.

        `factory` may be a ``"module:attribute"`` string (imported when the policy is first created)."""
        def add(f):
            if not name or ":" in name or "," in name:
                raise ValueError(f"bad policy name {name!r}: non-empty, no ':' or ','")
            if name in self._factories:
                raise ValueError(f"policy {name!r} is already registered")
            self._factories[name] = f
            return f
        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        """Registered names, sorted; imports no policy module."""
        return sorted(self._factories)

    def factory(self, name: str) -> PolicyFactory:
        """The factory of `name`, imported now if it was registered by path or entry point."""
        try:
            factory = self._factories[name]
        except KeyError:
            raise UnknownPolicyError(f"unknown policy {name!r}; known: {', '.join(self.names())}") from None
        if isinstance(factory, str):
            factory = self._factories[name] = _import_target(factory)
        elif isinstance(factory, EntryPoint):
            factory = self._factories[name] = factory.load()
        return factory

    def create(self, spec: str) -> Policy:
        """Create a fresh policy from ``name`` or ``name:argument``."""
        name, _, arg = spec.partition(":")
        factory = self.factory(name)
        policy = factory(arg) if arg else factory()
        if not isinstance(policy, Policy):
            raise TypeError(f"factory of {name!r} returned {type(policy).__name__}, not a Policy")
        return policy

    def load_entry_points(self) -> None:
        """Register every ``kvcast.policies`` entry point not registered yet (loaded on first use)."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._factories:
                self.register(ep.name, ep)


def default_registry() -> PolicyRegistry:
    """A registry with kvcast's built-in policies and installed third-party ones; imports none of them."""
    registry = PolicyRegistry()
    for name, target in BUILTIN_POLICIES.items():
        registry.register(name, target)
    registry.load_entry_points()
    return registry
