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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_ID", "LevelProfile", "Profile", "ProfileError", "default_profile"]

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
        return Profile(keep, self.model_name, self.model_layers, self.model_kv_heads, self.model_head_dim,
                       self.object_tokens, self.quality_metric, self.provisional, self.note, self.source,
                       self.lossy_prefix_ratio)

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
        }

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
        return cls(tuple(levels), model_name=str(model.get("name", "")), model_layers=dims["layers"],
                   model_kv_heads=dims["kv_heads"], model_head_dim=dims["head_dim"],
                   object_tokens=object_tokens, quality_metric=metric,
                   provisional=bool(obj.get("provisional", False)), note=str(obj.get("note", "")),
                   source=source, lossy_prefix_ratio=ratio)

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
