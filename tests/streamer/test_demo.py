"""`kvcast demo`: its settings, data selection, measurements, headline mapping, targets, report documents, and the
whole command end to end (``kvcast demo --quick`` in a subprocess on SmolLM2-135M, as CI runs it)."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvcast.codec.evaluate import EvalError
from kvcast.policies.base import TEXT
from kvcast.streamer.demo_config import DEMO_POLICIES, HEADLINE_ROWS, NEAR_LOSSLESS, DemoConfig
from kvcast.streamer.demo_data import DemoContext, _longchat_cases, parse_answer, select_traces
from kvcast.streamer.demo_headline import HeadlineRow, map_actions, resolve_spec
from kvcast.streamer.demo_simulation import TraceSimulation
from kvcast.streamer.demo_targets import size_target, slo_target, ttft_target
from kvcast.streamer.document import Document
from kvcast.streamer.profile import Profile, default_profile
from kvcast.traces.trace import Trace
from tests.factories import REPO_ROOT, SHARED_DIR, PlanPlayer, save_tiny_model

# ----------------------------------------------------------------------------------------------- settings


def test_config_defaults_and_quick_preset():
    full, quick = DemoConfig(), DemoConfig.quick(out=Path("x"))
    assert quick.out == Path("x") and quick.context_tokens < full.context_tokens
    assert quick.text_contexts + quick.qa_contexts < full.text_contexts + full.qa_contexts
    assert DemoConfig.quick(text_contexts=2).text_contexts == 2  # the preset's fields can be overridden
    assert json.loads(json.dumps(full.to_json_dict()))["policies"] == list(DEMO_POLICIES)
    registered = {"fixed", "raw", "text", "cachegen", "cachegen-code", "mpc", "hybrid", "oracle", "learned", "cake",
                  "cake-cachegen", "rate", "slack"}
    from kvcast.policies.registry import BUILTIN_POLICIES

    assert set(BUILTIN_POLICIES) == registered  # a new built-in policy must join DEMO_POLICIES
    assert {p.split(":")[0] for p in DEMO_POLICIES if p != NEAR_LOSSLESS} == registered


@pytest.mark.parametrize("change", [dict(text_contexts=0), dict(qa_contexts=-1), dict(chunk_tokens=0),
                                    dict(headline_gbps=float("nan")), dict(host_positions=1),
                                    dict(baselines=("recent-x",)), dict(live_rtt_ms=-1.0), dict(policies=())])
def test_config_rejects_bad_values(change):
    with pytest.raises(ValueError):
        DemoConfig(**change)


def test_cli_defaults_are_the_config_defaults():
    import click
    import typer

    from kvcast.cli import app

    command = typer.main.get_command(app).get_command(click.Context(typer.main.get_command(app)), "demo")
    params = {p.name: p.default for p in command.params}
    c = DemoConfig()
    assert params["out"] == c.out and params["model"] == c.model and params["threads"] == c.threads
    assert params["headline_gbps"] == c.headline_gbps and params["slo"] == c.slo_s and params["seed"] == c.seed
    assert params["quick"] is False and params["datasets"] is None and params["traces"] is None
    assert params["live_policy"] == c.live_policy


def test_cli_rejects_bad_input_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from kvcast.cli import app

    for args, message in ((["--datasets", str(tmp_path / "none")], "is not a folder"),
                          (["--traces", str(tmp_path / "none")], "does not exist"),
                          (["--headline-gbps", "0"], "headline_gbps"),
                          (["--levels", "nope"], "unknown level"),
                          (["--live-policy", "nope"], "nope")):
        result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out" / "report.md").exists()


# ----------------------------------------------------------------------------------------------- data


def test_select_traces_takes_each_source_in_turn():
    traces = [Trace([0.0, 1.0], [1e9], name=f"{d}{i}", source=f"{d}/{i}") for d in "abc" for i in range(3 if d != "b"
                                                                                                          else 1)]
    picked = select_traces(traces, 5)
    assert [t.source for t in picked] == ["a/0", "b/0", "c/0", "a/1", "c/1"]
    assert len(select_traces(traces, 100)) == len(traces)  # never more than there are, never twice
    assert len({id(t) for t in select_traces(traces, 100)}) == len(traces)


def _longchat_file(path: Path, cases: int, lines: int = 12) -> list[tuple[str, int]]:
    asked = []
    with open(path, "w", encoding="utf-8") as handle:
        for c in range(cases):
            names = [f"name{c}-{i}" for i in range(lines)]
            index = (5 * c + 3) % lines
            record = "\n".join(f"line {n}: REGISTER_CONTENT is <{1000 + i}>" for i, n in enumerate(names))
            prompt = ("Below is a record of lines. Now the record start:\n\n" + record + "\n\nNow the record is over. "
                      f"Tell me what is the <REGISTER_CONTENT> in line {names[index]}? I need the number. ")
            handle.write(json.dumps({"random_idx": [names[index], index], "expected_number": 1000 + index,
                                     "num_lines": lines, "prompt": prompt}) + "\n")
            asked.append((names[index], 1000 + index))
    return asked


def test_longchat_records_are_cut_around_the_asked_line(tmp_path):
    path = tmp_path / "lines.jsonl"
    asked = _longchat_file(path, 3)
    cases = _longchat_cases(path, DemoConfig(qa_contexts=3, qa_lines=4))
    for (record, question, name, expected), (want_name, want_number) in zip(cases, asked):
        lines = [x for x in record.split("\n") if x.startswith("line ")]
        assert len(lines) == 4 and f"line {name}: REGISTER_CONTENT is <{expected}>" in lines
        assert (name, int(expected)) == (want_name, want_number)
        assert record.endswith("Now the record is over.") and question.startswith("Tell me")
    with pytest.raises(EvalError, match="has 3 cases"):
        _longchat_cases(path, DemoConfig(qa_contexts=4))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(EvalError, match=r"lines.jsonl:4: not a LongChat"):
        _longchat_cases(path, DemoConfig(qa_contexts=5))


def test_without_shared_data_the_demo_uses_kvcasts_generated_corpus_and_traces(monkeypatch, tmp_path):
    from kvcast.codec import evaluate
    from kvcast.streamer import demo_data

    def nowhere(explicit=None):
        raise EvalError("datasets folder not found")

    monkeypatch.setattr(evaluate, "find_datasets_dir", nowhere)
    monkeypatch.setattr(demo_data, "find_datasets_dir", nowhere)
    monkeypatch.setattr(demo_data, "find_shared_traces", lambda: None)
    tokenizer = _ByteTokenizer()
    data = demo_data.load_demo_data(DemoConfig(text_contexts=2, context_tokens=300, next_tokens=20, qa_contexts=2,
                                               qa_lines=10, max_traces=3), tokenizer)
    texts = [c for c in data.contexts if c.kind == "text"]
    questions = [c for c in data.contexts if c.kind == "qa"]
    assert [len(c.token_ids) for c in texts] == [300, 300] and all(len(c.continuation_ids) == 21 for c in texts)
    assert texts[0].token_ids != texts[1].token_ids
    for q in questions:
        record = bytes(q.token_ids).decode()
        assert f"REGISTER_CONTENT is <{q.expected_answer}>" in record and record.count("\nline ") == 10
        assert bytes(q.question_ids).decode().endswith("REGISTER_CONTENT is <")
    assert "generated" in data.text_source and "generated" in data.qa_source and "synthetic" in data.trace_source
    assert not data.shared_datasets and not data.real_traces and len(data.traces) == 3


class _ByteTokenizer:
    """One token per UTF-8 byte (what the demo's data step needs of a tokenizer)."""

    backend_tokenizer = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_parse_answer():
    assert parse_answer("2416>") == "2416" and parse_answer("  7 and 8") == "7" and parse_answer("<12>") == ""


# ----------------------------------------------------------------------------------------------- headline


@given(st.lists(st.sampled_from([TEXT, "int8", "kvcast-2"]), min_size=1, max_size=12),
       st.integers(1, 9), st.integers(1, 600))
def test_mapped_plans_keep_the_plan_order(scaled, chunks, chunk_tokens):
    starts = [i * chunk_tokens for i in range(chunks)]
    mapped = map_actions(scaled, 1536 * len(scaled), 1536, starts, [chunk_tokens] * chunks)
    assert len(mapped) == chunks and set(mapped) <= set(scaled)
    positions = []  # the scaled chunk each chunk takes its action from: at the same relative position
    for i, action in enumerate(mapped):
        at = (starts[i] + chunk_tokens / 2) / (chunks * chunk_tokens) * (1536 * len(scaled))
        positions.append(int(at // 1536))
        assert scaled[positions[-1]] == action
    assert positions == sorted(positions)
    if len(set(scaled)) == 1:
        assert set(mapped) == set(scaled)


def test_near_lossless_spec_uses_the_int8_loss():
    profile = default_profile()
    spec = resolve_spec(NEAR_LOSSLESS, profile)
    assert spec.startswith("hybrid:objective=ttft+quality_budget=")
    assert float(spec.rsplit("=", 1)[1]) == pytest.approx(profile.level("int8").quality_loss, rel=1e-5)
    assert resolve_spec("cachegen", profile) == "cachegen"
    assert resolve_spec(NEAR_LOSSLESS, profile.restricted(["raw", "kvcast-2"])) is None
    from kvcast.policies.registry import default_registry

    default_registry().create(spec)  # a valid spec
    assert {r[0] for r in HEADLINE_ROWS} >= {"text", "fixed:int8", "cachegen", "cake", "cake-cachegen", "mpc",
                                             "hybrid"}


def test_profile_with_measured_sizes_saves_and_loads(tmp_path):
    from kvcast.streamer.demo_measure import profile_with_measured_sizes

    shipped = default_profile()
    profile = profile_with_measured_sizes(shipped, {"raw": 16.1, "int8": 8.2, "kvcast-2": 1.7}, "measured here")
    assert profile.level_names == ("raw", "int8", "kvcast-2") and profile.level("kvcast-2").bits_per_value == 1.7
    assert profile.level("kvcast-2").quality_loss == shipped.level("kvcast-2").quality_loss
    assert profile.quality_loss_at("kvcast-2", 500) == shipped.quality_loss_at("kvcast-2", 500)
    profile.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")  # the simulation's workers read it back
    assert again.level_names == profile.level_names and "measured here" in again.note


# ----------------------------------------------------------------------------------------------- targets


def _level(name, bits, ppl, scaled=None):
    return {"level": name, "bits_per_value": bits, "bits_per_value_scaled": scaled or bits, "ppl_change": ppl}


def test_size_target_takes_the_smallest_kvcast_level_within_one_percent():
    rows = [_level("int8", 8.1, 0.0), _level("kvcast-3", 2.6, 0.004, 2.4), _level("kvcast-2", 1.7, 0.05, 1.5),
            _level("cachegen-3", 5.3, 0.002, 3.7)]
    t = size_target(rows, 256, 1536)
    assert t["met"] is False and t["details"]["level"] == "kvcast-3"
    assert t["details"]["x_smaller_than_int8"] == pytest.approx(8.1 / 2.4)
    assert t["details"]["x_smaller_than_int8_run_chunks"] == pytest.approx(8.1 / 2.6)
    assert "cachegen-3" in t["result"] and "MISSED" not in t["result"]
    rows[2]["ppl_change"] = 0.009  # now kvcast-2 (5.4x) is within 1%
    t = size_target(rows, 256, 1536)
    assert t["met"] is True and t["details"]["level"] == "kvcast-2"
    assert size_target([r for r in rows if r["level"] != "int8"], 256, 1536)["met"] is None
    generated = size_target(rows, 256, 1536, real_text=False)  # kvcast's generated corpus: said, not hidden
    assert generated["real_text"] is False and "not established for real text" in generated["result"]
    assert "generated corpus" not in t["result"]


def _row(spec, ttft, label=None):
    return HeadlineRow(spec, label or spec, "f", ttft, 1.0, 0.0, 0.0, {}, [[TEXT]])


def test_ttft_target_is_met_only_against_both_references_on_every_gpu():
    def table(best):
        rows = [_row("text", 1.0), _row("fixed:int8", 3.0), _row("mpc", 0.5), _row("hybrid", best)]
        for r in rows:
            r.ttft_vs_text_x, r.ttft_vs_int8_x = 1.0 / r.ttft_s, 3.0 / r.ttft_s
        return rows

    t = ttft_target({"h100": table(0.3), "a100": table(0.25)}, 3.0)
    assert t["met"] is True and t["details"]["h100"]["policy"] == "hybrid"
    t = ttft_target({"h100": table(0.3), "a100": table(0.5)}, 3.0)  # a100's best, mpc: 2x vs text
    assert t["met"] is False and t["details"]["h100"]["met"] and not t["details"]["a100"]["met"]
    assert "a100" in t["result"] and "missed" in t["result"]


def _paired(policy, reference, violations, ci_high, quality):
    return {"policy": policy, "reference": reference,
            "violations": {"mean": violations, "ci95": [violations - 0.1, ci_high], "better": 1, "worse": 0},
            "quality_loss": {"mean": quality, "ci95": [quality, quality]}}


def test_slo_target_compares_at_equal_quality():
    summary = [{"policy": p, "slo_violation_rate": v, "quality_loss_mean": q} for p, v, q in
               (("cachegen", 0.5, 0.02), ("cake", 0.9, 0.0), ("mpc", 0.1, 0.03), ("hybrid", 0.2, 0.01),
                (NEAR_LOSSLESS, 0.6, 0.0001))]
    paired = [_paired("mpc", "cachegen", -0.4, -0.2, +0.01), _paired("hybrid", "cachegen", -0.3, -0.1, -0.01),
              _paired("mpc", "cake", -0.8, -0.6, 0.03), _paired("hybrid", "cake", -0.7, -0.5, 0.01),
              _paired(NEAR_LOSSLESS, "cake", -0.3, -0.1, 0.0001)]
    sim = TraceSimulation(None, [], summary, paired, 5, 1.0)
    t = slo_target(sim, 0.00013, real_traces=True)
    # mpc has fewer violations than cachegen but more loss: hybrid is the comparison; vs cake only near-lossless
    assert t["details"]["cachegen"]["policy"] == "hybrid" and t["details"]["cake"]["policy"] == NEAR_LOSSLESS
    assert t["met"] is True
    paired[-1] = _paired(NEAR_LOSSLESS, "cake", -0.1, +0.05, 0.0001)  # not significant
    t = slo_target(TraceSimulation(None, [], summary, paired, 5, 1.0), 0.00013, real_traces=False)
    assert t["met"] is False and "synthetic" in t["result"]


# ----------------------------------------------------------------------------------------------- documents


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_document_writes_markdown_and_self_contained_html(tmp_path):
    (tmp_path / "plots").mkdir()
    image = _png(tmp_path / "plots" / "a.png")
    doc = Document("T <1>", base=tmp_path)
    doc.heading("Section & more")
    doc.paragraph("a **b** `c<d>` e|f")
    doc.bullets(["one", "`two`"])
    doc.table(["x", "y"], [["1|2", "3"]])
    doc.image(image, "A plot")
    md = doc.markdown()
    assert md.startswith("# T <1>\n\n## Section & more") and "| 1\\|2 | 3 |" in md and "|---|---:|" in md
    assert "![A plot](plots/a.png)" in md
    page = doc.html()
    assert "<title>T &lt;1&gt;</title>" in page and "<code>c&lt;d&gt;</code>" in page and "<strong>b</strong>" in page
    data = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(data) == image.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens offline
    with pytest.raises(ValueError):
        doc.table(["x", "y"], [["only one"]])


# ----------------------------------------------------------------------------------------------- measurements


@pytest.fixture(scope="module")
def tiny_measured(tmp_path_factory):
    """A tiny random Llama's two contexts (a passage and a question) measured into a store."""
    from kvcast.codec.model import load_model
    from kvcast.streamer.demo_measure import ContextMeasurer
    from kvcast.streamer.store import open_store

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=3)
    lm = load_model(folder, progress=False)
    store = open_store(tmp_path_factory.mktemp("store"))
    text = list(("The river runs north of the town. " * 12).encode())
    measurer = ContextMeasurer(lm, store, chunk_tokens=64, levels=["raw", "int8", "cachegen-2"],
                               baselines=["recent-25%"], answer_tokens=4)
    passage = DemoContext("text-0", "text", tuple(text[:320]), continuation_ids=tuple(text[320:353]))
    question = DemoContext("qa-0", "qa", tuple(text[:200]), question_ids=tuple(b" line x is <"),
                           expected_answer="12")
    return lm, store, measurer, [measurer.measure(passage), measurer.measure(question)]


def test_measurement_scores_every_stored_level(tiny_measured):
    _, _, measurer, (passage, question) = tiny_measured
    assert passage.manifest.levels == ("raw", "int8", "cachegen-2") and len(passage.manifest.chunks) == 5
    raw, small = passage.levels["raw"].sums.summary(), passage.levels["cachegen-2"].sums.summary()
    assert 0 <= raw["kl_per_token"] < small["kl_per_token"] and raw["top1_agreement"] == 1.0
    assert passage.level_bytes("int8") < passage.level_bytes("raw") and raw["ppl_exact"] == small["ppl_exact"]
    assert all(passage.side_bytes[lv] > 0 for lv in passage.manifest.levels)
    assert passage.baselines["recent-25%"][0] == pytest.approx(4.0, abs=0.1)
    assert question.exact.same_as_exact and question.levels["raw"].same_as_exact  # raw is fp16 of the exact KV
    # a uniform plan is the level's own measurement; all text is the exact cache
    assert measurer.score_plan(passage, ["int8"] * 5) is passage.levels["int8"]
    exact = measurer.score_plan(passage, [TEXT] * 5).sums.summary()
    assert exact["kl_per_token"] == 0 and exact["top1_agreement"] == 1 and exact["ppl_change"] == 0
    with pytest.raises(ValueError):
        measurer.score_plan(passage, [TEXT])


@pytest.mark.parametrize("actions", [[TEXT, TEXT, "int8", "cachegen-2", "raw"],
                                     ["cachegen-2", TEXT, "int8", TEXT, "raw"]])
def test_a_plans_cache_is_the_cache_a_live_session_builds(tiny_measured, actions):
    from kvcast.streamer.live import HostProfile, StoreLink, load_context
    from kvcast.streamer.menus import RecomputeCost

    lm, store, measurer, (passage, _) = tiny_measured
    manifest = passage.manifest
    host = HostProfile(recompute=RecomputeCost(1e-5, 0.0, 1e-3), default_decode_values_per_s=1e8)
    live = asyncio.run(load_context(manifest, StoreLink(store, manifest), lm.model, list(passage.context.token_ids),
                                    policy=PlanPlayer(list(enumerate(actions))), slo_s=5.0, host=host))
    assert [c.action for c in live.session.chunks] == actions
    built = measurer._assemble(passage, actions)
    for (k1, v1), (k2, v2) in zip(built, live.kv):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
    quality = measurer.score_plan(passage, actions)
    assert quality.sums.tokens == 32 and quality is measurer.score_plan(passage, actions)  # memoized


# ----------------------------------------------------------------------------------------------- end to end


def _smollm2_available() -> bool:
    try:
        from kvcast.codec.model import smollm2_available
    except ImportError:
        return False
    return smollm2_available()


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(not _smollm2_available(), reason="SmolLM2 GGUF not installed")
def test_kvcast_demo_quick_end_to_end(tmp_path):
    """``kvcast demo --quick --out DIR`` as a user runs it: a report with every section, the plots, an HTML page
    that opens offline, and the same numbers in report.md as in report.json."""
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "kvcast.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "COLUMNS": "200"},
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kvcast demo:" in done.stdout and "targets" in done.stdout
    doc = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in ("rate_distortion", "ttft_cdf", "slo_vs_quality", "timeline"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name}.png)" in md
    assert page.count('src="data:image/png;base64,') == 4 and not re.search(r'(src|href)="(?!data:)', page)
    for section in ("## Data used", "## Targets", "## Headline: CacheGen's comparison, measured on this host",
                    "### Headline, scaled: a Mistral-7B-sized deployment on the H100 cost model",
                    "### Headline, scaled: a Mistral-7B-sized deployment on the A100 cost model",
                    "## Codec: size and quality of every level", "### By position in the context",
                    "## Streaming over the traces: every policy", "## Live: one context over loopback", "## Notes"):
        assert section in md and html.escape(section.lstrip("# ")) in page, section
    assert doc["format"] == "kvcast-demo-report/1" and doc["quick"] is True
    # the report states which data it used
    shared = (SHARED_DIR / "datasets").is_dir()
    assert ("WikiText-2 test" in md) == shared and ("generated encyclopedia" in md) == (not shared)
    assert doc["data"]["real_traces"] == (SHARED_DIR / "traces").is_dir()
    # the targets, with their measured numbers, as printed
    assert [t["id"] for t in doc["targets"]] == ["size", "ttft", "slo"]
    for t in doc["targets"]:
        assert t["result"] in md and t["met"] in (True, False, None)
    ttft = doc["targets"][1]["details"]
    assert set(ttft) == {"h100", "a100"} and f"{ttft['h100']['vs_text_x']:.2f}x vs text" in md
    # every level measured, in the codec table with its size; headline tables side by side
    for r in doc["levels"]:
        assert f"| {r['level']} | {r['bytes']:,} | {r['bits_per_value']:.2f} |" in md
    assert doc["levels"][0]["level"] == "raw" and {"int8", "kvcast-2", "cachegen-2"} <= {r["level"] for r in
                                                                                         doc["levels"]}
    measured = {r["spec"]: r for r in doc["headline"]["measured"]["rows"]}
    assert {"text", "fixed:int8", "cachegen", "cake", "cake-cachegen", "mpc", "hybrid"} <= set(measured)
    assert measured["text"]["ttft_vs_text_x"] == pytest.approx(1.0)
    assert measured["fixed:int8"]["size_vs_int8_x"] == pytest.approx(1.0)
    for gpu in ("h100", "a100"):
        rows = {r["spec"]: r for r in doc["headline"]["scaled"][gpu]["rows"]}
        assert rows["text"]["quality"]["kl_per_token"] == 0 and rows["fixed:int8"]["bytes"] > 0
    # every policy simulated over the traces; the live run answered from the fetched cache
    assert [s["policy"] for s in doc["simulation"]["summary"]] == list(DEMO_POLICIES)
    live = doc["live"]
    assert live["ttft_s"] > 0 and live["answer"] and live["chunks"] and f"TTFT {live['ttft_s']:.3f} s" in md
    assert (out / "live" / "fetch.json").is_file() and (out / "simulate" / "sessions.jsonl").is_file()
    assert doc["wall_s"] > 0 and len(doc["steps"]) == 7

