"""Per-chunk menus from a codec profile, a model shape and a recompute cost model.

A profile measured on a small real model (bits per value, quality loss per level) scales to any deployment:
a chunk's size at a level is ``values x bits_per_value / 8`` where ``values = tokens x 2 (K and V) x layers x
kv_heads x head_dim`` of the *target* model. Decode time is ``values / decode speed``; recompute time comes
from `RecomputeCost`.

A chunk's quality loss at a level is the profile's loss at the chunk's distance from the end of the target
context (`Profile.quality_loss_at`): tokens from the chunk's centre to the context's last token, the same count
of tokens whatever the context's length, clamped to the measured range (a curve measured on SmolLM2's 8K window
gives every chunk of a 16K Mistral context farther than its farthest point that point's loss; the chunk that
starts at token 0 takes the first-chunk measurement, attention sinks included). A profile without position data
gives every chunk its level's flat loss.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from types import MappingProxyType

from kvcast.policies.base import ChunkMenu, LevelOption
from kvcast.streamer.profile import Profile, ProfileError

__all__ = ["GPU_BENCH_FILE", "LEVEL_SETS", "MODEL_SHAPES", "ModelShape", "RecomputeCost", "build_menus",
           "decode_values_per_s", "default_decode_speeds", "gpu_decode_speeds", "recompute_cost", "recompute_costs",
           "resolve_levels"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The KV-cache geometry of a model."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    raw_bytes_per_value: int = 2
    """Bytes per value of the uncompressed KV (2 for fp16/bf16)."""

    def __post_init__(self) -> None:
        for key in ("layers", "kv_heads", "head_dim", "raw_bytes_per_value"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model shape {self.name!r}: {key} must be > 0")

    @property
    def values_per_token(self) -> int:
        """KV values per token: keys and values of every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    @property
    def raw_bytes_per_token(self) -> int:
        return self.values_per_token * self.raw_bytes_per_value

    @classmethod
    def named(cls, name: str) -> ModelShape:
        """One of `MODEL_SHAPES`; ValueError listing the known names otherwise."""
        try:
            return MODEL_SHAPES[name]
        except KeyError:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(sorted(MODEL_SHAPES))} "
                             f"(or give layers,kv_heads,head_dim)") from None

    @classmethod
    def parse(cls, spec: str) -> ModelShape:
        """A name from `MODEL_SHAPES`, or ``layers,kv_heads,head_dim`` (e.g. ``32,8,128``)."""
        if "," in spec:
            parts = spec.split(",")
            try:
                layers, heads, dim = (int(p) for p in parts)
            except ValueError:
                raise ValueError(f"model shape {spec!r}: expected layers,kv_heads,head_dim as integers"
                                 ) from None
            return cls(spec, layers, heads, dim)
        return cls.named(spec)


MODEL_SHAPES: Mapping[str, ModelShape] = MappingProxyType({
    s.name: s for s in (
        ModelShape("smollm2-135m", 30, 3, 64),
        ModelShape("mistral-7b", 32, 8, 128),
        ModelShape("llama-3.1-8b", 32, 8, 128),
        ModelShape("llama-2-70b", 80, 8, 128),
        ModelShape("llama-3-70b", 80, 8, 128),
    )
})
"""Named model shapes (read-only)."""


@dataclass(frozen=True, slots=True)
class RecomputeCost:
    """Prefill time of a chunk of ``length`` tokens whose prefix of ``pos`` tokens is already cached:
    ``c_s + a_s_per_token * length + b_s_per_token_pair * length * (pos + length / 2)``."""

    a_s_per_token: float
    b_s_per_token_pair: float
    c_s: float = 0.0
    name: str = ""
    provisional: bool = False

    def __post_init__(self) -> None:
        for key in ("a_s_per_token", "b_s_per_token_pair", "c_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"recompute cost {key} must be finite and >= 0, got {value}")

    def prefill_s(self, pos: int, length: int) -> float:
        """Seconds to recompute tokens ``[pos, pos + length)`` given the KV of ``[0, pos)``."""
        return self.c_s + self.a_s_per_token * length + self.b_s_per_token_pair * length * (pos + length / 2)


def recompute_costs() -> Mapping[str, RecomputeCost]:
    """The shipped cost table, keyed ``gpu/model`` (e.g. ``h100/mistral-7b``); see
    ``recompute_costs.json``."""
    table = json.loads(resources.files("kvcast.streamer").joinpath("recompute_costs.json").read_text())
    out = {}
    for e in table["entries"]:
        key = f"{e['gpu']}/{e['model']}"
        out[key] = RecomputeCost(e["a_s_per_token"], e["b_s_per_token_pair"], e["c_s"], name=key,
                                 provisional=bool(e.get("provisional", False)))
    return MappingProxyType(out)


def recompute_cost(spec: str) -> RecomputeCost:
    """``gpu/model`` from the shipped table, or explicit ``a,b,c`` (seconds per token, per token pair,
    fixed)."""
    if "," in spec:
        try:
            a, b, c = (float(p) for p in spec.split(","))
        except ValueError:
            raise ValueError(f"recompute cost {spec!r}: expected a,b,c as numbers") from None
        return RecomputeCost(a, b, c, name=spec)
    table = recompute_costs()
    try:
        return table[spec]
    except KeyError:
        raise ValueError(f"no recompute cost for {spec!r}; known: {', '.join(sorted(table))} "
                         f"(or give a,b,c)") from None


GPU_BENCH_FILE = "gpu_bench_h100.json"
"""`kvcast bench gpu` on an H100, shipped in `kvcast.streamer` (``scripts/gpu_bench.sh`` reproduces it): the
default GPU decode speeds."""


def gpu_decode_speeds(bench: Mapping) -> dict[str, float | None]:
    """GPU decode speeds (KV values per second) from a `kvcast bench gpu` result: each rANS level's decoding of
    one object (the run's ``object_tokens``, about a chunk) of a Mistral-7B-shaped context, dequantization
    included; ``int8`` at a third of the measured copy floor (one byte read and two written per value: memory
    bound); ``raw`` needs no decoding (None)."""
    tokens = bench["settings"]["object_tokens"]
    speeds: dict[str, float | None] = {"raw": None, "int8": bench["summary"]["copy_floor_gbs"] * 1e9 / 3}
    for row in bench["rows"]:
        if row["context_tokens"] == tokens and not row["level"].startswith("baseline"):
            speeds[row["level"]] = row["gbs_fp16"] * 1e9 / 2
    return speeds


@functools.cache
def default_decode_speeds() -> Mapping[str, float | None]:
    """The default profile's GPU decode speeds: `gpu_decode_speeds` of `GPU_BENCH_FILE`."""
    text = resources.files("kvcast.streamer").joinpath(GPU_BENCH_FILE).read_text(encoding="utf-8")
    return MappingProxyType(gpu_decode_speeds(json.loads(text)))


def fallback_decode_values_per_s() -> float:
    """Decode speed of a level neither the profile nor the benchmark knows: the slowest measured level's."""
    return min(v for v in default_decode_speeds().values() if v is not None)


def decode_values_per_s(profile: Profile, level: str) -> float | None:
    """GPU decode speed of `level`: the profile's measurement, else the benchmark's (None: no decoding)."""
    measured = profile.level(level).gpu_decode_values_per_s
    if measured is not None:
        return measured
    speeds = default_decode_speeds()
    return speeds[level] if level in speeds else fallback_decode_values_per_s()


LEVEL_SETS: Mapping[str, str] = MappingProxyType({
    "all": "every level of the profile",
    "cachegen": "CacheGen's levels cachegen-<n> (CacheGen's menu)",
    "kvcast": "kvcast's levels kvcast-<n> and kvcast-basis-<n>",
    "baselines": "the uncompressed and 8-bit baselines raw and int8",
})
"""Named level sets of `resolve_levels` (``kvcast simulate --levels``).

``cachegen`` and ``kvcast`` are one codec's levels and nothing else, so that every controller on such a menu
chooses among exactly the same levels: on ``--levels cachegen`` the CacheGen controllers (which try only
``cachegen-3..1``), the planners (which try every level of the menu) and the other baselines have CacheGen's
menu, and a comparison there isolates the controller. The level-independent baselines ``raw`` and
``fixed:int8`` need their level on the menu (``--levels cachegen,baselines``), which then also offers ``raw``
and ``int8`` to the planners: compare controllers on the codec's own set, and state the difference where a
table mixes menus. On the default menu (``all``) the CacheGen controllers keep to CacheGen's levels while the
other controllers may use every level: that comparison is CacheGen (codec and controller) against kvcast."""

_SET_PATTERNS = {"cachegen": re.compile(r"cachegen-\d+"), "kvcast": re.compile(r"kvcast-(basis-)?\d+"),
                 "baselines": re.compile(r"raw|int8")}


def resolve_levels(profile: Profile, spec: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The profile levels named by `spec`, in the profile's order: None or ``all`` for every level, else a
    comma-separated string (or a sequence) of set names of `LEVEL_SETS` and level names, united
    (``"cachegen,cachegen-delta-3"``). ProfileError for a name that is neither a set nor a profile level, or
    a set the profile has no level of."""
    if spec is None:
        return profile.level_names
    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not tokens:
        raise ProfileError("no levels given (use 'all', a set name or level names)")
    chosen: set[str] = set()
    for token in tokens:
        if token == "all":
            chosen.update(profile.level_names)
        elif token in _SET_PATTERNS:
            names = [n for n in profile.level_names if _SET_PATTERNS[token].fullmatch(n)]
            if not names:
                raise ProfileError(f"profile {profile.source or '(unnamed)'} has no level of the set {token!r} "
                                   f"({LEVEL_SETS[token]}); it has {list(profile.level_names)}")
            chosen.update(names)
        else:
            try:
                profile.level(token)
            except ProfileError as exc:
                raise ProfileError(f"{exc}; or a set: {', '.join(LEVEL_SETS)}") from None
            chosen.add(token)
    return tuple(n for n in profile.level_names if n in chosen)


def build_menus(profile: Profile, shape: ModelShape, context_tokens: int, chunk_tokens: int,
                recompute: RecomputeCost, *, levels: str | tuple[str, ...] | None = None,
                decode_speeds: Mapping[str, float] | None = None,
                default_decode_speed: float | None = None) -> tuple[ChunkMenu, ...]:
    """Menus of a ``context_tokens`` context cut into chunks of ``chunk_tokens`` (the last one may be
    shorter).

    `decode_speeds` (values per second by level: a host profile's, ``kvcast calibrate host``) replace the
    profile's decode speeds.
    `levels` restricts the menu to some of the profile's levels (set names and level names, see
    `resolve_levels`), kept in the profile's order, which need not be monotone in size or quality. The
    ``raw`` level's size follows the model shape's ``raw_bytes_per_value``; the other levels use the
    profile's bits per value. Each chunk's quality loss is the profile's loss at the chunk's distance from the
    context's end (`Profile.quality_loss_at`; the level's flat loss without position data).
    """
    if context_tokens <= 0 or chunk_tokens <= 0:
        raise ValueError(f"context_tokens and chunk_tokens must be > 0, got {context_tokens}, {chunk_tokens}")
    rows = profile.levels if levels is None else profile.restricted(resolve_levels(profile, levels)).levels
    if not rows:
        raise ValueError("a menu needs at least one level")
    if decode_speeds is None:
        speeds = [decode_values_per_s(profile, r.level) for r in rows]
    else:  # a host profile's measured values per second (levels it did not time: `default_decode_speed`)
        speeds = [decode_speeds.get(r.level, default_decode_speed) for r in rows]
    bits = [8.0 * shape.raw_bytes_per_value if r.level == "raw" else r.bits_per_value for r in rows]
    curves = [profile.position_curve(r.level) for r in rows]  # resolved once: `Profile.quality_loss_at`, faster
    menus = []
    for index, start in enumerate(range(0, context_tokens, chunk_tokens)):
        tokens = min(chunk_tokens, context_tokens - start)
        values = tokens * shape.values_per_token
        distance = context_tokens - (start + tokens / 2)
        first = start == 0 and tokens < context_tokens
        options = tuple(
            LevelOption(level=r.level, nbytes=math.ceil(values * b / 8.0),
                        decode_s=0.0 if v is None else values / v,
                        quality_loss=r.quality_loss if c is None else c.quality_loss(distance, first_chunk=first))
            for r, b, v, c in zip(rows, bits, speeds, curves, strict=True))
        menus.append(ChunkMenu(index=index, start_token=start, tokens=tokens, levels=options,
                               recompute_s=recompute.prefill_s(start, tokens)))
    return tuple(menus)


def with_recompute_scale(menus: tuple[ChunkMenu, ...], factor: float) -> tuple[ChunkMenu, ...]:
    """The menus with every recompute time multiplied by `factor` (a GPU shared with other work)."""
    return tuple(replace(m, recompute_s=m.recompute_s * factor) for m in menus)
