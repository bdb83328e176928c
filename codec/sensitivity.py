"""Per-model sensitivity tables: how much each KV entry matters to the model's next-token distribution.

A table holds, for one model, the diagonal Fisher information of the continuation's log-likelihood with
respect to every KV channel (``[layers, kv_heads, head_dim]`` for keys and for values, averaged over context
tokens and continuation tokens) and its profile over the distance of a context token from the context's end.
To second order, a small KV error ``e`` costs ``KL ~= 1/2 sum_i F_i e_i^2``: the ``grid`` levels give every
channel the quantizer step ``lambda / sqrt(F_i)``, which minimises that KL for a given rate (reverse
water-filling at high rate), and scale the step per token by the distance profile.

Tables are produced from real text by ``kvcast calibrate`` and stored as safetensors (tensors + a JSON
metadata string; never pickle) in ``codec/tables/`` (shipped) or any folder the user names. The decoder of a
per-channel grid level never needs one, because the steps it uses travel in the object; a basis level's
decoder needs the table's synthesis transforms, which the object names by digest (`find_synthesis`). The
encoder looks a table up by the model fingerprint (`SensitivityTable.matches`) and refuses a table made for
another model:

* by what determines the KV, not by name: a table records the `kvcast.codec.fingerprint.KVSignature` of the
  model it was calibrated on (metadata ``kv_signature``); a fingerprint with a signature (from
  `kvcast.codec.hf.fingerprint_from_config`) fits a table with the same architecture (``model_type``), KV
  shape (layers, kv_heads, head_dim), RoPE parameters and signature digest, whatever the model is called or
  where it was loaded from;
* fallback, when the fingerprint (e.g. built by hand) or the table (older files) has no signature: the same
  KV shape, the same RoPE parameters (not compared when the fingerprint has none) and the same name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvcast.codec.errors import CodecError
from kvcast.codec.fingerprint import KVSignature, ModelFingerprint

TABLE_FORMAT = "kvcast-sensitivity/1"
TABLES_DIR = Path(__file__).resolve().parent / "tables"
PROFILE_BINS = 24


@dataclass(frozen=True)
class SensitivityTable:
    """Fisher sensitivity of one model's KV, per channel and by distance from the context's end."""

    model: dict[str, Any]
    """Fingerprint of the model (``kvcast.codec.ModelFingerprint.to_dict()``)."""
    key: np.ndarray
    """float32 ``[layers, kv_heads, head_dim]``: mean Fisher of each key channel (context tokens past the sink)."""
    value: np.ndarray
    """float32 ``[layers, kv_heads, head_dim]``: the same for values."""
    distance_edges: np.ndarray
    """float32 ``[bins + 1]``: distance-from-end bin edges in tokens (0 = the context's last token)."""
    distance_profile: np.ndarray
    """float32 ``[bins]``: mean Fisher of a token (all channels) in each distance bin, relative to the mean."""
    sink_key: np.ndarray | None = None
    """float32 ``[layers, kv_heads, head_dim]``: the unit key direction of the first token (the attention sink),
    averaged over calibration passages. Tokens whose keys point the same way attract attention like the sink
    (on SmolLM2: most often " the"); their sink score is the mean cosine over layers and heads."""
    score_edges: np.ndarray | None = None
    """float32 ``[bins + 1]``: sink-score bin edges (rising)."""
    score_profile: np.ndarray | None = None
    """float32 ``[bins]``: mean Fisher of a token in each sink-score bin, relative to the mean."""
    meta: dict[str, Any] = field(default_factory=dict)
    kv_signature: KVSignature | None = None
    """The `KVSignature` of the calibrated model (None in tables made without one)."""
    basis: np.ndarray | None = None
    """float32 ``[2, layers, kv_heads, head_dim, head_dim]`` (keys, values): per head the analysis transform
    ``A`` of the levels that code in the sensitivity basis (`LevelSpec.basis`): ``y = A x`` whitens the head's
    full Fisher matrix (shrunk towards its diagonal) and decorrelates the whitened data (`fit_basis`). None in
    tables made without one."""
    synthesis: np.ndarray | None = None
    """float32, the shape of `basis`: ``A^-1`` per head, stored so that every decoder uses the same numbers."""

    def __post_init__(self) -> None:
        shape = (int(self.model["layers"]), int(self.model["kv_heads"]), int(self.model["head_dim"]))
        for name, arr in (("key", self.key), ("value", self.value)):
            if arr.shape != shape or arr.dtype != np.float32:
                raise CodecError(f"sensitivity table: {name} is {arr.dtype} {arr.shape}, expected float32 {shape}")
            if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise CodecError(f"sensitivity table: {name} must be finite and positive")
        e, p = self.distance_edges, self.distance_profile
        if e.ndim != 1 or p.ndim != 1 or len(e) != len(p) + 1 or len(p) < 1:
            raise CodecError("sensitivity table: distance bins and profile do not match")
        if np.any(np.diff(e) <= 0) or e[0] != 0 or not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise CodecError("sensitivity table: distance edges must rise from 0 and the profile be positive")
        sig = self.kv_signature
        if sig is not None and (sig.fields.get("num_hidden_layers"), sig.fields.get("num_key_value_heads"),
                                sig.fields.get("head_dim")) != shape:
            raise CodecError(f"sensitivity table: KV signature {sig} is for another KV shape than {shape}")
        parts = (self.sink_key, self.score_edges, self.score_profile)
        if any(x is None for x in parts) and not all(x is None for x in parts):
            raise CodecError("sensitivity table: sink_key, score_edges and score_profile go together")
        if self.sink_key is not None:
            if self.sink_key.shape != shape or not np.all(np.isfinite(self.sink_key)):
                raise CodecError(f"sensitivity table: sink_key must be finite {shape}")
            se, sp = self.score_edges, self.score_profile
            if se.ndim != 1 or sp.ndim != 1 or len(se) != len(sp) + 1 or np.any(np.diff(se) <= 0) or not np.all(
                    np.isfinite(sp)) or np.any(sp <= 0):
                raise CodecError("sensitivity table: score bins must rise and the score profile be positive")

        if (self.basis is None) != (self.synthesis is None):
            raise CodecError("sensitivity table: basis and synthesis go together")
        if self.basis is not None:
            full = (2, *shape, shape[-1])
            for name, arr in (("basis", self.basis), ("synthesis", self.synthesis)):
                if arr.shape != full or arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
                    raise CodecError(f"sensitivity table: {name} must be finite float32 {full}")

    # -- use --------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)`` of the model's KV."""
        return int(self.model["layers"]), int(self.model["kv_heads"]), int(self.model["head_dim"])

    def matches(self, fingerprint: ModelFingerprint) -> bool:
        """True if the table fits `fingerprint`'s model (see the module docstring).

        KV shape and RoPE parameters must agree (RoPE only when both sides record it); then the KV signatures
        (architecture and digest) when both sides have one, else the names.
        """
        if self.shape != (fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim):
            return False
        rope = self.model.get("rope")
        if fingerprint.rope is not None and rope is not None and fingerprint.rope != rope:
            return False
        theirs = getattr(fingerprint, "kv_signature", None)
        if theirs is not None and self.kv_signature is not None:
            return (theirs.model_type, theirs.digest) == (self.kv_signature.model_type, self.kv_signature.digest)
        return self.model.get("name") == fingerprint.name

    def describe(self) -> str:
        """One line for messages: name, KV shape, RoPE and signature."""
        layers, heads, dim = self.shape
        signature = str(self.kv_signature) if self.kv_signature is not None else "no KV signature"
        return (f"{self.model.get('name')!r} (layers={layers}, kv_heads={heads}, head_dim={dim}, "
                f"rope={self.model.get('rope')}, {signature})")

    @functools.cached_property
    def basis_digest(self) -> str | None:
        """SHA-256 (hex) of the basis and synthesis bytes: objects coded in the basis name it, and a decoder
        uses only a table with the same digest. None without a basis. Hashed once per table (6 MB for SmolLM2;
        every encode and decode of a basis level asks for it)."""
        if self.basis is None:
            return None
        return basis_digest(self.basis, self.synthesis)

    @property
    def basis_scale(self) -> float:
        """The geometric mean of the channel Fisher values: a basis level's components all get the step
        ``lambda / sqrt(basis_scale)`` (the basis is scaled to match, `fit_basis`)."""
        return float(np.exp(np.mean(np.log(np.maximum(self.channel_fisher().astype(np.float64), 1e-30)))))

    def channel_fisher(self) -> np.ndarray:
        """float32 ``[2, layers, kv_heads * head_dim]`` (keys first)."""
        layers = self.key.shape[0]
        return np.stack([self.key.reshape(layers, -1), self.value.reshape(layers, -1)])

    def distance_weight(self, distances: np.ndarray) -> np.ndarray:
        """Relative sensitivity of tokens at these distances from the context's end (1 = the mean)."""
        return binned(self.distance_edges, self.distance_profile, distances)

    def sink_scores(self, keys: np.ndarray) -> np.ndarray:
        """Sink score per token of keys ``[layers, kv_heads, tokens, head_dim]`` (0 without a sink key)."""
        return np.zeros(keys.shape[2]) if self.sink_key is None else sink_scores(keys, self.sink_key)

    def score_weight(self, scores: np.ndarray) -> np.ndarray:
        """Relative sensitivity of tokens with these sink scores (1 where the table has no score profile)."""
        return np.ones(len(scores)) if self.score_profile is None else binned(self.score_edges, self.score_profile,
                                                                              scores)

    # -- storage ----------------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write the table as safetensors with a JSON metadata string."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": TABLE_FORMAT, "model": json.dumps(self.model, sort_keys=True),
                "meta": json.dumps(self.meta, sort_keys=True)}
        if self.kv_signature is not None:
            meta["kv_signature"] = json.dumps(self.kv_signature.to_dict(), sort_keys=True)
        tensors = {"key": self.key, "value": self.value, "distance_edges": self.distance_edges,
                   "distance_profile": self.distance_profile}
        if self.sink_key is not None:
            tensors.update(sink_key=self.sink_key, score_edges=self.score_edges, score_profile=self.score_profile)
        if self.basis is not None:
            tensors.update(basis=self.basis, synthesis=self.synthesis)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path) -> SensitivityTable:
        """Read a table written by `save`; `CodecError` if it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise CodecError(f"sensitivity table {path} does not exist") from None
        except Exception as exc:
            raise CodecError(f"{path}: not a safetensors sensitivity table ({exc})") from None
        if meta.get("format") != TABLE_FORMAT:
            raise CodecError(f"{path}: format {meta.get('format')!r}, expected {TABLE_FORMAT!r}")
        try:
            model = json.loads(meta["model"])
            extra = json.loads(meta.get("meta", "{}"))
            signature = KVSignature.from_dict(json.loads(meta["kv_signature"])) if "kv_signature" in meta else None
            return cls(model=model, key=tensors["key"], value=tensors["value"],
                       distance_edges=tensors["distance_edges"], distance_profile=tensors["distance_profile"],
                       sink_key=tensors.get("sink_key"), score_edges=tensors.get("score_edges"),
                       score_profile=tensors.get("score_profile"), meta=extra, kv_signature=signature,
                       basis=tensors.get("basis"), synthesis=tensors.get("synthesis"))
        except CodecError as exc:
            raise CodecError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"{path}: incomplete sensitivity table ({exc})") from None

    @classmethod
    def uniform(cls, layers: int, kv_heads: int, head_dim: int, *, fisher: float = 1e-7,
                name: str = "") -> SensitivityTable:
        """A flat table (every channel and distance equally sensitive): for models nobody calibrated, and tests."""
        shape = (layers, kv_heads, head_dim)
        identity = identity_basis(layers, kv_heads, head_dim)
        return cls(model={"name": name, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
                   key=np.full(shape, fisher, np.float32), value=np.full(shape, fisher, np.float32),
                   distance_edges=np.array([0.0, 1e9], np.float32), distance_profile=np.ones(1, np.float32),
                   meta={"kind": "uniform"}, basis=identity, synthesis=identity)


def identity_basis(layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """The basis of a flat table: every head's identity (a basis level then codes every channel with one step).
    Its digest is known without a table, so such objects decode anywhere (`Codec.synthesis_for`)."""
    return np.broadcast_to(np.eye(head_dim, dtype=np.float32), (2, layers, kv_heads, head_dim, head_dim)).copy()


def basis_digest(basis: np.ndarray, synthesis: np.ndarray) -> str:
    """SHA-256 (hex) of a basis and its synthesis, as objects name them."""
    return hashlib.sha256(np.ascontiguousarray(basis, dtype=np.float32).tobytes()
                          + np.ascontiguousarray(synthesis, dtype=np.float32).tobytes()).hexdigest()


def find_synthesis(digest: str, shape: tuple[int, int, int], tables: Iterable[SensitivityTable]) -> np.ndarray:
    """float32 ``[2, layers, kv_heads, head_dim, head_dim]``: the synthesis transforms of the basis with this
    `digest`, from the first of `tables` that has it, or the identity's of a flat table of this KV `shape`
    (``(layers, kv_heads, head_dim)``); `CodecError` if none has it."""
    if not isinstance(digest, str) or len(digest) != 64:
        raise CodecError("a basis level's header lacks the basis digest: corrupt object")
    for table in tables:
        if table.basis_digest == digest and table.synthesis is not None:
            if table.shape != tuple(shape):
                raise CodecError("the table with the object's basis is for another KV shape: corrupt object")
            return table.synthesis
    identity = identity_basis(*shape)
    if basis_digest(identity, identity) == digest:
        return identity
    raise CodecError(f"the object was coded in the sensitivity basis {digest[:16]}..., and no table at hand has "
                     "it: decode with the table the encoder used (`sensitivity=`, or a codec whose tables folder "
                     "holds it: Codec(tables=TableRegistry([folder])))")


def fit_basis(fisher: np.ndarray, covariance: np.ndarray, shrink: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-head analysis and synthesis transforms from full Fisher matrices and data covariances (both
    ``[..., D, D]``): ``A = V^T L^(1/2) U^T`` where ``U L U^T`` is the Fisher shrunk towards its diagonal,
    ``(1 - shrink) S + shrink diag(S)``, and ``V`` the eigenvectors of the whitened data's covariance
    ``A0 C A0^T``, divided by ``sqrt(basis_scale)`` (the geometric mean of the Fisher diagonals, see
    `SensitivityTable.basis_scale`). A uniform step on ``y = A x`` then spends bits where the model's loss is
    sensitive, in the directions the data actually vary; ``shrink`` guards against directions a finite sample
    calls harmless.

    >>> import numpy as np
    >>> s = np.array([[2.0, 1.0], [1.0, 2.0]]); c = np.eye(2)
    >>> a, b = fit_basis(s, c, shrink=0.0)
    >>> bool(np.allclose(a.T @ a * 2.0, s, atol=1e-5)) and bool(np.allclose(a @ b, np.eye(2), atol=1e-5))
    True
    """
    if not 0.0 <= shrink <= 1.0:
        raise CodecError(f"basis shrink must be in [0, 1], got {shrink}")
    fisher = np.asarray(fisher, dtype=np.float64)
    covariance = np.asarray(covariance, dtype=np.float64)
    analysis = np.zeros_like(fisher)
    for idx in np.ndindex(*fisher.shape[:-2]):
        s = fisher[idx]
        diag = np.diag(np.diag(s))
        s = (1.0 - shrink) * s + shrink * diag
        ev, u = np.linalg.eigh((s + s.T) / 2)
        floor = max(float(np.max(np.diag(s))), 1e-30) * 1e-8
        a0 = (u * np.sqrt(np.maximum(ev, floor))).T
        cy = a0 @ covariance[idx] @ a0.T
        _, v = np.linalg.eigh((cy + cy.T) / 2)
        analysis[idx] = v.T @ a0
    # scaled by the typical channel's sqrt(Fisher), so that components have the magnitude of the KV and the
    # levels' steps (lambda / sqrt(basis_scale), shipped as fp16) stay in fp16's normal range
    diagonal = np.diagonal(fisher, axis1=-2, axis2=-1)
    analysis /= math.sqrt(float(np.exp(np.mean(np.log(np.maximum(diagonal, 1e-30))))))
    synthesis = np.linalg.inv(analysis)
    return analysis.astype(np.float32), synthesis.astype(np.float32)


def binned(edges: np.ndarray, profile: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``profile`` of the bin of each ``x`` (bins ``[edges[i], edges[i+1])``; outside values take the end bins)."""
    idx = np.clip(np.searchsorted(edges, np.asarray(x, dtype=np.float64), side="right") - 1, 0, len(profile) - 1)
    return profile.astype(np.float64)[idx]


def sink_scores(keys: np.ndarray, sink_key: np.ndarray) -> np.ndarray:
    """Mean cosine over layers and heads of each token's key ``[layers, kv_heads, tokens, head_dim]`` with the
    sink key direction ``[layers, kv_heads, head_dim]``."""
    k = np.asarray(keys, dtype=np.float32)
    norms = np.linalg.norm(k, axis=-1)
    dots = np.einsum("lhtd,lhd->lht", k, sink_key.astype(np.float32))
    return (dots / np.maximum(norms, 1e-12)).mean((0, 1)).astype(np.float64)


def score_profile(scores: np.ndarray, fisher: np.ndarray,
                  quantiles: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Bin tokens by sink score (bins at the given quantiles, finer at the top) and return the edges and
    each bin's mean Fisher relative to the mean of all tokens."""
    scores = np.asarray(scores, dtype=np.float64)
    fisher = np.asarray(fisher, dtype=np.float64)
    inner = np.unique(np.quantile(scores, quantiles))
    edges = np.concatenate([[-1.0], inner, [1.0 + 1e-6]])
    idx = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
    sums = np.bincount(idx, weights=fisher, minlength=len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    keep = counts > 0
    profile = sums[keep] / counts[keep] / fisher.mean()
    edges = np.concatenate([edges[:-1][keep], [edges[-1]]])
    return edges.astype(np.float32), profile.astype(np.float32)


def log_distance_edges(max_distance: int, bins: int = PROFILE_BINS) -> np.ndarray:
    """Bin edges 0, 1, 2, 4, ... growing geometrically up to past `max_distance`."""
    raw = np.unique(np.round(np.geomspace(1, max_distance + 1, bins)).astype(np.int64))
    return np.concatenate([[0], raw]).astype(np.float32)


def profile_from_positions(per_token: np.ndarray, sink_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin a per-position Fisher curve (context order) by distance from the end, relative to its mean."""
    body = np.asarray(per_token, dtype=np.float64)[sink_tokens:]
    d = np.arange(len(body) - 1, -1, -1)
    edges = log_distance_edges(len(body))
    idx = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, len(edges) - 2)
    sums = np.bincount(idx, weights=body, minlength=len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    keep = counts > 0
    profile = sums[keep] / counts[keep]
    edges = np.concatenate([edges[:-1][keep], [edges[-1]]])
    return edges.astype(np.float32), (profile / body.mean()).astype(np.float32)


class TableRegistry:
    """Sensitivity tables found in folders (the shipped ``codec/tables`` first), looked up by fingerprint."""

    def __init__(self, folders: Iterable[Path] = (TABLES_DIR,)) -> None:
        self.folders = [Path(f) for f in folders]
        self._found: list[tuple[Path, SensitivityTable]] | None = None

    def found(self) -> list[tuple[Path, SensitivityTable]]:
        """``(path, table)`` of every table in the folders, in search order."""
        if self._found is None:
            self._found = [(path, SensitivityTable.load(path)) for folder in self.folders
                           for path in (sorted(folder.glob("*.safetensors")) if folder.is_dir() else [])]
        return self._found

    def tables(self) -> list[SensitivityTable]:
        return [table for _, table in self.found()]

    def find(self, fingerprint: ModelFingerprint) -> SensitivityTable:
        """The first table that fits this model (`SensitivityTable.matches`); else a `CodecError` that lists the
        known tables and says how to make one."""
        for _, table in self.found():
            if table.matches(fingerprint):
                return table
        signature = getattr(fingerprint, "kv_signature", None)
        lines = [f"no sensitivity table for model {fingerprint.name!r} (layers={fingerprint.layers}, "
                 f"kv_heads={fingerprint.kv_heads}, head_dim={fingerprint.head_dim}, rope={fingerprint.rope}, "
                 + (f"KV signature {signature})" if signature is not None else
                    "no KV signature: matched by name, shape and RoPE)")]
        if self.found():
            lines.append("known tables:")
            for path, table in self.found():
                differs = ""
                if signature is not None and table.kv_signature is not None:
                    fields = signature.differences(table.kv_signature)
                    differs = f"; differs in {', '.join(fields)}" if fields else ""
                lines.append(f"  {table.describe()} in {path}{differs}")
        else:
            lines.append(f"known tables: none in {', '.join(str(f) for f in self.folders) or 'no folder'}")
        lines.append("grid levels need a table calibrated on this model: run `kvcast calibrate --model M` "
                     "(default SmolLM2-135M), or "
                     "`kvcast.codec.calibrate.calibrate(model, passages, ...).save(folder / name)` and "
                     "Codec(tables=TableRegistry([folder])); or pass sensitivity=SensitivityTable.uniform(...)")
        raise CodecError("\n".join(lines))
