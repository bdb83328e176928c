"""Registers kvcast's own policies. Each policy lives in its own module of this package."""

from __future__ import annotations

from policies.registry import PolicyRegistry


def register_all(registry: PolicyRegistry) -> None:
    """Add every built-in policy to `registry` (each module adds its own)."""
    from policies.cachegen import CacheGenPolicy
    from policies.cachegen_code import CacheGenCodePolicy
    from policies.fixed import FixedLevelPolicy
    from policies.hybrid import HybridPolicy
    from policies.mpc import MpcPolicy
    from policies.oracle import OraclePolicy
    from policies.raw import RawPolicy
    from policies.text import TextPolicy

    registry.register("fixed", FixedLevelPolicy)
    registry.register("raw", RawPolicy)
    registry.register("text", TextPolicy)
    registry.register("cachegen", CacheGenPolicy)
    registry.register("cachegen-code", CacheGenCodePolicy)
    registry.register("mpc", MpcPolicy)
    registry.register("hybrid", HybridPolicy)
    registry.register("oracle", OraclePolicy)
