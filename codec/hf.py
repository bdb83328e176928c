"""KV in and out of Hugging Face transformers caches, and the model fingerprint a KV object carries.

kvcast's KV layout is a list with one ``(key, value)`` pair per layer, each ``[1, kv_heads, tokens, head_dim]``,
exactly as a transformers `DynamicCache` holds them (keys after RoPE). Extract, encode, decode, rebuild and
continue (a tiny random Llama here):

>>> import torch, transformers
>>> from kvcast import codec
>>> config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                   num_attention_heads=4, num_key_value_heads=2)
>>> _ = torch.manual_seed(0)
>>> model = transformers.LlamaForCausalLM(config).eval()
>>> ids = torch.randint(0, 97, (1, 12))
>>> with torch.no_grad():
...     out = model(ids[:, :10], use_cache=True)
...     kv = kv_from_cache(out.cache)
...     data = codec.encode(kv, "raw", model=fingerprint_from_config(config))
...     cache = cache_from_kv(codec.decode(data, dtype=torch.float32), config)
...     logits = model(ids[:, 10:], cache=cache).logits          # continues after the decoded tokens
...     exact = model(ids[:, 10:], cache=out.cache).logits
>>> [tuple(t.shape) for t in kv[0]]
[(1, 2, 10, 8), (1, 2, 10, 8)]
>>> logits.shape, bool((logits - exact).abs().max() < 1e-2)   # "raw" stores fp16
(torch.Size([1, 2, 97]), True)

Current transformers (checked with 5.25) names the cache ``cache``, both as the forward keyword and as the
output attribute; ``past_key_values`` still works with a deprecation warning until its removal in 5.40.

A forward pass appends to the cache it is given, so build a fresh cache (`cache_from_kv`) for every forward;
the tensors of `kv` themselves are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvcast.codec.fingerprint import KV_CONFIG_FIELDS, KVSignature, ModelFingerprint

KV = list[tuple[torch.Tensor, torch.Tensor]]


def kv_from_cache(cache: Any) -> KV:
    """The ``(key, value)`` pairs of every layer of a transformers cache (no copy)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        if isinstance(cache, (list, tuple)):  # legacy tuple-of-tuples cache
            return [(k, v) for k, v, *_ in cache]
        raise TypeError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    kv = []
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"cache layer {i} holds no KV tensors (was a forward pass run with use_cache=True?)")
        kv.append((keys, values))
    return kv


def cache_from_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any,
                  dtype: torch.dtype | None = None) -> Any:
    """A new `DynamicCache` for `config`'s model holding `kv` (one ``[1, kv_heads, tokens, head_dim]`` pair per
    layer), cast to `dtype` when given (use the model's dtype); the model continues at position ``tokens``."""
    from transformers import DynamicCache

    check_kv_matches(kv, config)
    cache = DynamicCache(config=config)
    for i, (keys, values) in enumerate(kv):
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        cache.update(keys, values, layer_idx=i)
    return cache


def check_kv_matches(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any) -> None:
    """Raise `ValueError` unless `kv` has the layer count, KV heads and head size of `config`'s model."""
    shape = model_shape(config)
    if len(kv) != shape["layers"]:
        raise ValueError(f"KV has {len(kv)} layers but the model has {shape['layers']}")
    tokens = None
    for i, (keys, values) in enumerate(kv):
        for role, t in (("key", keys), ("value", values)):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != shape["kv_heads"] or t.shape[3] != shape["head_dim"]:
                raise ValueError(f"layer {i} {role} has shape {tuple(t.shape)}; the model needs "
                                 f"[1, {shape['kv_heads']}, tokens, {shape['head_dim']}]")
            if tokens is None:
                tokens = t.shape[2]
            elif t.shape[2] != tokens:
                raise ValueError(f"layer {i} {role} has {t.shape[2]} tokens, layer 0 has {tokens}")


def model_shape(config: Any) -> dict[str, int]:
    """``{"layers", "kv_heads", "head_dim"}`` of a causal LM config (the text decoder's, for multimodal ones)."""
    cfg = _text_config(config)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"layers": int(cfg.num_hidden_layers), "kv_heads": int(kv_heads), "head_dim": int(head_dim)}


def rope_parameters(config: Any) -> dict[str, Any] | None:
    """The RoPE settings that shape the cached keys: ``{"theta", "type", ...scaling parameters}``, JSON-safe.

    Reads transformers >= 5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``; None when the
    config has no RoPE.
    """
    cfg = _text_config(config)
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type parameters: the full-attention layers' RoPE
    if not isinstance(params, dict) or not params:
        theta = getattr(cfg, "rope_theta", None)
        if theta is None:
            return None
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params["rope_theta"] = theta
    rope: dict[str, Any] = {}
    for key, value in params.items():
        if key == "rope_theta":
            rope["theta"] = float(value)
        elif key in ("rope_type", "type"):
            rope["type"] = str(value)
        elif value is not None:
            rope[key] = _json_safe(value)
    rope.setdefault("type", "default")
    partial = getattr(cfg, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        rope.setdefault("partial_rotary_factor", float(partial))
    return dict(sorted(rope.items()))


def kv_signature(config: Any) -> KVSignature:
    """The `KVSignature` of a transformers model config (the text decoder's, for multimodal ones): the
    allowlisted fields of `kvcast.codec.fingerprint.KV_CONFIG_FIELDS`, with the resolved KV shape and the
    normalised RoPE parameters (`rope_parameters`; non-default RoPE types add ``max_position_embeddings``,
    which dynamic and long-context RoPE variants read)."""
    cfg = _text_config(config)
    shape = model_shape(config)
    values = {name: getattr(cfg, name, None) for name in KV_CONFIG_FIELDS}
    values.update(num_hidden_layers=shape["layers"], num_key_value_heads=shape["kv_heads"],
                  head_dim=shape["head_dim"])
    rope = rope_parameters(config)
    if rope is not None and rope.get("type") != "default":
        rope = dict(rope, max_position_embeddings=getattr(cfg, "max_position_embeddings", None))
    values["rope"] = rope
    return KVSignature.from_fields(values)


def fingerprint_from_config(config: Any, *, name: str | None = None,
                            dtype: torch.dtype | str | None = None) -> ModelFingerprint:
    """The `kvcast.codec.ModelFingerprint` of a transformers model config, with its `kv_signature`.

    `name` defaults to the config's ``name_or_path``; `dtype` (of the KV) defaults to the config's dtype.
    """
    shape = model_shape(config)
    if name is None:
        name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or \
            getattr(config, "model_type", "unknown")
    if dtype is None:  # transformers >= 4.56 calls it `dtype` (reading `torch_dtype` there logs a deprecation)
        dtype = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None) or torch.float32
    return ModelFingerprint(name=str(name), layers=shape["layers"], kv_heads=shape["kv_heads"],
                            head_dim=shape["head_dim"], dtype=_dtype_name(dtype), rope=rope_parameters(config),
                            kv_signature=kv_signature(config))


def kv_tokens(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Tokens held by `kv`."""
    return int(kv[0][0].shape[2]) if kv else 0


def kv_values(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Scalar values held by `kv` (layers * 2 * kv_heads * tokens * head_dim)."""
    return sum(k.numel() + v.numel() for k, v in kv)


def slice_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, stop: int) -> KV:
    """Tokens ``[start, stop)`` of every layer (views, no copy)."""
    return [(k[:, :, start:stop], v[:, :, start:stop]) for k, v in kv]


def cast_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> KV:
    """`kv` rounded to `dtype` and back to each tensor's own dtype (e.g. the fp16 rounding of an fp32 cache)."""
    return [(k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype)) for k, v in kv]


# ----------------------------------------------------------------------------------------------- helpers


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:
        return getter()


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    if dtype not in names:
        raise ValueError(f"unsupported KV dtype {dtype}; use float16, bfloat16 or float32")
    return names[dtype]


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)
