"""Codec profiles: what each codec level costs and loses, measured on a real model (JSON).

Format ``kvcast-profile/1`` (written by ``kvcast eval codec``; levels in ``kvcast.codec.levels()`` order, which is
monotone in neither bits nor quality: a kvcast level can be smaller *and* better than the CacheGen level listed
before it)::

    {
      "format": "kvcast-profile/1",
      "model": {"name": "smollm2-135m", "layers": 30, "kv_heads": 3, "head_dim": 64},
      "object_tokens": 2048,              # tokens per encoded object the numbers were measured on
      "quality_metric": "kl_per_token",   # which field `quality_loss` copies
      "provisional": false,               # optional: true for estimates, not measurements
      "lossy_prefix_ratio": 0.4,          # optional: a text chunk recomputed over lossy chunks loses this
                                          # ratio times their mean loss (null/absent: unmeasured, 0 is used)
      "note": "...",                      # optional free text
      "levels": [
        {"level": "cachegen-2",
         "bits_per_value": 2.94,          # encoded bits per KV value, all side information counted
         "bits_per_value_payload": 2.86, # entropy-coded payload only (null if not measured)
         "quality_loss": 0.0368,          # lower is better, 0 = lossless; the metric named above
         "top1_agreement": 0.888,         # share of next-token argmax agreeing with the lossless KV
         "kl_per_token": 0.0368,          # mean KL(lossless || lossy) of next-token distributions, nats
         "ppl_change": null,              # relative perplexity change (null if not measured)
         "encode_msym_per_s": null,       # CPU coder speed, millions of symbols per second
         "decode_msym_per_s": null,
         "gpu_decode_values_per_s": null} # optional: GPU decode speed, KV values per second
      ]
    }

Only ``level``, ``bits_per_value`` and ``quality_loss`` are required per level; the other numbers may be
``null`` or absent. Every error names the file and the offending field.

Two optional top-level entries (written by ``kvcast eval position --profile FILE``; a profile without them loads
as before, and every chunk of a menu then gets its level's flat ``quality_loss``)::

      "position_quality": {               # the loss of a level by the distance of a chunk from the context's end
        "context_tokens": 8000,           # the measured context (chunks x chunk_tokens) ...
        "chunk_tokens": 1000,             # ... and chunk; only chunk i lossy, every other chunk exact
        "continuation_tokens": 128,       # optional: tokens scored after the context
        "documents": 4,                   # optional: documents averaged
        "levels": {
          "kvcast-2": {
            "points": [                   # at least one; distinct distances, any order
              {"distance_tokens": 500,    # tokens from the chunk's centre to the context's end
               "quality_loss": 0.01,      # whole-context equivalent: KL of that one chunk x context/chunk tokens
                                          # x sqrt(additivity_factor)
               "kl_per_token": 0.00125,   # optional: as measured, only this chunk lossy
               "top1_agreement": 0.99}],  # optional: as measured, only this chunk lossy
            "first_chunk": {...},         # optional: the same fields for the chunk holding the context's first
                                          # tokens (the attention sinks), measured apart from the points
            "additivity_factor": 4.3}}},  # optional: measured whole-context KL / sum of the single-chunk KLs;
                                          # its square root is already in quality_loss (informational)
      "text_over_lossy_prefix_penalty": 0.1   # optional: see below

`Profile.quality_loss_at` reads a level's loss at a chunk's distance (tokens from the chunk's centre to the end of
*the target context*, whatever its length): linear interpolation between the points, and outside the measured
range the nearest point's value (clamped; an 8K-measured curve gives every chunk of a 16K context farther than
the farthest point that point's loss); the chunk that starts at token 0 of a context of several chunks takes
``first_chunk`` when present. ``quality_loss`` is in the unit of the level's flat ``quality_loss`` (the loss when
the whole context is at that level), so a plan's token-weighted mean of its chunks' losses (the simulator's
session loss) predicts the sum of the single-chunk KLs times the square root of each level's ``additivity_factor``
(between a lone chunk's loss and a whole context's); levels without a curve keep their flat ``quality_loss``.

``text_over_lossy_prefix_penalty`` is the measured extra loss of one chunk recomputed from its text over a lossy
prefix, relative to the loss of that prefix: recomputing chunk i over lossy chunks ``0..i-1`` costs ``penalty x``
(the KL those chunks cause with an exact chunk i) on top of it. It is only stored here; scoring reads it
(``docs/quality-by-position.md``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_ID", "LevelProfile", "PositionCurve", "PositionPoint", "PositionQuality", "Profile", "ProfileError",
           "default_profile"]

FORMAT_ID = "kvcast-profile/1"
DEFAULT_PROFILE_RESOURCE = "default_profile.json"

_OPTIONAL_NUMBERS = ("bits_per_value_payload", "top1_agreement", "kl_per_token", "ppl_change",
                     "encode_msym_per_s", "decode_msym_per_s", "gpu_decode_values_per_s")


class ProfileError(ValueError):
    """A profile is malformed (the message names the file and the field)."""


@dataclass(frozen=True, slots=True)
class LevelProfile:
    """Measured cost and loss of one codec level."""

    level: str
    bits_per_value: float
    quality_loss: float
    bits_per_value_payload: float | None = None
    top1_agreement: float | None = None
    kl_per_token: float | None = None
    ppl_change: float | None = None
    encode_msym_per_s: float | None = None
    decode_msym_per_s: float | None = None
    gpu_decode_values_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class PositionPoint:
    """A level's measured loss when only one chunk, `distance_tokens` from the context's end, is lossy."""

    distance_tokens: float
    """Tokens from the chunk's centre to the context's end."""
    quality_loss: float
    """Whole-context equivalent (the level's flat ``quality_loss`` unit): the chunk's KL x context/chunk tokens."""
    kl_per_token: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True, slots=True)
class PositionCurve:
    """A level's loss by distance from the context's end: `points` sorted by distance (at least one), and the
    first chunk of a context (the attention sinks) apart.

    >>> curve = PositionCurve((PositionPoint(500, 0.02), PositionPoint(1500, 0.01)), PositionPoint(7500, 0.3))
    >>> curve.quality_loss(1000), curve.quality_loss(0), curve.quality_loss(15_000)
    (0.015, 0.02, 0.01)
    >>> curve.quality_loss(15_000, first_chunk=True)
    0.3
    """

    points: tuple[PositionPoint, ...]
    first_chunk: PositionPoint | None = None
    additivity_factor: float | None = None
    """Measured whole-context KL / sum of the single-chunk KLs; the points' ``quality_loss`` already includes its
    square root (informational)."""

    def quality_loss(self, distance_tokens: float, *, first_chunk: bool = False) -> float:
        """The loss at `distance_tokens`: linear between the points, the nearest point's value outside them;
        `first_chunk` (the chunk starting at token 0) takes `first_chunk`'s value when there is one."""
        if first_chunk and self.first_chunk is not None:
            return self.first_chunk.quality_loss
        points = self.points
        if distance_tokens <= points[0].distance_tokens:
            return points[0].quality_loss
        for left, right in zip(points, points[1:]):
            if distance_tokens <= right.distance_tokens:
                share = (distance_tokens - left.distance_tokens) / (right.distance_tokens - left.distance_tokens)
                return left.quality_loss + share * (right.quality_loss - left.quality_loss)
        return points[-1].quality_loss


@dataclass(frozen=True, slots=True)
class PositionQuality:
    """The ``position_quality`` entry of a profile: a curve per level, and what it was measured on."""

    curves: tuple[tuple[str, PositionCurve], ...]
    context_tokens: int
    chunk_tokens: int
    continuation_tokens: int | None = None
    documents: int | None = None

    def curve(self, level: str) -> PositionCurve | None:
        """The curve of `level` (None: not measured by position)."""
        return next((c for name, c in self.curves if name == level), None)

    def to_json_dict(self) -> dict[str, Any]:
        levels = {}
        for name, curve in self.curves:
            entry: dict[str, Any] = {"points": [asdict(p) for p in curve.points]}
            if curve.first_chunk is not None:
                entry["first_chunk"] = asdict(curve.first_chunk)
            if curve.additivity_factor is not None:
                entry["additivity_factor"] = curve.additivity_factor
            levels[name] = entry
        out: dict[str, Any] = {"context_tokens": self.context_tokens, "chunk_tokens": self.chunk_tokens}
        if self.continuation_tokens is not None:
            out["continuation_tokens"] = self.continuation_tokens
        if self.documents is not None:
            out["documents"] = self.documents
        out["levels"] = levels
        return out


@dataclass(frozen=True, slots=True)
class Profile:
    """A codec profile: levels (in the codec's order, not sorted by size or quality) and the model they were
    measured on."""

    levels: tuple[LevelProfile, ...]
    model_name: str = ""
    model_layers: int = 0
    model_kv_heads: int = 0
    model_head_dim: int = 0
    object_tokens: int = 2048
    quality_metric: str = "kl_per_token"
    provisional: bool = False
    note: str = ""
    source: str = field(default="", compare=False)
    """Where the profile was read from (a path, or ``kvcast:default``)."""
    lossy_prefix_ratio: float | None = None
    """Measured quality loss of a text chunk recomputed over chunks loaded at a lossy level, as a ratio of their
    token-weighted mean loss (`kvcast.policies.base.chunk_quality_losses`); None where not measured (the
    simulator then uses `kvcast.policies.base.DEFAULT_LOSSY_PREFIX_RATIO`). This is the field a measurement on
    the real model fills in."""
    position_quality: PositionQuality | None = None
    """Loss by distance from the context's end, per level (None: every chunk gets the flat loss)."""
    text_over_lossy_prefix_penalty: float | None = None
    """Extra loss of a chunk recomputed from text over a lossy prefix, relative to the prefix's loss."""

    def level(self, name: str) -> LevelProfile:
        """The row of level `name`; ProfileError if the profile has no such level."""
        for row in self.levels:
            if row.level == name:
                return row
        raise ProfileError(f"profile {self.source or '(unnamed)'} has no level {name!r}; "
                           f"it has {[r.level for r in self.levels]}")

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(r.level for r in self.levels)

    def restricted(self, names: list[str] | tuple[str, ...]) -> Profile:
        """This profile with only the levels `names` (kept in the profile's own order)."""
        for name in names:
            self.level(name)
        keep = tuple(r for r in self.levels if r.level in set(names))
        return replace(self, levels=keep)

    def quality_loss_at(self, level: str, distance_tokens: float, *, first_chunk: bool = False) -> float:
        """`level`'s loss for a chunk whose centre is `distance_tokens` from the context's end (`PositionCurve`;
        `first_chunk`: it starts at token 0 of a context of several chunks); the flat ``quality_loss`` for a level
        without a curve."""
        row = self.level(level)
        curve = self.position_curve(level)
        if curve is None:
            return row.quality_loss
        return curve.quality_loss(distance_tokens, first_chunk=first_chunk)

    def position_curve(self, level: str) -> PositionCurve | None:
        """`level`'s loss-by-position curve (None: the level's loss is flat)."""
        return self.position_quality.curve(level) if self.position_quality is not None else None

    # ------------------------------------------------------------------ JSON
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "model": {"name": self.model_name, "layers": self.model_layers, "kv_heads": self.model_kv_heads,
                      "head_dim": self.model_head_dim},
            "object_tokens": self.object_tokens,
            "quality_metric": self.quality_metric,
            "provisional": self.provisional,
            "note": self.note,
            **({} if self.lossy_prefix_ratio is None else {"lossy_prefix_ratio": self.lossy_prefix_ratio}),
            "levels": [asdict(r) for r in self.levels],
        } | ({} if self.position_quality is None else {"position_quality": self.position_quality.to_json_dict()}) \
            | ({} if self.text_over_lossy_prefix_penalty is None
               else {"text_over_lossy_prefix_penalty": self.text_over_lossy_prefix_penalty})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def from_json_dict(cls, obj: Any, source: str = "") -> Profile:
        """Validate and read a parsed ``kvcast-profile/1`` object; ProfileError names `source` and the
        field."""
        where = source or "profile"

        def fail(msg: str) -> ProfileError:
            return ProfileError(f"{where}: {msg}")

        if not isinstance(obj, Mapping):
            raise fail(f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != FORMAT_ID:
            raise fail(f"'format' is {obj.get('format')!r}, expected {FORMAT_ID!r}")
        model = obj.get("model", {})
        if not isinstance(model, Mapping):
            raise fail("'model' must be an object")
        dims = {}
        for key in ("layers", "kv_heads", "head_dim"):
            value = model.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(f"model.{key} must be a non-negative integer, got {value!r}")
            dims[key] = value
        object_tokens = obj.get("object_tokens", 2048)
        if not isinstance(object_tokens, int) or isinstance(object_tokens, bool) or object_tokens <= 0:
            raise fail(f"'object_tokens' must be a positive integer, got {object_tokens!r}")
        metric = obj.get("quality_metric", "kl_per_token")
        if not isinstance(metric, str):
            raise fail("'quality_metric' must be a string")
        ratio = _number(obj.get("lossy_prefix_ratio"), "'lossy_prefix_ratio'", fail, required=False)
        if ratio is not None and ratio < 0:
            raise fail(f"'lossy_prefix_ratio' must be >= 0, got {ratio}")
        rows = obj.get("levels")
        if not isinstance(rows, list) or not rows:
            raise fail("'levels' must be a non-empty list")
        levels = []
        seen = set()
        for i, row in enumerate(rows):
            at = f"levels[{i}]"
            if not isinstance(row, Mapping):
                raise fail(f"{at} must be an object")
            name = row.get("level")
            if not isinstance(name, str) or not name or name == "text":
                raise fail(f"{at}.level must be a non-empty string other than 'text', got {name!r}")
            if name in seen:
                raise fail(f"{at}.level {name!r} appears twice")
            seen.add(name)
            at = f"levels[{i}] ({name})"
            values: dict[str, float | None] = {}
            for key in ("bits_per_value", "quality_loss"):
                values[key] = _number(row.get(key), f"{at}.{key}", fail, required=True)
            for key in _OPTIONAL_NUMBERS:
                values[key] = _number(row.get(key), f"{at}.{key}", fail, required=False)
            if values["bits_per_value"] <= 0:
                raise fail(f"{at}.bits_per_value must be > 0, got {values['bits_per_value']}")
            if values["quality_loss"] < 0:
                raise fail(f"{at}.quality_loss must be >= 0, got {values['quality_loss']}")
            gpu = values["gpu_decode_values_per_s"]
            if gpu is not None and gpu <= 0:
                raise fail(f"{at}.gpu_decode_values_per_s must be > 0, got {gpu}")
            levels.append(LevelProfile(level=name, **values))
        position = None
        if obj.get("position_quality") is not None:
            position = _position_quality(obj["position_quality"], seen, fail)
        penalty = _number(obj.get("text_over_lossy_prefix_penalty"), "text_over_lossy_prefix_penalty", fail,
                          required=False)
        if penalty is not None and penalty < 0:
            raise fail(f"text_over_lossy_prefix_penalty must be >= 0, got {penalty}")
        return cls(tuple(levels), model_name=str(model.get("name", "")), model_layers=dims["layers"],
                   model_kv_heads=dims["kv_heads"], model_head_dim=dims["head_dim"],
                   object_tokens=object_tokens, quality_metric=metric,
                   provisional=bool(obj.get("provisional", False)), note=str(obj.get("note", "")),
                   source=source, lossy_prefix_ratio=ratio, position_quality=position,
                   text_over_lossy_prefix_penalty=penalty)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file; ProfileError (naming the file, and the line for JSON syntax errors)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read the profile: {exc.strerror or exc}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return cls.from_json_dict(obj, source=str(path))


def _position_quality(obj: Any, level_names: set[str], fail) -> PositionQuality:
    at = "position_quality"
    if not isinstance(obj, Mapping):
        raise fail(f"{at} must be an object")
    sizes: dict[str, int | None] = {}
    for key, required in (("context_tokens", True), ("chunk_tokens", True), ("continuation_tokens", False),
                          ("documents", False)):
        value = obj.get(key)
        if value is None and not required:
            sizes[key] = None
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"{at}.{key} must be a positive integer, got {value!r}")
        sizes[key] = value
    levels = obj.get("levels")
    if not isinstance(levels, Mapping) or not levels:
        raise fail(f"{at}.levels must be a non-empty object (level -> curve)")
    curves = []
    for name, entry in levels.items():
        where = f"{at}.levels.{name}"
        if name not in level_names:
            raise fail(f"{where}: {name!r} is not a level of the profile")
        if not isinstance(entry, Mapping):
            raise fail(f"{where} must be an object")
        points = entry.get("points")
        if not isinstance(points, list) or not points:
            raise fail(f"{where}.points must be a non-empty list")
        parsed = sorted((_position_point(p, f"{where}.points[{i}]", fail) for i, p in enumerate(points)),
                        key=lambda p: p.distance_tokens)
        for left, right in zip(parsed, parsed[1:]):
            if left.distance_tokens == right.distance_tokens:
                raise fail(f"{where}.points: distance_tokens {left.distance_tokens:g} appears twice")
        first = entry.get("first_chunk")
        factor = _number(entry.get("additivity_factor"), f"{where}.additivity_factor", fail, required=False)
        if factor is not None and factor <= 0:
            raise fail(f"{where}.additivity_factor must be > 0, got {factor}")
        curves.append((name, PositionCurve(tuple(parsed), None if first is None else
                                           _position_point(first, f"{where}.first_chunk", fail), factor)))
    return PositionQuality(tuple(curves), sizes["context_tokens"], sizes["chunk_tokens"],  # type: ignore[arg-type]
                           sizes["continuation_tokens"], sizes["documents"])


def _position_point(obj: Any, at: str, fail) -> PositionPoint:
    if not isinstance(obj, Mapping):
        raise fail(f"{at} must be an object")
    distance = _number(obj.get("distance_tokens"), f"{at}.distance_tokens", fail, required=True)
    loss = _number(obj.get("quality_loss"), f"{at}.quality_loss", fail, required=True)
    if distance < 0 or loss < 0:
        raise fail(f"{at}: distance_tokens and quality_loss must be >= 0, got {distance}, {loss}")
    kl = _number(obj.get("kl_per_token"), f"{at}.kl_per_token", fail, required=False)
    top1 = _number(obj.get("top1_agreement"), f"{at}.top1_agreement", fail, required=False)
    if top1 is not None and not 0 <= top1 <= 1:
        raise fail(f"{at}.top1_agreement must be in [0, 1], got {top1}")
    return PositionPoint(distance, loss, kl, top1)  # type: ignore[arg-type]


def _number(value: Any, at: str, fail, *, required: bool) -> float | None:
    if value is None:
        if required:
            raise fail(f"{at} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{at} must be a finite number, got {value!r}")
    return float(value)


def default_profile() -> Profile:
    """kvcast's shipped profile: every codec level measured on SmolLM2-135M and the WikiText-2 test split by
    ``kvcast eval codec`` (its ``note`` says when and how)."""
    text = resources.files("kvcast.streamer").joinpath(DEFAULT_PROFILE_RESOURCE).read_text()
    return Profile.from_json_dict(json.loads(text), source="kvcast:default")
