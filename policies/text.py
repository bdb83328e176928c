"""`text`: recompute every chunk from its text (prefill only: the compute-only baseline, vLLM without a KV
cache store)."""

from __future__ import annotations

from kvcast.policies.base import TEXT, Decision, Observation, Policy


class TextPolicy(Policy):
    """Every chunk recomputed on the GPU, front to back; nothing is loaded."""

    name = "text"

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.compute_idle:
            return None
        return Decision(obs.pending[0], TEXT)
