"""Test data and test doubles shared by several test files: ``from tests.factories import ...``.

Plain functions and classes only; pytest fixtures live in the conftest.py files.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from kvcast.policies.base import TEXT, ChunkMenu, Decision, LevelOption, Observation, Policy

MB = 1_000_000

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
"""The read-only ``../shared`` folder (datasets, traces) beside the checkout; tests that need it skip without it."""

# ----------------------------------------------------------------------------------------------- codec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_kv(layers, heads, tokens, dim, dtype, seed, zero_tokens=(), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    kv = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            t = torch.randn(1, heads, tokens, dim, generator=g) * scale
            t = t * (1 + 4 * torch.rand(1, heads, 1, dim, generator=g))  # per-channel outliers, like keys
            for z in zero_tokens:
                if z < tokens:
                    t[:, :, z] = 0
            pair.append(t.to(dtype))
        kv.append(tuple(pair))
    return kv


def tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, seed=0, intermediate_size=64,
               max_position_embeddings=256):
    """A random float32 Llama with a 97-token vocabulary (no weights needed). Seeds torch's global RNG with
    `seed` right before building it, so equal arguments give equal weights. The defaults are the model of
    tests/codec/test_hf.py and test_grid.py; test_eval.py uses intermediate_size=96,
    max_position_embeddings=512."""
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=heads * head_dim,
                                      intermediate_size=intermediate_size, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                      max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------- menus

def make_menus(rng: random.Random, n: int, levels: int, decode: bool = True,
               monotone: bool = True) -> tuple[ChunkMenu, ...]:
    """Random menus: sizes fall and losses rise from level to level (unless `monotone` is False: then sizes
    and losses are drawn independently per level, so the menu's order means nothing and some levels may be
    dominated, as in the measured profile); recompute grows with position."""
    base = rng.uniform(0.5e6, 4e6)
    ratios = [rng.uniform(0.15, 1.0) for _ in range(levels)]
    losses = [rng.choice([0.0, rng.uniform(0, 0.1)]) for _ in range(levels)]
    if monotone:
        ratios.sort(reverse=True)
        losses.sort()
    decodes = [rng.uniform(0, 0.02) if decode else 0.0 for _ in range(levels)]
    r0, slope = rng.uniform(0.01, 0.2), rng.uniform(0, 0.03)
    menus = []
    for i in range(n):
        tokens = 100 if i < n - 1 else rng.choice([100, rng.randint(10, 100)])
        opts = tuple(LevelOption(f"l{a}", max(1, int(base * ratios[a] * tokens / 100)),
                                 decodes[a] * tokens / 100, losses[a]) for a in range(levels))
        menus.append(ChunkMenu(i, 100 * i, tokens, opts, (r0 + slope * i) * tokens / 100))
    return tuple(menus)


def big_small_menus(n: int, nbytes: int = MB, decode_s: float = 0.5, recompute_s: float = 0.3, tokens: int = 100,
                    loss: float = 0.01) -> tuple[ChunkMenu, ...]:
    """`n` equal chunks with two levels: "big" (2 x `nbytes`, lossless) and "small" (`nbytes`, `loss`)."""
    return tuple(ChunkMenu(i, i * tokens, tokens,
                           (LevelOption("big", 2 * nbytes, decode_s, 0.0),
                            LevelOption("small", nbytes, decode_s, loss)), recompute_s) for i in range(n))


# Hypothesis settings of the planning and dry-run property tests (tests/policies).
PLANNING_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------- policies

class PlanPlayer(Policy):
    """Plays a plan: its loads in order whenever the link is idle, its text chunks whenever compute is."""

    name = "scripted"

    def __init__(self, plan):
        self.loads = [(c, a) for c, a in plan if a != TEXT]
        self.texts = [(c, a) for c, a in plan if a == TEXT]

    def decide(self, obs: Observation) -> Decision | None:
        if obs.link_idle and self.loads:
            return Decision(*self.loads.pop(0))
        if obs.compute_idle and self.texts:
            return Decision(*self.texts.pop(0))
        return None


class QueuedPlan(Policy):
    """Answers its plan's (chunk, action) pairs as Decisions in order, one per call, whenever asked (all at
    the first decision point), then None; so text chunks pile up in the compute queue in plan order (not
    index order). Keeps the observations it was given."""

    name = "queued"

    def __init__(self, plan):
        self.plan = list(plan)
        self.observations: list[Observation] = []

    def decide(self, obs: Observation) -> Decision | None:
        self.observations.append(obs)
        return Decision(*self.plan.pop(0)) if self.plan else None


class ScriptedAnswers(Policy):
    """Answers `answers` in order whenever asked (whatever they are, valid Decisions or not), then None."""

    name = "scripted"

    def __init__(self, answers):
        self.answers = list(answers)

    def decide(self, obs):
        return self.answers.pop(0) if self.answers else None


class Idle(Policy):
    """Never decides anything."""

    def decide(self, obs):
        return None


# ----------------------------------------------------------------------------------------------- stores


def make_memory_store():
    """A fresh in-memory `Store` (objects and manifests in dicts), for tests that need no backend."""
    from kvcast.streamer.store import Manifest, NotFound, Store, StoreError

    class _MemoryStore(Store):
        url = "memory://"

        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}
            self.manifests: dict[str, str] = {}

        def put_object(self, key, data):
            self.objects.setdefault(key, bytes(data))

        def get_object(self, key, start=0, stop=None):
            if key not in self.objects:
                raise NotFound(f"no object {key}")
            return self.objects[key][start:stop]

        def object_size(self, key):
            if key not in self.objects:
                raise NotFound(f"no object {key}")
            return len(self.objects[key])

        def has_object(self, key):
            return key in self.objects

        def delete_object(self, key):
            self.objects.pop(key, None)

        def object_keys(self):
            return sorted(self.objects)

        def put_manifest(self, manifest: Manifest):
            missing = [k for k in manifest.keys() if k not in self.objects]
            if missing:
                raise StoreError(f"manifest names missing objects {missing[:3]}")
            self.manifests[manifest.context_id] = manifest.to_json()

        def get_manifest(self, context_id):
            if context_id not in self.manifests:
                raise NotFound(f"no context {context_id!r}")
            return Manifest.from_json(self.manifests[context_id])

        def delete_manifest(self, context_id):
            self.manifests.pop(context_id, None)

        def contexts(self):
            return sorted(self.manifests)

    return _MemoryStore()


# ----------------------------------------------------------------------------------------------- model folders

TINY_VOCAB = 256

_TINY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {}),
}


def save_tiny_model(folder: Path, seed: int = 0, architecture: str = "llama") -> Path:
    """A random 2-layer causal LM of `architecture` (llama, qwen2, mistral, gemma) with a byte-level tokenizer
    (one token per UTF-8 byte), saved like any hub model (``--model DIR``)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == TINY_VOCAB
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    name, extra = _TINY_CONFIGS[architecture]
    config = getattr(transformers, name)(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, max_position_embeddings=2048, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return folder
