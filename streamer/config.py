"""`SimulationConfig`: every setting of a simulation sweep and its default, written once.

This module imports nothing heavy (no numpy, SimPy or torch), so `kvcast.streamer.cli` reads its defaults at
import time (``--help`` shows them) without slowing ``kvcast --help``; `kvcast.streamer.simulate` runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcast.streamer.host import HostProfile
    from kvcast.streamer.menus import ModelShape, RecomputeCost
    from kvcast.streamer.profile import Profile

__all__ = ["SimulationConfig"]


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a sweep needs besides the traces. Every field has a documented default."""

    policies: tuple[str, ...] = ("text", "raw", "fixed:cachegen-2", "cachegen", "cachegen-code")
    """Policy specs (``name`` or ``name:argument``)."""
    model: str = "mistral-7b"
    """Model shape: a name of `kvcast.streamer.menus.MODEL_SHAPES` or ``layers,kv_heads,head_dim``."""
    gpu: str = "h100"
    """GPU of the recompute cost table (``gpu/model`` must be in ``recompute_costs.json``)."""
    recompute: str | None = None
    """Override of the recompute cost: ``gpu/model`` of the table, or ``a,b,c`` (see `RecomputeCost`)."""
    profile: str | None = None
    """Path of a ``kvcast-profile/1`` JSON; None: the shipped default profile (measured)."""
    host_profile: str | None = None
    """Path of a ``kvcast-host-profile/1`` JSON (``kvcast calibrate host``): the serving host's prefill cost and
    decode speeds replace the recompute cost table (`gpu`, `recompute`) and the profile's decode speeds, so a
    simulation models the same host as a live session."""
    levels: tuple[str, ...] | None = None
    """The codec levels on the menu: set names (``all``, ``cachegen``, ``kvcast``, ``baselines``;
    `kvcast.streamer.menus.LEVEL_SETS`) and level names of the profile, united, kept in the profile's order (None:
    all). The CacheGen controllers use only CacheGen's own levels of the menu; the other controllers use all of
    it. So on ``("cachegen",)`` (CacheGen's menu: cachegen-3..1) or ``("kvcast",)`` every controller has the same
    levels; on the default (all) CacheGen's controllers have CacheGen's levels and the others every level."""
    chunk_tokens: int = 1536
    """Tokens per chunk (CacheGen used ~1.5K)."""
    context_tokens: tuple[int, int] = (12288, 20480)
    """Context length range; each context draws a length uniformly from it (inclusive)."""
    contexts: int = 20
    """Contexts per trace (each with its own length and start offset in the trace)."""
    slo_s: float = 0.6
    """Target TTFT. Chosen so that recomputing the whole context (`text`) misses it most of the time: with the
    default contexts (12-20K tokens of Mistral-7B) text-only prefill takes ~0.55-1.1 s on H100 (measured
    cost table) and misses 0.6 s in ~90% of sessions."""
    scaling: str = "range"
    """How traces are scaled: ``range`` (each trace to a mean drawn log-uniformly in `mean_gbps`),
    ``none`` (as read), or ``factor:X`` (every bandwidth times X)."""
    mean_gbps: tuple[float, float] = (1.0, 10.0)
    """Range of trace means for ``scaling="range"`` (a datacenter-to-storage range)."""
    rtt_s: float = 0.01
    """Round-trip time per chunk request."""
    efficiency: float = 0.95
    """Payload bytes per wire byte (Pensieve's 0.95)."""
    overhead_bytes: int = 400
    """Extra bytes per request (HTTP headers)."""
    prior_window_s: float = 5.0
    """The policies' historical throughput: the trace's mean over this many seconds before the session."""
    query_prefill_s: float = 0.0
    """Prefill of the query after the context is loaded (policy-independent; added to TTFT)."""
    seed: int = 0
    """Seed of the contexts (lengths, start offsets) and of the trace scaling."""
    bandwidth_scale: float = 1.0
    """Every bandwidth of the (scaled) trace times this factor, after `scaling` (a sweep axis of `kvcast sweep`;
    the policies' prior throughput scales with it)."""
    gpu_share: float = 1.0
    """Share of the GPU the recompute gets: every recompute time is divided by it (1: a dedicated GPU, 0.25: a
    quarter of it; a sweep axis of `kvcast sweep`). The policies see the slower recompute in their menus."""
    lossy_prefix_ratio: float | None = None
    """How a text chunk recomputed over lossy chunks is scored: this ratio times their token-weighted mean loss
    (`kvcast.policies.base.chunk_quality_losses`). None: the profile's ``lossy_prefix_ratio``, or
    `kvcast.policies.base.DEFAULT_LOSSY_PREFIX_RATIO` (0, lossless) where the profile has none."""

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("no policies to simulate")
        lo, hi = self.context_tokens
        if not 0 < lo <= hi:
            raise ValueError(f"context_tokens must be 0 < min <= max, got {self.context_tokens}")
        if self.chunk_tokens <= 0 or self.contexts <= 0:
            raise ValueError("chunk_tokens and contexts must be > 0")
        if not (self.slo_s > 0 and math.isfinite(self.slo_s)):
            raise ValueError(f"slo_s must be finite and > 0, got {self.slo_s}")
        lo_g, hi_g = self.mean_gbps
        if not 0 < lo_g <= hi_g:
            raise ValueError(f"mean_gbps must be 0 < low <= high, got {self.mean_gbps}")
        self.scale_factor_or_none()
        for key in ("bandwidth_scale", "gpu_share"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be finite and > 0, got {value}")
        ratio = self.lossy_prefix_ratio
        if ratio is not None and not (ratio >= 0 and math.isfinite(ratio)):
            raise ValueError(f"lossy_prefix_ratio must be finite and >= 0, got {ratio}")

    def scale_factor_or_none(self) -> float | None:
        """The factor of ``scaling="factor:X"``; None for the other modes (ValueError if malformed)."""
        if self.scaling in ("range", "none"):
            return None
        if self.scaling.startswith("factor:"):
            try:
                factor = float(self.scaling.split(":", 1)[1])
            except ValueError:
                factor = -1.0
            if factor > 0 and math.isfinite(factor):
                return factor
        raise ValueError(f"scaling must be 'range', 'none' or 'factor:X' with X > 0, got {self.scaling!r}")

    def shape(self) -> ModelShape:
        from kvcast.streamer.menus import ModelShape

        return ModelShape.parse(self.model)

    def recompute_cost(self) -> RecomputeCost:
        from kvcast.streamer.menus import recompute_cost

        if self.host_profile is not None:
            return self.load_host_profile().recompute
        return recompute_cost(self.recompute or f"{self.gpu}/{self.model}")

    def load_host_profile(self) -> HostProfile | None:
        from kvcast.streamer.host import load_host_profile

        return None if self.host_profile is None else load_host_profile(Path(self.host_profile))

    def load_profile(self) -> Profile:
        from kvcast.streamer.profile import Profile, default_profile

        return default_profile() if self.profile is None else Profile.load(self.profile)

    def resolved_lossy_prefix_ratio(self, profile: Profile) -> float:
        """`lossy_prefix_ratio`, else `profile`'s, else the profile's measured ``text_over_lossy_prefix_penalty``
        (`kvcast eval position`: the same ratio measured on the model), else the default (0)."""
        from kvcast.policies.base import DEFAULT_LOSSY_PREFIX_RATIO

        if self.lossy_prefix_ratio is not None:
            return self.lossy_prefix_ratio
        if profile.lossy_prefix_ratio is not None:
            return profile.lossy_prefix_ratio
        if profile.text_over_lossy_prefix_penalty is not None:
            return profile.text_over_lossy_prefix_penalty
        return DEFAULT_LOSSY_PREFIX_RATIO

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)
