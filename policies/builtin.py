"""Registers kvcast's own policies. Each policy lives in its own module of this package."""

from __future__ import annotations

from policies.registry import PolicyRegistry


def register_all(registry: PolicyRegistry) -> None:
    """Add every built-in policy to `registry` (each module adds its own)."""
