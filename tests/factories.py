"""Test data and test doubles shared by several test files: ``from tests.factories import ...``.

Plain functions and classes only; pytest fixtures live in the conftest.py files.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from kvcast import codec
from kvcast.codec.hf import cache_from_kv, kv_from_cache
from kvcast.policies.base import TEXT, ChunkMenu, Decision, LevelOption, Observation, Policy
from kvcast.streamer.live import answer
from kvcast.streamer.store import (
    ChunkEntry,
    Manifest,
    NotFound,
    ObjectEntry,
    Store,
    StoreError,
    check_context_id,
    object_key,
)
from kvcast.streamer.store.base import check_key, check_range

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


class MemoryStore(Store):
    """The `Store` semantics in two dicts (thread-safe): the reference both backends must behave like, and the
    store of tests that need no backend. ``objects`` is open to tests that corrupt it behind the manifest's back."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.objects: dict[str, bytes] = {}
        self.manifest_json: dict[str, str] = {}
        self._lock = threading.Lock()

    def put_object(self, key, data):
        check_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError("object data must be bytes")
        with self._lock:
            self.objects.setdefault(key, bytes(data))

    def get_object(self, key, start=0, stop=None):
        check_key(key)
        check_range(start, stop)
        if key not in self.objects:
            raise NotFound(f"no object {key}")
        return self.objects[key][start:stop]

    def object_size(self, key):
        check_key(key)
        if key not in self.objects:
            raise NotFound(f"no object {key}")
        return len(self.objects[key])

    def has_object(self, key):
        return check_key(key) in self.objects

    def delete_object(self, key):
        with self._lock:
            self.objects.pop(check_key(key), None)

    def object_keys(self):
        return sorted(self.objects)

    def put_manifest(self, manifest):
        if not isinstance(manifest, Manifest):
            raise StoreError("expected a Manifest")
        check_context_id(manifest.context_id)
        missing = [k for k in manifest.keys() if check_key(k) not in self.objects]
        if missing:
            raise StoreError(f"the manifest names missing objects {missing[:3]}")
        with self._lock:
            self.manifest_json[manifest.context_id] = manifest.to_json()

    def get_manifest(self, context_id):
        check_context_id(context_id)
        if context_id not in self.manifest_json:
            raise NotFound(f"no context {context_id!r}")
        return Manifest.from_json(self.manifest_json[context_id])

    def delete_manifest(self, context_id):
        with self._lock:
            self.manifest_json.pop(check_context_id(context_id), None)

    def contexts(self):
        return sorted(self.manifest_json)


SERVE_TOKEN = "test-token-0123456789abcdef"
"""The bearer token of the servers the tests start."""


def put_synthetic_context(store: Store, context_id: str, objects: list[dict[str, bytes]],
                          chunk_tokens: int = 4) -> Manifest:
    """Store a context whose chunk i has the objects ``objects[i]`` (level -> bytes); returns its manifest."""
    tokens = list(range(len(objects) * chunk_tokens))
    model = {"name": "test-model", "layers": 2}
    chunks = []
    for i, by_level in enumerate(objects):
        entries = {}
        for level, data in by_level.items():
            key = object_key(model, tokens, i * chunk_tokens, (i + 1) * chunk_tokens, level,
                             params={"context": context_id})
            store.put_object(key, data)
            entries[level] = ObjectEntry(key, len(data), hashlib.sha256(data).hexdigest())
        chunks.append(ChunkEntry(i, i * chunk_tokens, chunk_tokens, entries))
    levels = tuple(dict.fromkeys(lv for c in objects for lv in c))
    manifest = Manifest(context_id=context_id, model=model, token_ids_sha256=hashlib.sha256(b"t").hexdigest(),
                        tokens=len(tokens), chunk_tokens=chunk_tokens, levels=levels, chunks=tuple(chunks))
    store.put_manifest(manifest)
    return manifest


def start_serve_process(args: list[str], *, prefix: tuple[str, ...] = (), timeout_s: float = 30.0,
                        **popen) -> tuple[subprocess.Popen, list[str], str]:
    """Start ``python -m kvcast.cli serve ARGS`` (after `prefix`, e.g. ``ip netns exec NS``) and wait until it
    says it listens. Returns the process, its stderr lines so far (its thread ``proc.reader`` keeps appending)
    and its URL;
    RuntimeError with what it printed if it does not come up. Stop it with SIGTERM (or SIGKILL)."""
    import re
    import sys

    popen.setdefault("env", {**os.environ, "KVCAST_TOKEN": ""})
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "kvcast.cli", "serve", *args],
                            stderr=subprocess.PIPE, text=True, **popen)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()

    proc.reader = threading.Thread(target=drain, daemon=True)  # joined by the caller after stopping it
    proc.reader.start()
    if not ready.wait(timeout_s) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("kvcast serve did not start:\n" + "".join(lines))
    url = re.search(r"listening on (http://\S+?:\d+)", "".join(lines))[1]
    return proc, lines, url


REDIS_BINARY = "redis-server"


class RedisServer:
    """A throw-away redis-server on a loopback port (no persistence), stoppable and restartable."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.proc: subprocess.Popen | None = None

    def url(self, prefix: str | None = None, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}" + (f"?prefix={prefix}" if prefix else "")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        for _ in range(200):  # up to ~10 s; PING answers once the server accepts commands
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------------------------- live sessions


def local_answer(lm, store, manifest, actions, prompt, max_new_tokens=8):
    """The answer (token ids, first logits) on the KV a local run builds from the same stored objects and
    actions: each chunk decoded from its level, or prefilled on the prefix for ``"text"``."""
    parts = []
    ids = manifest.meta["token_ids"]
    for chunk, action in zip(manifest.chunks, actions):
        if action == TEXT:
            prefix = [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
                      for i in range(len(parts[0]))] if parts else None
            cache = None if prefix is None else cache_from_kv(prefix, lm.model.config)
            s, e = chunk.start_token, chunk.start_token + chunk.tokens
            with torch.no_grad():
                out = lm.model(torch.tensor([ids[s:e]]), cache=cache, use_cache=True)
            parts.append([(k[:, :, s:e], v[:, :, s:e]) for k, v in kv_from_cache(out.cache)])
        else:
            parts.append(codec.decode(store.get_object(chunk.objects[action].key), dtype=torch.float32))
    kv = [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
          for i in range(len(parts[0]))]
    return answer(lm.model, kv, prompt, max_new_tokens=max_new_tokens)[:2]
