"""Fetch a stored context from ``kvcast serve`` under a policy and answer with the model (``kvcast fetch``).

`fetch_context` is the Python API: it reads the context's manifest from the server, streams the chunks over
`kvcast.netsim.http_link.HttpLink` with the live engine (`kvcast.streamer.live.load_context`: real decode,
real recompute from the front where the policy says so or where a transfer fails), then continues the model on
the loaded KV with the question, and returns a `FetchResult` (`to_json` is what ``kvcast fetch --json`` prints).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kvcast.netsim.http_link import ExpectedObject, HttpLink
from kvcast.netsim.pacing import TracePacer
from kvcast.policies.base import TEXT, Policy
from kvcast.streamer.engine import SessionResult
from kvcast.streamer.live import HostProfile, LiveError, answer, load_context
from kvcast.streamer.store import Manifest, StoreError, check_context_id, token_ids_digest

__all__ = ["FetchError", "FetchResult", "fetch_context", "fetch_manifest"]


class FetchError(RuntimeError):
    """The fetch could not run: the server refused (token, unknown context), the model does not match."""


@dataclass
class FetchResult:
    """One fetched context: the session, the answer and its timings (seconds from the session's start)."""

    context_id: str
    session: SessionResult
    answer: str
    answer_ids: list[int]
    first_token_s: float
    """When the model's first answer token was out (the session's TTFT plus the question's prefill)."""
    wall_s: float
    retries: list[dict[str, Any]]

    def chunk_rows(self) -> list[dict[str, Any]]:
        """One row per chunk: its level or ``"text"``, bytes and times."""
        rows = []
        for r in self.session.chunks:
            start = r.recompute_start_s if r.action == TEXT else r.transfer_start_s
            rows.append({"index": r.index, "action": r.action, "bytes": r.nbytes, "start_token": r.start_token,
                         "tokens": r.tokens, "start_s": start, "end_s": r.ready_s,
                         "transfer_start_s": r.transfer_start_s, "transfer_end_s": r.transfer_end_s,
                         "decode_start_s": r.decode_start_s, "decode_end_s": r.decode_end_s,
                         "recompute_start_s": r.recompute_start_s, "recompute_end_s": r.recompute_end_s,
                         "measured_bps": r.measured_bps, **({"fallback": r.fallback} if r.fallback else {})})
        return rows

    def to_json(self) -> dict[str, Any]:
        chunks = self.session.chunks

        def busy(start: str, end: str) -> float:
            return sum(getattr(r, end) - getattr(r, start) for r in chunks
                       if getattr(r, start) is not None and getattr(r, end) is not None)

        return {
            "context_id": self.context_id, "policy": self.session.policy, "slo_s": self.session.slo_s,
            "ttft_s": self.session.ttft_s, "slo_met": self.session.slo_met,
            "fetch_s": busy("transfer_start_s", "transfer_end_s"), "decode_s": busy("decode_start_s", "decode_end_s"),
            "recompute_s": busy("recompute_start_s", "recompute_end_s"), "first_token_s": self.first_token_s,
            "bytes": self.session.bytes_loaded, "text_chunks": self.session.text_chunks,
            "quality_loss": self.session.quality_loss, "wall_s": self.wall_s, "retries": self.retries,
            "chunks": self.chunk_rows(), "answer": self.answer,
        }


async def fetch_manifest(session: aiohttp.ClientSession, server: str, context_id: str,
                         token: str | None) -> Manifest:
    """The context's manifest from the server (`FetchError` with the server's message if refused)."""
    check_context_id(context_id)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{server.rstrip('/')}/v1/contexts/{context_id}/manifest"
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
            body = await r.read()
            if r.status != 200:
                try:
                    message = json.loads(body).get("message", "")
                except ValueError:
                    message = body[:200].decode(errors="replace")
                raise FetchError(f"{url}: HTTP {r.status}: {message}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
    try:
        return Manifest.from_json(body)
    except StoreError as exc:
        raise FetchError(f"{url}: {exc}") from None


async def fetch_context(server: str, context_id: str, *, model: Any, policy: Policy, slo_s: float,
                        host: HostProfile, token: str | None = None, question: str | Sequence[int] = "",
                        max_new_tokens: int = 16, pacer: TracePacer | None = None, reset_server_pacing: bool = False,
                        retries: int = 3, stall_timeout_s: float = 5.0,
                        prior_throughput_bps: float | None = None, sensitivity: Any = None) -> FetchResult:
    """Load `context_id` from `server` into `model`'s cache under `policy` and answer `question`.

    `model` is a `kvcast.codec.model.LoadedModel` (its tokenizer encodes the question when it is a string).
    `pacer` paces the client's reads to follow a trace (client-side replay); `reset_server_pacing` restarts a
    pacing server's trace clock first (``POST /v1/pacing/reset``), so the session meets the trace at t = 0.
    `sensitivity`: the model's sensitivity table, where the server stored basis levels made with a table this
    kvcast does not ship.
    """
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        manifest = await fetch_manifest(session, server, context_id, token)
        token_ids = manifest.meta.get("token_ids")
        if not isinstance(token_ids, list) or token_digest_mismatch(manifest, token_ids):
            raise FetchError(f"context {context_id!r}: the manifest holds no token ids matching its digest "
                             "(store it again with this version of kvcast store put)")
        fingerprint = model.fingerprint()
        stored = manifest.model
        if (int(stored["layers"]), int(stored["kv_heads"]), int(stored["head_dim"])) != (
                fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim):
            raise FetchError(f"context {context_id!r} was stored for a model of shape {stored['layers']}x"
                             f"{stored['kv_heads']}x{stored['head_dim']}; {model.name} is {fingerprint.layers}x"
                             f"{fingerprint.kv_heads}x{fingerprint.head_dim}")
        if reset_server_pacing:
            async with session.post(f"{server.rstrip('/')}/v1/pacing/reset", headers=headers) as r:
                if r.status != 200:
                    raise FetchError(f"pacing reset: HTTP {r.status}")
        if pacer is not None:
            pacer.reset()
        objects = {(c.index, lv): ExpectedObject(e.nbytes, e.sha256)
                   for c in manifest.chunks for lv, e in c.objects.items()}
        link = HttpLink(server, context_id, objects, token=token, session=session, retries=retries,
                        stall_timeout_s=stall_timeout_s, pacer=pacer)
        loop = asyncio.get_running_loop()
        link.set_deadline(loop.time() + 2 * slo_s)  # after twice the SLO, give up on transfers and recompute
        try:
            live = await load_context(manifest, link, model.model, token_ids, policy=policy, slo_s=slo_s,
                                      host=host, prior_throughput_bps=prior_throughput_bps, sensitivity=sensitivity)
        except LiveError as exc:
            raise FetchError(str(exc)) from None
    prompt = (model.tokenizer(question, add_special_tokens=False)["input_ids"] if isinstance(question, str)
              else list(question))
    if not prompt:  # no question: continue the context itself
        prompt = token_ids[-1:]
    ids, _, first_step_s = answer(model.model, live.kv, prompt, max_new_tokens=max_new_tokens)
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    return FetchResult(context_id=context_id, session=live.session, answer=text, answer_ids=ids,
                       first_token_s=live.session.ttft_s + first_step_s, wall_s=time.perf_counter() - started,
                       retries=list(link.attempts))


def token_digest_mismatch(manifest: Manifest, token_ids: Sequence[int]) -> bool:
    return len(token_ids) != manifest.tokens or token_ids_digest(token_ids) != manifest.token_ids_sha256


def write_outputs(result: FetchResult, out: Path) -> dict[str, Path]:
    """``fetch.json``, ``chunks.jsonl`` and ``timeline.png`` in `out`."""
    from kvcast.streamer.report import plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fetch.json", "chunks": out / "chunks.jsonl", "timeline": out / "timeline.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    paths["chunks"].write_text("".join(json.dumps(r) + "\n" for r in result.chunk_rows()), encoding="utf-8")
    plot_timeline(result.chunk_rows(), paths["timeline"],
                  title=f"{result.context_id}: {result.session.policy}, TTFT {result.session.ttft_s:.2f} s "
                        f"(SLO {result.session.slo_s:g} s)")
    return paths
