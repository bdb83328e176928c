"""The serving host's cost profile: decode speed per level and prefill cost by position, measured here.

A live session's menus (`kvcast.streamer.live.live_menus`) take their decode and recompute estimates from a
`HostProfile`; ``kvcast simulate --host-profile FILE`` reads the same file, so live runs and simulations of
this host share one cost model. ``kvcast calibrate host`` measures it in about a minute (format
``kvcast-host-profile/1``):

* decode: every chunk of the model's real KV (a random-token prefill of ``max(positions) + chunk_tokens``
  tokens) encoded at each level as a stored context holds them, decoded ``repeats`` times with the codec as
  the live decoder runs it; the median round gives values per second;
* prefill: the model prefills chunks of ``chunk_tokens`` and ``chunk_tokens / 2`` tokens at several positions
  on a cached prefix (as `kvcast.streamer.live.ModelCompute` does); ``kvcast.streamer.costfit`` fits
  ``c + a * len + b * len * (pos + len / 2)`` to the medians;
* quality loss per level: the shipped codec profile's (measured on SmolLM2-135M), the estimate for any model.

Both are measured on the model's device, as the live session runs there: on a CUDA device the objects decode on
the GPU (`kvcast.streamer.live.CodecDecoder`) and every clock is read after the device is done
(`wait_for_device`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcast.streamer.costfit import fit_recompute_cost
from kvcast.streamer.menus import RecomputeCost

__all__ = ["HOST_PROFILE_FORMAT", "HostProfile", "HostProfileError", "load_host_profile", "measure_host_profile",
           "save_host_profile", "wait_for_device"]

HOST_PROFILE_FORMAT = "kvcast-host-profile/1"


@dataclass(frozen=True)
class HostProfile:
    """What a serving host's resources cost, for the estimates the policy observes: decode speed per level
    (values per second; a level not listed decodes at `default_decode_values_per_s`), the prefill cost by
    position, and each level's quality loss (from a codec profile)."""

    recompute: RecomputeCost
    decode_values_per_s: Mapping[str, float] = field(default_factory=dict)
    default_decode_values_per_s: float = 20e6
    quality_loss: Mapping[str, float] = field(default_factory=dict)

    def decode_s(self, level: str, values: int) -> float:
        return values / self.decode_values_per_s.get(level, self.default_decode_values_per_s)


def wait_for_device(device: Any) -> None:
    """Return once the work queued on `device`'s current stream is done: CUDA runs kernels asynchronously, so a
    clock read (or a completion reported to the engine) before this would miss the tail of the work. Nothing to
    wait for on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class HostProfileError(ValueError):
    """A host profile file is malformed (the message names the file and the field)."""


def measure_host_profile(model: Any, *, fingerprint: Any = None, levels: Sequence[str] | None = None,
                         chunk_tokens: int = 256, positions: Sequence[int] = (0, 512, 1024, 1536),
                         repeats: int = 3, seed: int = 0,
                         progress: Callable[[str], None] | None = None) -> tuple[HostProfile, dict[str, Any]]:
    """Measure `model`'s prefill cost and the codec's decode speed on this machine, on the model's device.

    Returns the profile and the JSON-ready record (`save_host_profile` writes it). Levels that cannot encode
    this model's KV (grid levels without a sensitivity table) are skipped and listed in the record.
    """
    import torch

    from kvcast import codec
    from kvcast.codec.errors import CodecError
    from kvcast.codec.hf import cache_from_kv, kv_from_cache, kv_values, slice_kv
    from kvcast.streamer.profile import default_profile

    say = progress or (lambda _msg: None)
    levels = tuple(levels) if levels is not None else tuple(codec.levels())
    half = max(1, chunk_tokens // 2)
    total = max(positions) + chunk_tokens
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    ids = torch.randint(0, vocab, (1, total), generator=g).to(device)
    with torch.no_grad():
        kv = kv_from_cache(model(ids, use_cache=True, logits_to_keep=1).cache)
    host_kv = [(k.cpu(), v.cpu()) for k, v in kv]  # what a server encodes and stores

    decode_speed: dict[str, float] = {}
    skipped: dict[str, str] = {}
    # Every chunk of the context, as a stored context holds them: grid levels spend more bits near the context's
    # end, so one chunk would misstate a level's speed over a whole context.
    starts = range(0, total - chunk_tokens + 1, chunk_tokens)
    chunks = [slice_kv(host_kv, s, s + chunk_tokens) for s in starts]
    codec.default_codec().pool.warm_up()
    for level in levels:
        try:
            objects = [(codec.encode(part, level, model=fingerprint, token_start=s, context_end=total),
                        kv_values(part)) for s, part in zip(starts, chunks)]
        except CodecError as exc:
            skipped[level] = str(exc).split(";")[0]
            continue
        rounds = []
        for _ in range(repeats + 1):  # the first round warms up
            t = time.perf_counter()
            for data, _values in objects:
                codec.decode(data, device=device, dtype=dtype)
            wait_for_device(device)
            rounds.append(time.perf_counter() - t)
        decode_speed[level] = sum(v for _, v in objects) / statistics.median(rounds[1:])
        say(f"decode {level}: {decode_speed[level] / 1e6:.1f} M values/s")

    points = []
    for pos in positions:
        prefix = slice_kv(kv, 0, pos) if pos else None
        for length in (chunk_tokens, half):
            times = []
            for _ in range(repeats + 1):
                cache = None if prefix is None else cache_from_kv(prefix, model.config, dtype=dtype)
                t = time.perf_counter()
                with torch.no_grad():
                    model(ids[:, pos:pos + length], cache=cache, use_cache=True, logits_to_keep=1)
                wait_for_device(device)
                times.append(time.perf_counter() - t)
            points.append((pos, length, statistics.median(times[1:])))
            say(f"prefill {length} tokens at {pos}: {points[-1][2] * 1e3:.1f} ms")
    fit = fit_recompute_cost(points)
    quality = {}
    shipped = default_profile()
    for level in decode_speed:
        try:
            quality[level] = shipped.level(level).quality_loss
        except ValueError:
            quality[level] = 0.0
    name = getattr(fingerprint, "name", None) or getattr(model.config, "name_or_path", "") or "model"
    profile = HostProfile(recompute=RecomputeCost(*fit.coef, name=f"host/{name}"),
                          decode_values_per_s=decode_speed, quality_loss=quality,
                          default_decode_values_per_s=min(decode_speed.values()) if decode_speed else 20e6)
    record = {
        "format": HOST_PROFILE_FORMAT,
        "model": name,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device),
                    **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})},
        "measured_unix_s": time.time(),
        "chunk_tokens": chunk_tokens,
        "repeats": repeats,
        "decode_values_per_s": decode_speed,
        "skipped_levels": skipped,
        "quality_loss": quality,
        "recompute": {"a_s_per_token": fit.a_s_per_token, "b_s_per_token_pair": fit.b_s_per_token_pair,
                      "c_s": fit.c_s, "max_abs_rel_error": fit.max_abs_rel,
                      "points": [{"pos": p, "tokens": n, "seconds": t} for p, n, t in points]},
    }
    return profile, record


def save_host_profile(record: dict[str, Any], path: Path) -> Path:
    """Write a measured record (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_host_profile(path: Path) -> HostProfile:
    """Read a ``kvcast-host-profile/1`` file; `HostProfileError` naming the file and field if malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HostProfileError(f"{path}: cannot read a host profile ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != HOST_PROFILE_FORMAT:
        raise HostProfileError(f"{path}: not a {HOST_PROFILE_FORMAT} file")
    try:
        rc = doc["recompute"]
        recompute = RecomputeCost(float(rc["a_s_per_token"]), float(rc["b_s_per_token_pair"]), float(rc["c_s"]),
                                  name=f"host/{doc.get('model', '')}")
        speeds = {str(k): float(v) for k, v in doc["decode_values_per_s"].items()}
        quality = {str(k): float(v) for k, v in doc.get("quality_loss", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HostProfileError(f"{path}: malformed field ({type(exc).__name__}: {exc})") from None
    bad = [k for k, v in speeds.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise HostProfileError(f"{path}: decode_values_per_s must be finite and > 0 (levels {bad})")
    return HostProfile(recompute=recompute, decode_values_per_s=speeds, quality_loss=quality,
                       default_decode_values_per_s=min(speeds.values()) if speeds else 20e6)
