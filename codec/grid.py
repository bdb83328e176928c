"""The ``grid`` quantizer: sensitivity-weighted uniform grids, class-shared CDFs, range coding.

One (K/V, layer) group ``[heads, tokens, head_dim]`` is coded as ``[tokens, channels]``:

* every channel ``c`` has its own step ``step_c`` (from the model's sensitivity table, chosen by the encoder
  and shipped as fp16) and its own mean ``mu_c`` (fp16); every token ``t`` a step multiplier ``m_t`` (fp16,
  shared by all groups of the object). A value becomes the symbol ``q = round((x - mu_c) / (step_c * m_t))``
  and is decoded as ``mu_c + q * step_c * m_t``: the error is at most half a step.
* tokens before the object's ``sink_rows`` (the model's attention sinks, absolute positions below the
  level's ``sink_tokens``) are stored as fp16, not quantized.
* symbols are range-coded with torchac. Channels are put in classes by the spread of their symbols (half an
  octave apart); each class has one CDF estimated from the object and shipped, so side information stays
  small while each channel still gets a distribution of its own width.
* a group's symbols are bounded by ``top`` (its escape level: about one value in 10,000 is beyond it, and
  at most `ESCAPE`); values with ``|q| >= top`` are coded as ``+-top`` and stored exactly (fp16) in order.

Streams are independent per (token block, channel group), as for every entropy-coded level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from codec.entropy import StreamGroup, cachegen_cdf, check_cdf, decode_group, encode_group
from codec.errors import CodecError

ESCAPE = 127
ESCAPE_RATE = 1e-4
FP16_MAX = 65504.0
CLASS_OCTAVE_STEPS = 2   # classes per octave of symbol spread
MIN_SPREAD = 0.05


def _coded_rows(tokens: int, sink_rows: int, tokens_per_stream: int) -> tuple[int, ...]:
    coded = torch.ones(tokens, dtype=torch.int64)
    coded[:sink_rows] = 0
    counts = torch.zeros(-(-tokens // tokens_per_stream), dtype=torch.int64)
    counts.index_add_(0, torch.arange(tokens) // tokens_per_stream, coded)
    return tuple(int(c) for c in counts)


def escape_level(abs_counts: torch.Tensor) -> int:
    """The group's escape symbol magnitude from the counts of ``|q| = 0..ESCAPE`` (the last one counts all
    larger): just past all but a fraction `ESCAPE_RATE` of the values, at most `ESCAPE`. Every ``|q| >=`` it
    is stored exactly, which keeps CDF tables short when a few values are far out."""
    total = int(abs_counts.sum())
    if total == 0:
        return 0
    allowed = math.floor(ESCAPE_RATE * total)
    beyond = total - torch.cumsum(abs_counts, 0)          # values with |q| > m, for m = 0..ESCAPE
    return int(min(ESCAPE, int(torch.nonzero(beyond <= allowed)[0]) + 1))


def grid_of(steps: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """float32 ``[tokens, channels]`` quantizer steps from fp16 channel steps and token multipliers."""
    return multipliers.to(torch.float32).unsqueeze(1) * steps.to(torch.float32).unsqueeze(0)


def encode_grid_layer(x: torch.Tensor, steps: torch.Tensor, multipliers: torch.Tensor, *, sink_rows: int,
                      tokens_per_stream: int, channels_per_stream: int, rounding: float = 0.5) -> dict[str, Any]:
    """Encode one group ``[heads, tokens, head_dim]`` with fp16 `steps` ``[channels]`` and `multipliers`
    ``[tokens]``. `rounding` 0.5 rounds to nearest; less widens the zero bin (a dead zone)."""
    heads, tokens, dim = x.shape
    channels = heads * dim
    x = x.to(torch.float32).permute(1, 0, 2).reshape(tokens, channels)
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    if not math.isfinite(peak):
        raise CodecError("KV contains NaN or infinite values")
    if peak > FP16_MAX:
        raise CodecError("KV values exceed the fp16 range")
    body = x[sink_rows:]
    n = body.shape[0]
    mean = (body.mean(0) if n else torch.zeros(channels)).to(torch.float16)
    u = (body - mean.to(torch.float32)).div_(grid_of(steps, multipliers)[sink_rows:])
    q = u.round_() if rounding == 0.5 else u.sign().mul_(u.abs().add_(rounding).floor_())
    # one histogram per channel of q clipped to +-ESCAPE: class spreads, escape level and CDF counts from it
    width = 2 * ESCAPE + 1
    qi = q.clamp(-ESCAPE, ESCAPE).to(torch.int64).add_(ESCAPE + torch.arange(channels) * width)
    hist = torch.bincount(qi.reshape(-1), minlength=channels * width).view(channels, width)
    folded = hist[:, ESCAPE:].clone()
    folded[:, 1:] += hist[:, :ESCAPE].flip(1)
    top = escape_level(folded.sum(0))
    values = torch.arange(-ESCAPE, ESCAPE + 1, dtype=torch.float64)
    per_channel = hist.sum(1).clamp_min(1).to(torch.float64)
    m1 = (hist.to(torch.float64) @ values) / per_channel
    spread = ((hist.to(torch.float64) @ values ** 2) / per_channel - m1 ** 2).clamp_min(0).sqrt()
    level = torch.round(CLASS_OCTAVE_STEPS * torch.log2(spread.clamp_min(MIN_SPREAD))).to(torch.int64)
    _, cls = torch.unique(level, return_inverse=True)
    classes = int(cls.max()) + 1
    slots = 2 * top + 1
    kept = hist[:, ESCAPE - top:ESCAPE + top + 1].clone()           # |q| >= top: coded as +-top (escapes)
    if top:
        kept[:, 0] += hist[:, :ESCAPE - top].sum(1)
        kept[:, -1] += hist[:, ESCAPE + top + 1:].sum(1)
    counts = torch.zeros(classes, slots, dtype=torch.int64).index_add_(0, cls, kept)
    cdf = cachegen_cdf(counts).numpy()
    escaped = (q.abs() >= top) if top and int(folded[:, top:].sum()) else None
    outliers = body[escaped].to(torch.float16) if escaped is not None else torch.zeros(0, dtype=torch.float16)
    sym = q.clamp_(-top, top).add_(top).to(torch.int16)
    rows = _coded_rows(tokens, sink_rows, tokens_per_stream)
    streams = encode_group(StreamGroup(sym.numpy(), cdf[cls.numpy()], rows, channels_per_stream))
    return {"mean": mean, "classes": cls.to(torch.uint8).numpy(), "cdf": cdf, "top": top,
            "sink": x[:sink_rows].to(torch.float16), "outliers": outliers, "streams": streams}


def decode_grid_layer(parts: dict[str, Any], *, top: int, sink_rows: int, heads: int, tokens: int, head_dim: int,
                      tokens_per_stream: int, channels_per_stream: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Decode one group back to ``[heads, tokens, head_dim]``."""
    channels = heads * head_dim
    steps, multipliers, mean = parts["steps"], parts["multipliers"], parts["mean"]
    classes, cdf, sink, outliers = parts["classes"], parts["cdf"], parts["sink"], parts["outliers"]
    if (tuple(steps.shape), tuple(mean.shape), tuple(classes.shape), tuple(multipliers.shape)) != (
            (channels,), (channels,), (channels,), (tokens,)):
        raise CodecError("grid group side information has the wrong shape")
    if not (0 <= top <= ESCAPE) or cdf.ndim != 2 or cdf.shape[1] != 2 * top + 2:
        raise CodecError("grid group CDF table has the wrong shape")
    check_cdf(cdf)
    if classes.size and int(classes.max()) >= cdf.shape[0]:
        raise CodecError("grid group: a channel names a CDF class that does not exist")
    if tuple(sink.shape) != (sink_rows, channels):
        raise CodecError("grid group sink rows have the wrong shape")
    rows = _coded_rows(tokens, sink_rows, tokens_per_stream)
    sym = decode_group(cdf[classes.astype(np.int64)], rows, channels_per_stream, parts["streams"])
    q = torch.from_numpy(sym.astype(np.int32)) - top
    if q.numel() and (int(q.max()) > top or int(q.min()) < -top):
        raise CodecError("decoded symbol out of range for its group: corrupt stream")
    body = mean.to(torch.float32) + q.to(torch.float32) * grid_of(steps, multipliers)[sink_rows:]
    escaped = q.abs() >= top if top else torch.zeros_like(q, dtype=torch.bool)
    n_escaped = int(escaped.sum())
    if n_escaped != outliers.numel():
        raise CodecError(f"grid group: {n_escaped} escaped symbols but {outliers.numel()} stored outliers")
    if n_escaped:
        body[escaped] = outliers.to(torch.float32)
    x = torch.cat([sink.to(torch.float32), body]) if sink_rows else body
    return x.reshape(tokens, heads, head_dim).permute(1, 0, 2).to(out_dtype).contiguous()


def token_multipliers(table: Any, token_start: int, tokens: int, context_end: int, strength: float,
                      keys: np.ndarray | None = None) -> torch.Tensor:
    """fp16 step multiplier per token: ``w^(-strength/2)`` where ``w`` is the token's relative sensitivity by
    the table: its distance ``d = context_end - 1 - position`` from the context's last token (tokens past it
    count as 0) times, given the object's `keys` ``[layers, kv_heads, tokens, head_dim]``, its sink score."""
    positions = np.arange(token_start, token_start + tokens)
    distance = np.clip(context_end - 1 - positions, 0, None)
    weight = table.distance_weight(distance)
    if keys is not None:
        weight = weight * table.score_weight(table.sink_scores(keys))
    mult = np.power(weight, -strength / 2.0) if strength else np.ones(tokens)
    return torch.from_numpy(np.clip(mult, 1 / 256, 256).astype(np.float16))


def channel_steps(fisher: np.ndarray, step: float) -> torch.Tensor:
    """fp16 steps ``step / sqrt(F)`` per channel (kept within fp16's normal range)."""
    raw = step / np.sqrt(np.maximum(fisher.astype(np.float64), 1e-30))
    return torch.from_numpy(np.clip(raw, 2.0 ** -14, 2.0 ** 15).astype(np.float16))


# --------------------------------------------------------------------------------- worker protocol


def handle_encode_grid(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    from codec.pipeline import pack_parts, unpack_parts

    parts = unpack_parts(meta["parts"], blob)
    res = encode_grid_layer(parts["x"], parts["steps"], parts["multipliers"], **meta["params"])
    streams = res.pop("streams")
    top = res.pop("top")
    res["streams"] = b"".join(streams)
    parts_meta, out = pack_parts(res)
    return {"parts": parts_meta, "lengths": [len(s) for s in streams], "top": top}, out


def handle_decode_grid(meta: dict, blob: bytes) -> tuple[dict, bytes]:
    from codec.pipeline import TORCH_DTYPES, pack_parts, unpack_parts

    parts = unpack_parts(meta["parts"], blob)
    payload, pos, streams = parts["streams"], 0, []
    for n in meta["lengths"]:
        streams.append(payload[pos:pos + n])
        pos += n
    parts["streams"] = streams
    for name in ("classes", "cdf"):
        parts[name] = np.asarray(parts[name])
    params = dict(meta["params"])
    params["out_dtype"] = TORCH_DTYPES[params["out_dtype"]]
    y = decode_grid_layer(parts, **params)
    parts_meta, out = pack_parts({"y": y})
    return {"parts": parts_meta}, out
