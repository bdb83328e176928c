"""`kvcast fetch` and `kvcast calibrate host`; `kvcast.cli` wires them in.

Conventions: `kvcast.clitools` (bad input exits 2, a failed run 1, both with one ``error: ...`` line).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvcast.clitools import BAD_INPUT, FAILED, fail

DEFAULT_POLICY = "hybrid"
DEFAULT_SLO_S = 2.0


def host_profile_path(model_name: str) -> Path:
    """Where `kvcast calibrate host` caches a model's host profile (``~/.cache/kvcast/host-profiles``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[:100] or "model"
    base = Path(os.environ.get("KVCAST_CACHE_DIR", Path.home() / ".cache" / "kvcast"))
    return base / "host-profiles" / f"{safe}.json"


def _token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"cannot read --token-file {token_file}: {exc.strerror}")
    return token or os.environ.get("KVCAST_TOKEN")


def fetch(
    server: Annotated[str, typer.Option(help="The kvcast serve URL, e.g. http://127.0.0.1:8470.")],
    context_id: Annotated[str, typer.Option(help="The stored context's id.")],
    token: Annotated[str | None, typer.Option(help="Bearer token (default: $KVCAST_TOKEN).", show_default=False)]
    = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the bearer token from this file.")] = None,
    policy: Annotated[str, typer.Option(help="Policy spec (kvcast simulate's names).")] = DEFAULT_POLICY,
    slo: Annotated[float, typer.Option(help="TTFT target in seconds.")] = DEFAULT_SLO_S,
    question: Annotated[str, typer.Option(help="Text the model answers after the context.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Answer tokens (greedy).")] = 16,
    model: Annotated[str | None, typer.Option(help="Transformers model folder or hub id on this machine "
                                                   "(default: SmolLM2-135M-Instruct).")] = None,
    host_profile: Annotated[Path | None, typer.Option(
        help="kvcast-host-profile/1 file (default: the one kvcast calibrate host cached for the model).")] = None,
    trace: Annotated[Path | None, typer.Option(help="Pace the client's reads to follow this trace file.")] = None,
    rtt_ms: Annotated[float, typer.Option(help="With --trace: round-trip time added per request (ms).")] = 0.0,
    reset_pacing: Annotated[bool, typer.Option(
        help="Restart the server's pacing trace first (a server started with --trace).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (else a summary).")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write fetch.json, chunks.jsonl, timeline.png here.")]
    = None,
    threads: Annotated[int, typer.Option(help="Torch threads (0: torch's default).")] = 0,
    tables: Annotated[Path | None, typer.Option(
        help="Folder of sensitivity tables (kvcast calibrate --out-dir): the model's table, for kvcast-basis-* "
             "objects stored with a table kvcast does not ship.")] = None,
) -> None:
    """Stream a stored context from kvcast serve under a policy, answer with the model, report the timings."""
    import asyncio
    import json

    from kvcast.codec.model import ModelUnavailable, load_model
    from kvcast.netsim.pacing import TracePacer
    from kvcast.policies.registry import UnknownPolicyError, default_registry
    from kvcast.streamer.fetch import FetchError, fetch_context, write_outputs
    from kvcast.streamer.host import HostProfileError, load_host_profile
    from kvcast.streamer.store import StoreError, check_context_id
    from kvcast.traces.readers import load_trace
    from kvcast.traces.trace import TraceError

    if not server.startswith(("http://", "https://")):
        fail(f"--server must be an http(s):// URL, got {server!r}")
    if not (slo > 0):
        fail(f"--slo must be > 0, got {slo}")
    try:
        check_context_id(context_id)
        chosen = default_registry().create(policy)
    except (StoreError, UnknownPolicyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    pacer = None
    if trace is not None:
        try:
            pacer = TracePacer(load_trace(trace), rtt_s=rtt_ms / 1e3)
        except (TraceError, ValueError, OSError) as exc:
            fail(f"--trace {trace}: {exc}")
    secret = _token(token, token_file)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        loaded = load_model(model, progress=not as_json)
    except ModelUnavailable as exc:
        fail(str(exc), FAILED)
    table = None
    if tables is not None:
        from kvcast import codec

        try:
            table = codec.TableRegistry([tables]).find(loaded.fingerprint())
        except codec.CodecError as exc:
            fail(f"--tables {tables}: {exc}")
    profile_path = host_profile or host_profile_path(loaded.name)
    try:
        host = load_host_profile(profile_path)
    except HostProfileError as exc:
        if host_profile is not None:
            fail(str(exc))
        fail(f"no host profile for {loaded.name} ({exc}); run: kvcast calibrate host"
             + (f" --model {model}" if model else ""), BAD_INPUT)
    try:
        result = asyncio.run(fetch_context(server, context_id, model=loaded, policy=chosen, slo_s=slo, host=host,
                                           token=secret, question=question, max_new_tokens=max_new_tokens,
                                           pacer=pacer, reset_server_pacing=reset_pacing, sensitivity=table))
    except FetchError as exc:
        fail(str(exc), FAILED)
    doc = result.to_json()
    if out is not None:
        write_outputs(result, out)
    if as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    typer.echo(f"{context_id}: {doc['policy']} TTFT {doc['ttft_s']:.3f} s (SLO {slo:g} s, "
               f"{'met' if doc['slo_met'] else 'missed'}); {len(doc['chunks'])} chunks, {doc['text_chunks']} "
               f"recomputed, {doc['bytes'] / 1e6:.2f} MB; first token at {doc['first_token_s']:.3f} s")
    typer.echo(f"answer: {doc['answer']}")


def calibrate_host(
    model: Annotated[str | None, typer.Option(help="Transformers model folder or hub id on this machine "
                                                   "(default: SmolLM2-135M-Instruct).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the profile here (default: the cache kvcast fetch "
                                                 "reads).")] = None,
    levels: Annotated[str | None, typer.Option(help="Levels to time (default: every level).")] = None,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per timed chunk.")] = 256,
    positions: Annotated[str, typer.Option(help="Prefix lengths of the prefill timings, comma-separated.")]
    = "0,512,1024,1536",
    repeats: Annotated[int, typer.Option(help="Timed repeats per measurement (median).")] = 3,
    threads: Annotated[int, typer.Option(help="Torch threads (0: torch's default).")] = 0,
) -> None:
    """Measure this host's decode speed per level and prefill cost by position (about a minute), cached for
    kvcast fetch and read by kvcast simulate --host-profile."""
    import json

    from kvcast.clitools import comma_list
    from kvcast.codec.model import ModelUnavailable, load_model
    from kvcast.streamer.host import measure_host_profile, save_host_profile

    try:
        pos = tuple(int(p) for p in comma_list(positions))
    except ValueError:
        fail(f"--positions must be comma-separated integers, got {positions!r}")
    if not pos or min(pos) < 0 or chunk_tokens < 2 or repeats < 1:
        fail("--positions must be >= 0, --chunk-tokens >= 2 and --repeats >= 1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        loaded = load_model(model)
    except ModelUnavailable as exc:
        fail(str(exc), FAILED)
    chosen = comma_list(levels) or None
    from kvcast import codec

    unknown = [lv for lv in chosen or () if lv not in codec.levels()]
    if unknown:
        fail(f"unknown level(s) {', '.join(unknown)}; known: {', '.join(codec.levels())}")
    _, record = measure_host_profile(loaded.model, fingerprint=loaded.fingerprint(), levels=chosen,
                                     chunk_tokens=chunk_tokens, positions=pos, repeats=repeats,
                                     progress=lambda msg: typer.echo(msg, err=True))
    path = save_host_profile(record, out or host_profile_path(loaded.name))
    typer.echo(json.dumps({"host_profile": str(path), "decode_values_per_s": record["decode_values_per_s"],
                           "recompute": {k: v for k, v in record["recompute"].items() if k != "points"},
                           "skipped_levels": record["skipped_levels"]}))
