"""``kvcast demo``'s live run: one stored context streamed over loopback through ``kvcast serve`` (its aiohttp
app, in this process, on a free port, with a bearer token and a real-time trace pacer), fetched by
``kvcast fetch``'s `fetch_context` under a policy with real decode and recompute, and a question answered from
the fetched cache. The same session is also simulated on the same menus and trace, for comparison.

The server runs on its own thread and event loop (`LoopbackServer`), so the client's event loop, its decoder and
its compute threads do not delay the server's pacing. With a CUDA device the model runs on it, so the live
decoder decodes on the GPU (`kvcast.streamer.live.CodecDecoder`).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcast.netsim.pacing import TracePacer
from kvcast.policies.registry import PolicyRegistry
from kvcast.streamer.demo_data import parse_answer
from kvcast.streamer.demo_measure import MeasuredContext
from kvcast.streamer.fetch import FetchResult, fetch_context, write_outputs
from kvcast.streamer.host import HostProfile
from kvcast.streamer.live import live_menus
from kvcast.streamer.serve import make_app, serve
from kvcast.streamer.serve_cli import PACING_SLACK_S
from kvcast.streamer.serve_config import ServeLimits
from kvcast.streamer.simulate import simulate_session
from kvcast.streamer.store import Store
from kvcast.traces.trace import Trace

__all__ = ["LiveRun", "LoopbackServer", "run_live"]


class LoopbackServer:
    """``kvcast serve``'s app for `store` on 127.0.0.1 (a free port), on a thread of its own; a context manager
    whose value is the server's URL."""

    def __init__(self, store: Store, *, token: str, pacer: TracePacer | None = None) -> None:
        self.app = make_app(store, token=token, pacer=pacer, limits=ServeLimits(rate_per_s=0.0))
        self._ready = threading.Event()
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvcast-demo-serve", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(host: str, port: int) -> None:
                self._port = port
                self._ready.set()

            await serve(self.app, "127.0.0.1", 0, on_ready=ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the caller by __enter__
            self._error = exc
            self._ready.set()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"kvcast serve did not start: {self._error!r}")
        return f"http://127.0.0.1:{self._port}"

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class LiveRun:
    """The live session, its simulated twin, and the answer against the expected one and the exact cache's."""

    context_id: str
    policy: str
    trace_name: str
    trace_mean_bps: float
    slo_s: float
    device: str
    fetch: FetchResult
    simulated_ttft_s: float
    simulated_actions: list[str]
    expected_answer: str
    exact_answer: str | None
    outputs: dict[str, Path]

    def to_json(self) -> dict[str, Any]:
        doc = self.fetch.to_json()
        got = parse_answer(self.fetch.answer)
        return {"context_id": self.context_id, "policy": self.policy, "trace": self.trace_name,
                "trace_mean_mbps": self.trace_mean_bps / 1e6, "slo_s": self.slo_s, "device": self.device,
                "ttft_s": doc["ttft_s"], "slo_met": doc["slo_met"], "first_token_s": doc["first_token_s"],
                "fetch_s": doc["fetch_s"], "decode_s": doc["decode_s"], "recompute_s": doc["recompute_s"],
                "bytes": doc["bytes"], "text_chunks": doc["text_chunks"], "chunks": doc["chunks"],
                "retries": doc["retries"], "answer": doc["answer"], "answer_number": got,
                "expected_answer": self.expected_answer,
                "correct": bool(self.expected_answer) and got == self.expected_answer,
                "exact_cache_answer": self.exact_answer,
                "same_as_exact": None if self.exact_answer is None else got == parse_answer(self.exact_answer),
                "simulated_ttft_s": self.simulated_ttft_s, "simulated_actions": self.simulated_actions,
                "live_actions": [c["action"] for c in doc["chunks"]],
                "outputs": {k: str(v) for k, v in self.outputs.items()}}


def run_live(measured: MeasuredContext, store: Store, lm: Any, host: HostProfile, trace: Trace, *, policy: str,
             slo_s: float, rtt_ms: float, answer_tokens: int, registry: PolicyRegistry, out: Path) -> LiveRun:
    """Serve `store` paced by `trace`, fetch `measured`'s context under `policy` and answer its question (or
    continue the context, for a passage); writes ``fetch.json``, ``chunks.jsonl`` and ``timeline.png`` to `out`."""
    import torch

    context = measured.context
    token = secrets.token_urlsafe(24)
    pacer = TracePacer(trace, rtt_s=rtt_ms / 1e3, slack_s=PACING_SLACK_S)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = lm.model
    if device == "cuda":
        model.to(device)
    try:
        with LoopbackServer(store, token=token, pacer=pacer) as url:
            result = asyncio.run(fetch_context(
                url, context.context_id, model=lm, policy=registry.create(policy), slo_s=slo_s, host=host,
                token=token, question=list(context.question_ids) or "", max_new_tokens=answer_tokens,
                reset_server_pacing=True, prior_throughput_bps=trace.mean_bps))
    finally:
        if device == "cuda":
            model.to("cpu")
    simulated = simulate_session(registry.create(policy), live_menus(measured.manifest, host), trace, slo_s=slo_s,
                                 rtt_s=rtt_ms / 1e3, prior_throughput_bps=trace.mean_bps)
    outputs = write_outputs(result, out)
    return LiveRun(context_id=context.context_id, policy=policy, trace_name=trace.name, trace_mean_bps=trace.mean_bps,
                   slo_s=slo_s, device=device, fetch=result, simulated_ttft_s=simulated.ttft_s,
                   simulated_actions=[c.action for c in simulated.chunks], expected_answer=context.expected_answer,
                   exact_answer=measured.exact.answer, outputs=outputs)
