"""``learned``: a small neural network trained in the Gymnasium environment (`kvcast.streamer.gym`).

Spec ``learned`` (kvcast's shipped weights, `DEFAULT_WEIGHTS`) or ``learned:PATH`` (a safetensors file written
by ``kvcast train-policy``). At every decision it encodes the observation with
`kvcast.policies.features.FeatureEncoder` (the environment's observation: one row of features per action), scores
each row with the same MLP, and takes the valid action of highest score (`kvcast.policies.features.ActionSpace`:
load the last pending chunk at a level, recompute the first from text, or wait). Every decision is legal: the
mask comes from the chunk's menu, and waiting is only chosen while something is in flight. Because one network
scores every action row, it runs on any menu (any number and names of levels).

Inference is NumPy (no torch at run time). The file holds the MLP (``w1 b1 w2 b2 w3 b3``, tanh hidden layers),
the input normalisation (``mean``, ``std``) and metadata: ``format`` (`FORMAT`), ``features`` (the feature names
it was trained on, checked on load) and what the trainer recorded (traces, reward, seed).

>>> policy = LearnedPolicy()
>>> policy.name, policy.weights.hidden
('learned', 32)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kvcast.policies.base import Decision, Observation, Policy, Session
from kvcast.policies.features import FEATURES, ActionSpace, FeatureEncoder

__all__ = ["DEFAULT_WEIGHTS", "FORMAT", "LearnedPolicy", "LearnedWeights", "load_weights", "save_weights"]

FORMAT = "kvcast-learned-policy/1"
DEFAULT_WEIGHTS = "learned_default.safetensors"
"""The shipped weights, a file of this package (``kvcast.policies``)."""
_TENSORS = ("mean", "std", "w1", "b1", "w2", "b2", "w3", "b3")


class WeightsError(ValueError):
    """A weights file that is not a `FORMAT` file for these features."""


@dataclass(frozen=True)
class LearnedWeights:
    """The network: ``score(x) = w3 . tanh(w2 . tanh(w1 . (x - mean) / std + b1) + b2) + b3`` per action row."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    metadata: dict[str, str]

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[1])

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """One score per row of `rows` (``(actions, FEATURES)``)."""
        x = (rows - self.mean) / self.std
        h = np.tanh(x @ self.w1 + self.b1)
        h = np.tanh(h @ self.w2 + self.b2)
        return h @ self.w3 + self.b3


def save_weights(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a `FORMAT` file: the tensors of `LearnedWeights` (float32) and string metadata."""
    from safetensors.numpy import save_file

    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise WeightsError(f"weights lack {missing}")
    meta = {**{str(k): str(v) for k, v in metadata.items()}, "format": FORMAT, "features": ",".join(FEATURES)}
    save_file({k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in _TENSORS}, str(path), metadata=meta)


def load_weights(path: str | os.PathLike[str] | None = None) -> LearnedWeights:
    """Read a `FORMAT` file (default: the shipped `DEFAULT_WEIGHTS`); WeightsError if it does not fit."""
    if path is None:
        path = resources.files("kvcast.policies").joinpath(DEFAULT_WEIGHTS)
    path = Path(str(path))
    try:
        stat = path.stat()
    except OSError as exc:
        raise WeightsError(f"learned policy weights {str(path)!r}: {exc.strerror or exc}") from None
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> LearnedWeights:
    """The weights of one file version (cached: `kvcast simulate` creates a policy per session)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors for a bad file
        raise WeightsError(f"learned policy weights {path!r}: not a safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"learned policy weights {path!r}: format {metadata.get('format')!r}, "
                           f"expected {FORMAT!r}")
    if metadata.get("features") != ",".join(FEATURES):
        raise WeightsError(f"learned policy weights {path!r} were trained on other features "
                           f"({metadata.get('features')!r}); retrain with `kvcast train-policy`")
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise WeightsError(f"learned policy weights {path!r} lack {missing}")
    d, h = len(FEATURES), tensors["w1"].shape[1]
    shapes = {"mean": (d,), "std": (d,), "w1": (d, h), "b1": (h,), "w2": (h, h), "b2": (h,), "w3": (h,),
              "b3": (1,)}
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise WeightsError(f"learned policy weights {path!r}: {name} has shape {tensors[name].shape}, "
                               f"expected {shape}")
    for array in tensors.values():
        array.setflags(write=False)
    return LearnedWeights(**{k: tensors[k] for k in _TENSORS}, metadata=metadata)


class LearnedPolicy(Policy):
    """The trained network's choice among the valid actions; see the module docstring."""

    name = "learned"

    def __init__(self, path: str | None = None) -> None:
        self.weights = load_weights(path or None)

    def reset(self, session: Session) -> None:
        super().reset(session)
        self.space = ActionSpace.of_session(session)
        self.encoder = FeatureEncoder(self.space)

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.pending:
            return None
        mask = self.encoder.mask(obs)
        scores = self.weights.scores(self.encoder.encode(obs, mask))
        action = int(np.where(mask, scores, -np.inf).argmax())
        return self.space.decision(obs, action, mask)
