"""``kvcast demo``'s report: ``report.md``, ``report.html`` (self-contained: opens offline) and ``report.json``
from the run's results (`kvcast.streamer.demo.run_demo`), with its PNG plots:

* ``rate_distortion.png``: bits per value against KL per token and top-1 agreement, every level and baseline
  (`kvcast.codec.evaluate.plot_rate_distortion`);
* ``ttft_cdf.png``: TTFT per policy over the traces (`kvcast.streamer.report.plot_ttft_cdf`);
* ``slo_vs_quality.png``: SLO-violation rate against quality loss per policy (`kvcast.streamer.report.plot_pareto`);
* ``timeline.png``: the live run's chunks on the link, the decoder and the compute unit
  (`kvcast.streamer.report.plot_timeline`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcast.benchmark import finite
from kvcast.streamer.demo_config import NEAR_LOSSLESS
from kvcast.streamer.demo_headline import plan_text
from kvcast.streamer.document import Document

__all__ = ["PLOTS", "REPORT_FORMAT", "build_document", "write_plots", "write_report"]

REPORT_FORMAT = "kvcast-demo-report/1"
PLOTS = {"rate_distortion": "rate_distortion.png", "ttft_cdf": "ttft_cdf.png", "slo_vs_quality": "slo_vs_quality.png",
         "timeline": "timeline.png"}


# ----------------------------------------------------------------------------------------------- formatting


def _x(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.2%}" if signed else f"{value:.1%}"


def _kl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"


def _s(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _met(value: bool | None) -> str:
    return "not checked" if value is None else ("**met**" if value else "**MISSED**")


def _ci(value: float, ci: Sequence[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


# ----------------------------------------------------------------------------------------------- plots


def write_plots(results: dict[str, Any], sessions: Sequence[dict[str, Any]], out: Path,
                timeline_source: Path | None) -> dict[str, Path]:
    """The PNGs of `PLOTS` in `out` (the timeline copied from the live run's folder)."""
    import shutil

    from kvcast.codec.evaluate import plot_rate_distortion
    from kvcast.streamer.report import plot_pareto, plot_ttft_cdf

    paths = {name: out / file for name, file in PLOTS.items()}
    config = results["config"]
    rows = [{"name": r["level"], "kind": "level", "bits_per_value": r["bits_per_value"],
             "kl_per_token": r["kl_per_token"], "top1_agreement": r["top1_agreement"]} for r in results["levels"]
            if r["kl_per_token"] is not None]
    rows += [{"name": b["name"], "kind": "baseline", "bits_per_value": b["bits_per_value"],
              "kl_per_token": b["kl_per_token"], "top1_agreement": b["top1_agreement"]} for b in results["baselines"]]
    texts = sum(1 for c in results["contexts"] if c["kind"] == "text")
    plot_rate_distortion({"rows": rows, "model": results["model"],
                          "settings": {"context_tokens": config["chunk_tokens"], "passages": texts,
                                       "continuation_tokens": config["next_tokens"]}}, paths["rate_distortion"])
    plot_ttft_cdf(sessions, paths["ttft_cdf"], slo_s=config["slo_s"])
    plot_pareto(results["simulation"]["summary"], paths["slo_vs_quality"])
    if timeline_source is not None:
        shutil.copyfile(timeline_source, paths["timeline"])
    else:
        del paths["timeline"]
    return paths


# ----------------------------------------------------------------------------------------------- the document


def _headline_table(doc: Document, rows: Sequence[dict[str, Any]], *, scaled: bool) -> None:
    headers = ["method", "family", "KV size vs int8", "TTFT (s)", "vs text", "vs int8", "ΔPPL", "top-1",
               "KL/token", "QA accuracy", "same answer as exact"]
    if scaled:
        headers += ["predicted KL/token", "plan (chunks)"]
    table = []
    for r in rows:
        q = r["quality"]
        size = "— (no KV loaded)" if r["bytes"] == 0 else _x(r["size_vs_int8_x"])
        cells = [f"`{r['spec']}`" if r["spec"] == r["label"] else f"{r['label']} (`{r['spec']}`)", r["family"], size,
                 _s(r["ttft_s"]), _x(r["ttft_vs_text_x"]), _x(r["ttft_vs_int8_x"]), _pct(q["ppl_change"], True),
                 _pct(q["top1_agreement"]), _kl(q["kl_per_token"]), _pct(q["qa_accuracy"]), _pct(q["qa_same_as_exact"])]
        if scaled:
            cells += [_kl(r["sim_quality_loss"]), plan_text(r["actions"][0])]
        table.append(cells)
    doc.table(headers, table, align="ll" + "r" * (len(headers) - 2 - (1 if scaled else 0)) + ("l" if scaled else ""))


def build_document(results: dict[str, Any], plots: dict[str, Path], out: Path) -> Document:
    """The report as a `Document` (Markdown and HTML are written from it)."""
    config, data, machine = results["config"], results["data"], results["machine"]
    model = results["model"]
    doc = Document("kvcast demo report", base=out)
    quick = " (`--quick`)" if config.get("quick") else ""
    gpu = f"CUDA: {machine['cuda']}" if machine["cuda"] else "no GPU"
    doc.paragraph(f"`kvcast demo`{quick}, run {results['started']} in **{results['wall_s']:.0f} s** on "
                  f"{machine['cpus']} CPUs ({machine['platform']}; load average {machine['load_average_start']} at the "
                  f"start, {machine['load_average_end']} at the end: the machine is shared with other jobs, so times "
                  f"vary from run to run), torch {machine['torch']} ({gpu}). "
                  f"Model: {model['name']} ({model['layers']} layers x {model['kv_heads']} KV heads x "
                  f"{model['head_dim']}), {config['threads'] or 'default'} torch thread(s).")
    doc.heading("Data used")
    doc.bullets([f"Passages: {data['text_source']}.", f"Questions: {data['qa_source']}.",
                 f"Traces: {data['trace_source']}.",
                 "With `../shared/datasets` and `../shared/traces` beside the repository the demo uses WikiText-2, "
                 "LongChat and real traces; `--datasets DIR` and `--traces DIR` point elsewhere."])

    doc.heading("Targets")
    doc.paragraph("Measured on this run; a target this run does not meet says **MISSED**.")
    doc.table(["target", "result", "verdict"], [[t["target"], t["result"], _met(t["met"])] for t in results["targets"]],
              align="lll")

    head = results["headline"]
    doc.heading("Headline: CacheGen's comparison, measured on this host")
    m = head["measured"]
    doc.paragraph(
        f"Every context of the run ({len(results['contexts'])}), stored in {config['chunk_tokens']}-token chunks "
        f"at every level, loaded over a constant {m['gbps']:g} Gbps link ({config['live_rtt_ms']:g} ms RTT) with "
        f"this host's measured decode and prefill costs (`kvcast calibrate host`'s measurement: {model['name']} on "
        f"this CPU), SLO {m['slo_s']:g} s; one simulated session per method and context. KV size: bytes loaded "
        "against fetching every chunk at int8; TTFT: mean over the contexts, against text recompute and int8 fetch "
        "on the same link. Quality is measured on the real model with each session's actions applied to the stored "
        "objects (text chunks recomputed over the chunks before them): ΔPPL, top-1 agreement and KL per token of the "
        "continuation against the exact cache (passages), line-retrieval accuracy and agreement with the exact "
        "cache's answer (questions). `mpc` and `hybrid` meet the SLO first and then keep the most quality, so where "
        "the SLO is looser than loading needs they recompute up to it (their TTFT approaches the SLO, at no loss); "
        f"`{NEAR_LOSSLESS}` takes the least TTFT within int8's quality loss.")
    _headline_table(doc, m["rows"], scaled=False)
    for gpu, table in head["scaled"].items():
        doc.heading(f"Headline, scaled: a Mistral-7B-sized deployment on the {gpu.upper()} cost model", 3)
        doc.paragraph(
            f"**Scaled**, not measured end to end: a {table['context_tokens']:,}-token {table['model']} context in "
            f"{table['chunk_tokens']:,}-token chunks; sizes from this run's measured bits per value, GPU decode speeds "
            f"from `streamer/gpu_bench_h100.json`, recompute cost `{table['recompute_cost']}`"
            f"{' (PROVISIONAL: not measured)' if table['provisional_cost'] else ' (measured)'}; constant "
            f"{table['gbps']:g} Gbps link, SLO {table['slo_s']:g} s, the simulator's RTT, efficiency and request "
            "overhead. Quality: each session's plan mapped by relative position onto this run's contexts and measured "
            "on the real model as above; the predicted KL is the simulator's (the profile's loss by position).")
        _headline_table(doc, table["rows"], scaled=True)

    doc.heading("Codec: size and quality of every level")
    exact = results["exact"]
    scaled_chunk = results["scaled_chunk_tokens"]
    doc.paragraph(
        f"Every chunk of every context encoded at every level and stored (`kvcast store put`), then read back and "
        f"decoded. Bits per value count every byte of the {config['chunk_tokens']}-token objects; in "
        f"{scaled_chunk:,}-token objects (the scaled deployment's chunks, and the sizes its simulation uses) the "
        "payload is the same and each object's header and side information, which is per channel, not per token, is "
        f"spread over {scaled_chunk:,} tokens. Quality of the whole context at that level against the exact cache "
        f"(exact PPL {_s(exact.get('ppl'), 2)}; the exact cache answers {_pct(exact.get('qa_accuracy'))} of the "
        "questions). Decode speed: this CPU, the codec's coder processes. Baselines keep the first 4 and the most "
        "recent tokens at fp16 (token eviction) or no context.")
    rows = []
    for r in results["levels"]:
        rows.append([r["level"], f"{r['bytes']:,}", f"{r['bits_per_value']:.2f}", _x(r["x_smaller_than_int8"]),
                     f"{r['bits_per_value_scaled']:.2f}", _x(r["x_smaller_than_int8_scaled"]),
                     _x(r["x_smaller_than_fp16"]), _pct(r["ppl_change"], True), _pct(r["top1_agreement"]),
                     _kl(r["kl_per_token"]), _pct(r["qa_accuracy"]), _pct(r["qa_same_as_exact"]),
                     _s(r["decode_msym_per_s"], 1)])
    for b in results["baselines"]:
        rows.append([f"*{b['name']}* (baseline)", "—", f"{b['bits_per_value']:.2f}", "—", "—", "—", "—",
                     _pct(b["ppl_change"], True), _pct(b["top1_agreement"]), _kl(b["kl_per_token"]), "—", "—", "—"])
    doc.table(["level", "bytes", "bits/value", "vs int8", f"bits/value in {scaled_chunk:,}-token objects",
               "vs int8", "vs fp16", "ΔPPL", "top-1", "KL/token", "QA accuracy", "same answer as exact",
               "CPU decode Msym/s"], rows)
    if "rate_distortion" in plots:
        doc.image(plots["rate_distortion"], "Rate vs distortion: every level and baseline on this run's passages")
    doc.heading("By position in the context", 3)
    doc.paragraph(
        "Measured bits per value of the first, middle and last chunk (the `kvcast-*` levels spend bits by distance "
        "from the context's end), and the quality loss the profile's `position_quality` (measured by `kvcast eval "
        "position`, docs/quality-by-position.md) gives a chunk at that place in these contexts (KL per token, whole-"
        "context equivalent); levels without a curve keep one loss.")
    doc.table(["level", "bits/value first", "middle", "last", "profile loss first", "middle", "last"],
              [[r["level"], _s(r["bits_per_value_by_position"][0], 2), _s(r["bits_per_value_by_position"][1], 2),
                _s(r["bits_per_value_by_position"][2], 2), _kl(r["profile_loss_by_position"][0]),
                _kl(r["profile_loss_by_position"][1]), _kl(r["profile_loss_by_position"][2])]
               for r in results["levels"]])

    sim = results["simulation"]
    doc.heading("Streaming over the traces: every policy")
    cfg = sim["config"]
    doc.paragraph(
        f"`kvcast simulate` with this run's measured sizes (the shipped profile's quality): {sim['traces']} traces x "
        f"{cfg['contexts']} contexts x {len(sim['summary'])} policies = {sim['sessions']:,} sessions in virtual time "
        f"({sim['wall_s']:.1f} s); {cfg['model']} shape, {cfg['gpu'].upper()} recompute cost, "
        f"{cfg['context_tokens'][0]:,}-{cfg['context_tokens'][1]:,}-token contexts in {cfg['chunk_tokens']:,}-token "
        f"chunks, traces scaled to means of {cfg['mean_gbps'][0]:g}-{cfg['mean_gbps'][1]:g} Gbps, SLO "
        f"{cfg['slo_s']:g} s. Values with 95% bootstrap CIs ({sim['summary'][0]['bootstrap']} resampled). "
        f"`{NEAR_LOSSLESS}` is `{results['near_lossless_spec']}`: hybrid with the TTFT objective and int8's quality "
        "loss as its budget.")
    doc.table(["policy", "sessions", "SLO violations", "TTFT mean (s)", "TTFT p95 (s)", "quality loss", "GB loaded",
               "text share"],
              [[s["policy"], str(s["sessions"]), _ci(s["slo_violation_rate"], s["slo_violation_rate_ci95"], ".3f"),
                _ci(s["ttft_mean_s"], s["ttft_mean_s_ci95"], ".3f"), _s(s["ttft_p95_s"]),
                _ci(s["quality_loss_mean"], s["quality_loss_mean_ci95"], ".4f"), f"{s['bytes_mean'] / 1e9:.3f}",
                f"{s['text_chunk_share']:.2f}"] for s in sim["summary"]])
    if sim["paired"]:
        doc.paragraph("Paired on the same sessions (kvcast controller minus baseline; negative is better for both):")
        doc.table(["policy", "vs", "SLO violations difference", "quality loss difference", "better / worse sessions"],
                  [[p["policy"], p["reference"],
                    _ci(p["violations"]["mean"], p["violations"]["ci95"], "+.3f"),
                    _ci(p["quality_loss"]["mean"], p["quality_loss"]["ci95"], "+.4f"),
                    f"{p['violations']['better']} / {p['violations']['worse']}"] for p in sim["paired"]])
    if "ttft_cdf" in plots:
        doc.image(plots["ttft_cdf"], "TTFT per policy over the traces (CDF)")
    if "slo_vs_quality" in plots:
        doc.image(plots["slo_vs_quality"], "SLO violations vs quality loss per policy (95% CIs)")

    live = results.get("live")
    doc.heading("Live: one context over loopback through kvcast serve")
    if live is None:
        doc.paragraph("Not run.")
    else:
        answer = live["answer"].strip().replace("\n", " ")
        verdict = ("" if not live["expected_answer"] else
                   f" (expected {live['expected_answer']}: {'correct' if live['correct'] else 'wrong'}; the exact "
                   f"cache's answer: {live['exact_cache_answer']!r}, "
                   f"{'the same' if live['same_as_exact'] else 'a different'} number)")
        doc.bullets([
            f"Context `{live['context_id']}` stored in the run's store, served by `kvcast serve`'s app on 127.0.0.1 "
            f"with a bearer token, paced in real time by trace `{live['trace']}` scaled to a "
            f"{live['trace_mean_mbps']:.0f} Mbps mean, {config['live_rtt_ms']:g} ms RTT per request.",
            f"Fetched by `kvcast fetch`'s client under `{live['policy']}` (SLO {live['slo_s']:g} s) with real decode "
            f"({live['device'].upper()}) and real recompute: **TTFT {live['ttft_s']:.3f} s** "
            f"({'met' if live['slo_met'] else 'missed'} the SLO), {live['bytes'] / 1e6:.2f} MB, "
            f"{live['text_chunks']} of {len(live['chunks'])} chunks recomputed; first answer token at "
            f"{live['first_token_s']:.3f} s; busy seconds: link {live['fetch_s']:.3f}, decode {live['decode_s']:.3f}, "
            f"recompute {live['recompute_s']:.3f}.",
            f"The same session simulated with the same menus and trace: TTFT {live['simulated_ttft_s']:.3f} s "
            f"({live['ttft_s'] / live['simulated_ttft_s'] - 1:+.1%} live vs simulated); actions "
            f"{'the same' if live['simulated_actions'] == live['live_actions'] else 'different'} "
            f"(live: {plan_text(live['live_actions'])}; simulated: {plan_text(live['simulated_actions'])}).",
            f"Answer from the fetched cache: `{answer}`{verdict}."])
        doc.table(["chunk", "action", "bytes", "start (s)", "ready (s)"],
                  [[str(c["index"]), c["action"], f"{c['bytes']:,}", _s(c["start_s"]), _s(c["end_s"])]
                   for c in live["chunks"]], align="llrrr")
        if "timeline" in plots:
            doc.image(plots["timeline"], "The live run's chunks on the link, the decoder and the compute unit")

    doc.heading("Notes")
    doc.bullets(results["notes"])
    doc.heading("Steps and their times")
    doc.table(["step", "seconds"], [[s["step"], f"{s['wall_s']:.1f}"] for s in results["steps"]])
    return doc


def write_report(results: dict[str, Any], plots: dict[str, Path], out: Path) -> dict[str, Path]:
    """``report.md``, ``report.html`` and ``report.json`` in `out`."""
    doc = build_document(results, plots, out)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    paths["markdown"].write_text(doc.markdown(), encoding="utf-8")
    paths["html"].write_text(doc.html(), encoding="utf-8")
    paths["json"].write_text(json.dumps(finite({"format": REPORT_FORMAT, **results}), indent=2) + "\n",
                             encoding="utf-8")
    return paths
