"""Encoding levels: each level is data (a `LevelSpec`) that the codec's pipeline interprets.

A spec names a quantizer, its bit allocation per layer group, an optional anchor/delta transform and an
entropy coder. Adding a level is adding one `LevelSpec` to a `LevelRegistry` (see `builtin_levels`).

Bins per layer are given as groups over the model's depth, as fractions of a reference depth, so a table
tuned for one depth maps proportionally to any other: a group ``(end, bins)`` covers the layers
``l < ceil(end * layers)`` not covered by an earlier group. CacheGen's tables are given for Mistral-7B's 32
layers (`../shared/reference/codec.md` §2.3); their boundaries are stored as ``n/32``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kvcast.codec.errors import CodecError

QUANTIZERS = ("fp16", "absmax_token", "grid")
CODERS = ("none", "torchac", "rans")
ENTROPY_CODERS = ("torchac", "rans")


@dataclass(frozen=True)
class LevelSpec:
    """A codec level, fully described by data; stored whole in every object's header."""

    name: str
    quantizer: str
    """``fp16``: values stored as IEEE half floats (lossless for fp16 input).
    ``absmax_token``: CacheGen's symmetric uniform quantizer, one absmax scale per (K/V, layer, token) over
    all channels of all heads, ``b`` bins -> ``b - 1`` symbols ``round(x * M / s + M)``, ``M = b/2 - 1``.
    ``grid``: kvcast's sensitivity-weighted uniform grid (`kvcast.codec.grid`): channel steps ``step / sqrt(F_c)`` from
    the model's Fisher table, scaled per token by its modelled sensitivity, class-shared CDFs."""
    coder: str = "none"
    """``none``: fixed width (fp16, or int8 for 256 bins); ``rans``: kvcast's interleaved rANS coder with the
    shipped CDFs (`kvcast.codec.rans`, format version 2, decodable on CPU and GPU); ``torchac``: torchac's
    arithmetic coder (format version 1: objects made before version 2 still decode)."""
    key_bins: tuple[tuple[float, int], ...] = ()
    """(end fraction of depth, bins) groups for keys."""
    value_bins: tuple[tuple[float, int], ...] = ()
    """(end fraction of depth, bins) groups for values."""
    delta_group: int = 0
    """0: no transform. n > 0: groups of n tokens; the first (anchor) token of a group is quantized on its own
    with `anchor_bins` at fixed width, the others store their delta to the anchor's reconstruction, quantized
    with the layer's bins and entropy-coded (CacheGen paper, §5.2)."""
    anchor_bins: int = 256
    tokens_per_stream: int = 256
    """Independent streams restart every this many tokens (CacheGen's GPU coder uses 256)."""
    channels_per_stream: int = 64
    """Channels per stream (64 = one SmolLM2 head); a stream is (K/V, layer, channel group, token block)."""
    lane_symbols: int = 4096
    """``rans``: one interleaved lane per this many symbols of a stream (a power of two of lanes)."""
    max_lanes: int = 32
    """``rans``: at most this many lanes per stream (a power of two <= 32: one GPU warp)."""
    cdf: str = "per_object"
    """Where the CDFs come from: ``per_object`` = estimated from the object's symbols and shipped in it."""
    description: str = ""
    family: str = "kvcast"
    """``baseline``, ``cachegen-code`` (faithful to CacheGen's public code), ``cachegen-paper``, ``kvcast``."""
    error_bound: str = ""
    step: float = 0.0
    """``grid``: the distortion parameter lambda; channel c gets the step ``lambda / sqrt(F_c)``."""
    recency: float = 0.0
    """``grid``: strength of per-token steps: 0 = every token alike; 1 = steps follow the table's modelled token
    sensitivity ``w_t`` (distance from the context's end x sink score) fully, ``w_t^(-recency/2)``."""
    sink_tokens: int = 0
    """``grid``: tokens at absolute positions below this are stored as fp16 (attention sinks)."""
    rounding: float = 0.5
    """``grid``: rounding offset; 0.5 rounds to nearest, less widens the zero bin."""
    basis: bool = False
    """``grid``: code each head's values in the sensitivity table's basis (`SensitivityTable.basis`,
    ``y = A x`` per head, every component with the step ``lambda * m_t``) instead of per channel. The basis
    stays in the table, not in the object: the object names it by digest, and a decoder needs that table."""

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise CodecError(f"level {self.name!r}: unknown quantizer {self.quantizer!r} (known: {QUANTIZERS})")
        if self.coder not in CODERS:
            raise CodecError(f"level {self.name!r}: unknown coder {self.coder!r} (known: {CODERS})")
        if self.quantizer == "absmax_token":
            if not self.key_bins or not self.value_bins:
                raise CodecError(f"level {self.name!r}: absmax_token needs key_bins and value_bins")
            for end, bins in (*self.key_bins, *self.value_bins):
                if not (0 < end <= 1.0) or not (4 <= bins <= 256) or bins % 2:
                    raise CodecError(f"level {self.name!r}: bad bin group ({end}, {bins})")
            if self.key_bins[-1][0] != 1.0 or self.value_bins[-1][0] != 1.0:
                raise CodecError(f"level {self.name!r}: the last bin group must end at 1.0")
            if self.coder == "none" and any(b != 256 for _, b in (*self.key_bins, *self.value_bins)):
                raise CodecError(f"level {self.name!r}: fixed-width coding supports 256 bins only")
        if self.quantizer == "grid":
            if self.coder not in ENTROPY_CODERS or not (self.step > 0) or not (0 <= self.recency <= 2):
                raise CodecError(f"level {self.name!r}: grid needs an entropy coder, step > 0, 0 <= recency <= 2")
            if self.sink_tokens < 0 or not (0 < self.rounding <= 0.5) or self.delta_group:
                raise CodecError(f"level {self.name!r}: grid needs sink_tokens >= 0, 0 < rounding <= 0.5, no deltas")
        if self.basis and self.quantizer != "grid":
            raise CodecError(f"level {self.name!r}: only grid levels code in a basis")
        if self.delta_group < 0 or (self.delta_group and self.coder not in ENTROPY_CODERS):
            raise CodecError(f"level {self.name!r}: delta coding needs an entropy coder")
        if self.tokens_per_stream < 1 or self.channels_per_stream < 1:
            raise CodecError(f"level {self.name!r}: stream sizes must be positive")
        if self.lane_symbols < 1 or self.max_lanes not in (1, 2, 4, 8, 16, 32):
            raise CodecError(f"level {self.name!r}: lane_symbols must be positive, max_lanes a power of two <= 32")

    def bins_per_layer(self, layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Resolve the bin groups to one bin count per layer, for keys and for values."""
        return _resolve(self.key_bins, layers), _resolve(self.value_bins, layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.basis:
            del d["basis"]   # objects of levels without a basis keep the header (and bytes) they always had
        d["key_bins"] = [list(g) for g in self.key_bins]
        d["value_bins"] = [list(g) for g in self.value_bins]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LevelSpec:
        try:
            kw = dict(d)
            kw["key_bins"] = tuple((float(e), int(b)) for e, b in kw.get("key_bins", ()))
            kw["value_bins"] = tuple((float(e), int(b)) for e, b in kw.get("value_bins", ()))
            return cls(**kw)
        except CodecError:
            raise
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad level spec in header: {exc}") from None


def _resolve(groups: tuple[tuple[float, int], ...], layers: int) -> tuple[int, ...]:
    out: list[int] = []
    for end, bins in groups:
        stop = layers if end >= 1.0 else min(layers, math.ceil(end * layers - 1e-9))
        out.extend([bins] * max(0, stop - len(out)))
    return tuple(out[:layers])


def _cg(*pairs: tuple[int, int]) -> tuple[tuple[float, int], ...]:
    """CacheGen bin groups given as (end layer of 32, bins)."""
    return tuple((end / 32, bins) for end, bins in pairs)


# CacheGen's three levels (codec.md §2.3), Mistral-7B boundaries: K layers 0-9 / 10-19 / 20-31, V 0-1 / 2-31.
_CACHEGEN_TABLES = {
    3: (_cg((10, 32), (20, 32), (32, 32)), _cg((2, 32), (32, 32))),
    2: (_cg((10, 32), (20, 16), (32, 16)), _cg((2, 32), (32, 16))),
    1: (_cg((10, 16), (20, 16), (32, 12)), _cg((2, 16), (32, 12))),
}

_ABSMAX_BOUND = ("|x - x'| <= s / (2M) + 2^-10 s per value, s = the token's absmax over its K (or V) channels "
                 "in that layer (rounded up to fp16), M = bins/2 - 1")


def builtin_levels() -> list[LevelSpec]:
    """kvcast's built-in levels, best quality first (by top-1 agreement measured on SmolLM2; sizes are not
    monotone along this order: compare a measured profile's bits per value)."""
    levels = [
        LevelSpec("raw", "fp16", description="IEEE fp16 values, no compression.", family="baseline",
                  error_bound="bit-exact for fp16 input; fp32/bf16 input is rounded to the nearest fp16"),
        LevelSpec("int8", "absmax_token", coder="none", key_bins=((1.0, 256),), value_bins=((1.0, 256),),
                  description="CacheGen's 8-bit baseline: per-token absmax over all channels, 256 bins, int8.",
                  family="baseline", error_bound=_ABSMAX_BOUND + " (M = 127)"),
    ]
    for n in (3, 2, 1):
        keys, values = _CACHEGEN_TABLES[n]
        levels.append(LevelSpec(
            f"cachegen-delta-{n}", "absmax_token", coder="rans", key_bins=keys, value_bins=values,
            delta_group=10, anchor_bins=256, family="cachegen-paper",
            description=(f"CacheGen paper's change-based coding with level-{n} bins: groups of 10 tokens, an 8-bit "
                         "anchor, deltas to the anchor quantized per token and range-coded with per-object "
                         "per-(layer, channel) CDFs."),
            error_bound=("anchors: " + _ABSMAX_BOUND + " (M = 127); other tokens: the same bound with s = the "
                         "absmax of the token's delta to the reconstructed anchor")))
        levels.append(LevelSpec(
            f"cachegen-{n}", "absmax_token", coder="rans", key_bins=keys, value_bins=values,
            family="cachegen-code",
            description=(f"CacheGen's public code, level {n}: per-token absmax quantization, its bins-per-layer-"
                         "group table mapped to the model's depth, one CDF per (layer, channel) estimated per "
                         "object and shipped with it, entropy-coded (kvcast's rANS coder where CacheGen uses "
                         "torchac: the same CDFs, within 0.5% of its size), streams restart every 256 tokens."),
            error_bound=_ABSMAX_BOUND))
    levels.extend(grid_levels())
    # best quality first: top-1 agreement measured on SmolLM2, WikiText-2 test (docs/codec-experiments.md)
    order = ["raw", "int8", "kvcast-4", "kvcast-basis-3", "cachegen-delta-3", "kvcast-basis-2", "kvcast-3",
             "cachegen-3", "kvcast-basis-1", "cachegen-delta-2", "cachegen-delta-1", "cachegen-2", "kvcast-2",
             "cachegen-1", "kvcast-1"]
    by_name = {lv.name: lv for lv in levels}
    return [by_name[n] for n in order]


_GRID_BOUND = ("|x - x'| <= step_c * m_t / 2 per value (channel step and token multiplier, both shipped as "
               "fp16); sink tokens and escaped values (|q| >= 127) are stored as fp16")
# (name, lambda, token-weight strength, aim): tuned on WikiText-2 valid; results in docs/codec-experiments.md.
_GRID_LADDER = (
    ("kvcast-4", 7e-6, 0.5, "near-lossless, >= 99% top-1 agreement on SmolLM2"),
    ("kvcast-3", 3.5e-5, 0.5, "cachegen-3's quality or better"),
    ("kvcast-2", 7e-5, 0.5, "cachegen-2's quality or better"),
    ("kvcast-1", 1.2e-4, 0.5, "aggressive, ~80% top-1 agreement"),
)
_BASIS_BOUND = ("per head, |y - y'| <= step * m_t / 2 per component of y = A (x - mean), A the table's basis "
                "(token multiplier shipped as fp16); sink tokens and escaped components are stored as fp16")
# (name, lambda, token-weight strength, aim): coded in the table's sensitivity basis; docs/codec-experiments.md.
_BASIS_LADDER = (
    ("kvcast-basis-3", 2.5e-5, 1.0, "near kvcast-4's agreement at half its size"),
    ("kvcast-basis-2", 4e-5, 1.0, "kvcast-3's quality in 23% fewer bits: 4.3x smaller than int8 on SmolLM2"),
    ("kvcast-basis-1", 7e-5, 1.0, "about cachegen-3's KL in 35% of its bits"),
)


def grid_levels() -> list[LevelSpec]:
    """kvcast's own levels (`kvcast.codec.grid`), best quality first."""
    return [LevelSpec(
        name, "grid", coder="rans", step=step, recency=strength, sink_tokens=4, family="kvcast",
        description=(f"kvcast grid level ({aim}): channel steps lambda/sqrt(F_c) from the model's Fisher table "
                     f"(lambda = {step:g}), token steps scaled by w_t^(-{strength:g}/2) with w_t the token's "
                     "modelled sensitivity (distance from the context's end x sink score), the first 4 tokens "
                     "at fp16, class-shared CDFs shipped per object, interleaved rANS coding, independent streams "
                     "per (256 tokens, class)."),
        error_bound=_GRID_BOUND) for name, step, strength, aim in _GRID_LADDER] + [LevelSpec(
        name, "grid", coder="rans", step=step, recency=strength, sink_tokens=4, family="kvcast", basis=True,
        description=(f"kvcast basis level ({aim}): each head's keys and values coded in the model table's "
                     "sensitivity basis (its full Fisher matrix whitened, shrunk towards the diagonal, and the "
                     f"whitened data's principal axes), one step lambda = {step:g} for every component, token "
                     f"steps scaled by w_t^(-{strength:g}/2), the first 4 tokens at fp16, class-shared CDFs, "
                     "interleaved rANS coding. The basis stays in the table (named by digest in the object): "
                     "decoding needs the model's table."),
        error_bound=_BASIS_BOUND) for name, step, strength, aim in _BASIS_LADDER]


@dataclass
class LevelRegistry:
    """Level specs by name, in quality order (best first)."""

    specs: dict[str, LevelSpec] = field(default_factory=dict)

    def add(self, spec: LevelSpec) -> None:
        if spec.name in self.specs:
            raise ValueError(f"level {spec.name!r} already exists")
        self.specs[spec.name] = spec

    def get(self, name: str) -> LevelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise CodecError(f"unknown level {name!r}; known levels: {', '.join(self.specs)}") from None

    def names(self) -> list[str]:
        return list(self.specs)

    @classmethod
    def default(cls) -> LevelRegistry:
        reg = cls()
        for spec in builtin_levels():
            reg.add(spec)
        return reg


def spec_json(spec: LevelSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)
