"""Policy registry: names -> factories, plus ``kvcast.policies`` entry points from other packages.

A spec string is ``name`` or ``name:argument``; ``fixed:cachegen-2`` creates ``fixed`` with the argument
``"cachegen-2"``. The registry is an object (no module-level mutable state); `default_registry()` builds
one with kvcast's own policies and the installed entry points.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from kvcast.policies.base import Policy

PolicyFactory = Callable[..., Policy]
ENTRY_POINT_GROUP = "kvcast.policies"


class UnknownPolicyError(KeyError):
    """The spec names no registered policy."""


class PolicyRegistry:
    """Maps policy names to factories ``factory(argument: str | None) -> Policy``."""

    def __init__(self) -> None:
        self._factories: dict[str, PolicyFactory] = {}

    def register(self, name: str, factory: PolicyFactory | None = None):
        """Register `factory` under `name`; usable as a decorator on a Policy subclass."""
        def add(f: PolicyFactory) -> PolicyFactory:
            if not name or ":" in name or "," in name:
                raise ValueError(f"bad policy name {name!r}: non-empty, no ':' or ','")
            if name in self._factories:
                raise ValueError(f"policy {name!r} is already registered")
            self._factories[name] = f
            return f
        return add(factory) if factory is not None else add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, spec: str) -> Policy:
        """Create a fresh policy from ``name`` or ``name:argument``."""
        name, _, arg = spec.partition(":")
        try:
            factory = self._factories[name]
        except KeyError:
            raise UnknownPolicyError(f"unknown policy {name!r}; known: {', '.join(self.names())}") from None
        policy = factory(arg) if arg else factory()
        if not isinstance(policy, Policy):
            raise TypeError(f"factory of {name!r} returned {type(policy).__name__}, not a Policy")
        return policy

    def load_entry_points(self) -> None:
        """Register every ``kvcast.policies`` entry point not registered yet."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._factories:
                self.register(ep.name, ep.load())


def default_registry() -> PolicyRegistry:
    """A registry with kvcast's built-in policies and installed third-party ones."""
    from kvcast.policies import builtin

    registry = PolicyRegistry()
    builtin.register_all(registry)
    registry.load_entry_points()
    return registry
