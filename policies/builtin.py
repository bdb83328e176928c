"""Registers kvcast's own policies. Each policy lives in its own module of this package."""

from __future__ import annotations

from kvcast.policies.registry import PolicyRegistry


def register_all(registry: PolicyRegistry) -> None:
    """Add every built-in policy to `registry` (each module adds its own)."""
    from kvcast.policies.cachegen import CacheGenPolicy
    from kvcast.policies.cachegen_code import CacheGenCodePolicy
    from kvcast.policies.fixed import FixedLevelPolicy
    from kvcast.policies.hybrid import HybridPolicy
    from kvcast.policies.mpc import MpcPolicy
    from kvcast.policies.oracle import OraclePolicy
    from kvcast.policies.raw import RawPolicy
    from kvcast.policies.text import TextPolicy

    registry.register("fixed", FixedLevelPolicy)
    registry.register("raw", RawPolicy)
    registry.register("text", TextPolicy)
    registry.register("cachegen", CacheGenPolicy)
    registry.register("cachegen-code", CacheGenCodePolicy)
    registry.register("mpc", MpcPolicy)
    registry.register("hybrid", HybridPolicy)
    registry.register("oracle", OraclePolicy)
