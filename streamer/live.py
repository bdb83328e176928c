"""Live loading: the streaming engine with real resources, filling a model's KV cache from stored chunks.

The same `kvcast.streamer.engine.StreamingEngine` that simulates sessions runs here with

* a real link (`StoreLink` reads objects from a `kvcast.streamer.store.Store` in this process; the aiohttp link
  fetches them from ``kvcast serve``): every object's SHA-256 is checked against the manifest before decoding;
* `CodecDecoder`: the codec decodes each loaded chunk (coder processes on CPU) in a worker thread;
* `ModelCompute`: the model prefills a text chunk's tokens on the KV of every chunk before it, in a worker
  thread (Cake: recompute from the front while loading from the back).

Both put their chunk's KV into a `ContextAssembly`, which gives the whole context's KV in token order at the
end. `load_context` runs one session and returns the engine's result with the KV; `answer` continues the model
on it. Menus come from the manifest (the objects' real sizes) and a `HostProfile` (decode speed per level and
the prefill cost of the serving host, used as the estimates the policy observes).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kvcast import codec
from kvcast.codec.hf import KV, cache_from_kv, kv_from_cache, kv_tokens
from kvcast.netsim.link import ChunkRequest, Link, TransferOutcome, TransferTiming
from kvcast.policies.base import ChunkMenu, LevelOption, Policy
from kvcast.streamer.engine import SessionResult, StreamingEngine
from kvcast.streamer.host import HostProfile, wait_for_device
from kvcast.streamer.resources import Compute, Decoder, Done
from kvcast.streamer.store import Manifest, Store, StoreError

__all__ = ["CodecDecoder", "ContextAssembly", "HostProfile", "LiveError", "LiveResult", "ModelCompute", "StoreLink",
           "answer", "live_menus", "load_context", "prefill_chunk"]


class LiveError(RuntimeError):
    """A live session failed: a corrupt object, a decoded chunk of the wrong shape, a model error."""


# ----------------------------------------------------------------------------------------------- the context's KV


class ContextAssembly:
    """The KV of a context being loaded, one slot per chunk, filled in any order by the decoder and the compute
    unit (from their threads)."""

    def __init__(self, chunk_tokens: Sequence[int]) -> None:
        self.chunk_tokens = tuple(int(t) for t in chunk_tokens)
        self._kv: list[KV | None] = [None] * len(self.chunk_tokens)
        self._lock = threading.Lock()

    def put(self, chunk: int, kv: KV) -> None:
        """Place chunk `chunk`'s KV (``[1, kv_heads, tokens, head_dim]`` per layer and K/V)."""
        if kv_tokens(kv) != self.chunk_tokens[chunk]:
            raise LiveError(f"chunk {chunk}: got KV of {kv_tokens(kv)} tokens, expected {self.chunk_tokens[chunk]}")
        with self._lock:
            self._kv[chunk] = kv

    def prefix(self, chunk: int) -> KV | None:
        """The KV of chunks ``[0, chunk)`` concatenated (None for chunk 0); every one of them must be in place."""
        with self._lock:
            parts = self._kv[:chunk]
        if not parts:
            return None
        missing = [i for i, kv in enumerate(parts) if kv is None]
        if missing:
            raise LiveError(f"chunk {chunk} needs the KV of chunks {missing}, which are not in place yet")
        return _concat(parts)

    def complete(self) -> KV:
        """The whole context's KV in token order."""
        kv = self.prefix(len(self.chunk_tokens))
        assert kv is not None
        return kv


def prefill_chunk(model: Any, token_ids: Sequence[int] | torch.Tensor, prefix: KV | None) -> KV:
    """The KV of `token_ids` prefilled by `model` on the cache `prefix` (the KV of every token before them; None
    at the context's start): what a chunk recomputed from its text holds, lossy prefix included. Returns once the
    model's device has computed it (`wait_for_device`), so a recompute is timed to its real end."""
    param = next(model.parameters())
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(param.device)
    cache = None if prefix is None else cache_from_kv(prefix, model.config, dtype=param.dtype)
    start = 0 if prefix is None else kv_tokens(prefix)
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    kv = [(k[:, :, start:], v[:, :, start:]) for k, v in kv_from_cache(out.cache)]
    wait_for_device(param.device)
    return kv


def _concat(parts: Sequence[KV]) -> KV:
    if len(parts) == 1:
        return list(parts[0])
    layers = len(parts[0])
    return [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
            for i in range(layers)]


# ----------------------------------------------------------------------------------------------- real resources


def _call_back(loop: asyncio.AbstractEventLoop, on_done: Done, work: Callable[[], None]) -> None:
    """Run `work` (in a worker thread) and report its outcome on the event loop."""
    try:
        work()
    except BaseException as exc:  # reported to the engine, which ends the session with it
        loop.call_soon_threadsafe(on_done, exc)
    else:
        loop.call_soon_threadsafe(on_done, None)


class CodecDecoder(Decoder):
    """Decodes each loaded object with the codec in a worker thread into `assembly`, cast to `dtype`, on
    `device`: on the CPU the codec's coder processes do the entropy decoding; on a CUDA device the GPU decoder
    does (`kvcast.codec.gpu`: pinned host buffers, its own CUDA stream), so chunk i decodes while chunk i+1
    arrives. `sensitivity`: the table the objects' basis levels were encoded with, where the codec's own tables
    do not have it (`kvcast.codec.decode`)."""

    def __init__(self, assembly: ContextAssembly, *, dtype: torch.dtype = torch.float32,
                 expect_model: Any = None, device: str | torch.device = "cpu", sensitivity: Any = None) -> None:
        self.assembly = assembly
        self.sensitivity = sensitivity
        self.dtype = dtype
        self.expect_model = expect_model
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvcast-decode")

    def start(self, chunk: int, level: str, payload: bytes | None, on_done: Done) -> None:
        if payload is None:
            raise LiveError("a real decoder needs the chunk's bytes: use a real link (StoreLink, the HTTP link)")
        loop = asyncio.get_running_loop()

        def work() -> None:
            if self._stream is None:
                kv = codec.decode(payload, dtype=self.dtype, expect_model=self.expect_model,
                                  sensitivity=self.sensitivity)
            else:
                with torch.cuda.stream(self._stream):
                    kv = codec.decode(payload, device=self.device, dtype=self.dtype,
                                      expect_model=self.expect_model, sensitivity=self.sensitivity)
                self._stream.synchronize()
            self.assembly.put(chunk, kv)

        self._pool.submit(_call_back, loop, on_done, work)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ModelCompute(Compute):
    """Prefills a chunk's tokens on the model, given the assembled KV of the chunks before it."""

    def __init__(self, assembly: ContextAssembly, model: Any, token_ids: Sequence[int],
                 chunk_starts: Sequence[int]) -> None:
        self.assembly = assembly
        self.model = model
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.chunk_starts = tuple(chunk_starts)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvcast-compute")

    def start(self, chunk: int, on_done: Done) -> None:
        loop = asyncio.get_running_loop()
        self._pool.submit(_call_back, loop, on_done, lambda: self._prefill(chunk))

    def _prefill(self, chunk: int) -> None:
        start = self.chunk_starts[chunk]
        stop = start + self.assembly.chunk_tokens[chunk]
        self.assembly.put(chunk, prefill_chunk(self.model, self.token_ids[start:stop], self.assembly.prefix(chunk)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StoreLink(Link):
    """A real link to a store in this process: reads each requested object in a worker thread (timed on the
    loop's clock) and checks its SHA-256 against the manifest."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvcast-store-link")

    def start_transfer(self, nbytes: int) -> asyncio.Future[TransferTiming]:
        raise TypeError("StoreLink fetches named objects: the engine calls send_request")

    def send_request(self, request: ChunkRequest, on_done: Callable[[TransferOutcome], None]) -> None:
        loop = asyncio.get_running_loop()
        entry = self.manifest.object(request.chunk, request.level)
        start = loop.time()

        def fetch() -> bytes:
            data = self.store.get_object(entry.key)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise LiveError(f"chunk {request.chunk} at {request.level}: object {entry.key[:12]}... does not "
                                "match the manifest's checksum")
            return data

        def done(future: asyncio.Future[bytes]) -> None:
            exc = future.exception()
            if exc is not None:
                on_done(exc)
                return
            data = future.result()
            on_done(TransferTiming(len(data), len(data) * 8.0, start, start, loop.time(), payload=data))

        loop.run_in_executor(self._pool, fetch).add_done_callback(done)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------- menus


def live_menus(manifest: Manifest, host: HostProfile, *, levels: Sequence[str] | None = None
               ) -> tuple[ChunkMenu, ...]:
    """One menu per stored chunk: its objects' real sizes at `levels` (default: every stored level), decode
    and recompute times from `host`."""
    model = manifest.model
    values_per_token = 2 * int(model["layers"]) * int(model["kv_heads"]) * int(model["head_dim"])
    chosen = tuple(levels) if levels is not None else manifest.levels
    menus = []
    for chunk in manifest.chunks:
        values = chunk.tokens * values_per_token
        options = tuple(LevelOption(level=lv, nbytes=chunk.objects[lv].nbytes, decode_s=host.decode_s(lv, values),
                                    quality_loss=host.quality_loss.get(lv, 0.0))
                        for lv in chosen if lv in chunk.objects)
        if not options:
            raise StoreError(f"chunk {chunk.index} has none of the levels {list(chosen)}")
        menus.append(ChunkMenu(index=chunk.index, start_token=chunk.start_token, tokens=chunk.tokens,
                               levels=options, recompute_s=host.recompute.prefill_s(chunk.start_token, chunk.tokens)))
    return tuple(menus)


# ----------------------------------------------------------------------------------------------- sessions


@dataclass
class LiveResult:
    """A loaded context: the engine's session result and the context's KV in token order."""

    session: SessionResult
    kv: KV
    wall_s: float


async def load_context(manifest: Manifest, link: Link, model: Any, token_ids: Sequence[int], *, policy: Policy,
                       slo_s: float, host: HostProfile, levels: Sequence[str] | None = None,
                       prior_throughput_bps: float | None = None, kv_dtype: torch.dtype = torch.float32,
                       sensitivity: Any = None) -> LiveResult:
    """Load `manifest`'s context over `link` under `policy` with the model's real decode and prefill; the
    returned KV is what the model continues on (`answer`). `sensitivity`: the model's table, for basis-level
    objects encoded with a table the codec does not ship (`CodecDecoder`)."""
    if len(token_ids) != manifest.tokens:
        raise LiveError(f"{len(token_ids)} token ids given, the context has {manifest.tokens}")
    codec.default_codec().pool.warm_up()  # a serving host keeps its coder processes running: not timed
    assembly = ContextAssembly([c.tokens for c in manifest.chunks])
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    decoder = CodecDecoder(assembly, dtype=kv_dtype, device=device, sensitivity=sensitivity)
    compute = ModelCompute(assembly, model, token_ids, [c.start_token for c in manifest.chunks])
    try:
        engine = StreamingEngine(policy, live_menus(manifest, host, levels=levels), link, slo_s=slo_s,
                                 prior_throughput_bps=prior_throughput_bps, decoder=decoder, compute=compute)
        t0 = time.perf_counter()
        session = await engine.run()
        return LiveResult(session=session, kv=assembly.complete(), wall_s=time.perf_counter() - t0)
    finally:
        decoder.close()
        compute.close()


def answer(model: Any, kv: KV, prompt_ids: Sequence[int], *, max_new_tokens: int = 16
           ) -> tuple[list[int], Any, float]:
    """Greedy continuation of `prompt_ids` after the context `kv`: the new token ids, the first step's logits
    (``[vocab]``) and the seconds to the first token (the prompt's prefill on the loaded cache)."""
    param = next(model.parameters())
    cache = cache_from_kv(kv, model.config, dtype=param.dtype)
    ids = torch.as_tensor([list(prompt_ids)], dtype=torch.long, device=param.device)
    out_ids: list[int] = []
    first_logits = None
    t0 = time.perf_counter()
    first_step_s = 0.0
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
            if first_logits is None:
                first_logits = logits.clone()
                wait_for_device(param.device)  # the first token exists once the device has computed it
                first_step_s = time.perf_counter() - t0
            nxt = int(logits.argmax())
            out_ids.append(nxt)
            cache = out.cache
            ids = torch.tensor([[nxt]], dtype=torch.long, device=param.device)
    return out_ids, first_logits, first_step_s
