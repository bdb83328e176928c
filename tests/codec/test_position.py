"""`kvcast eval position`: loss by the position of one lossy chunk, the plan check, the text penalty, the cache of
rows and the profile entry, end to end on a tiny random Llama with a character tokenizer."""

from __future__ import annotations

import json
import math

import pytest

transformers = pytest.importorskip("transformers")

from kvcast.codec.model import LoadedModel  # noqa: E402
from kvcast.codec.position import (  # noqa: E402
    PositionSettings,
    markdown_table,
    plan_specs,
    run_position_eval,
    write_outputs,
)
from kvcast.codec.settings import EvalError  # noqa: E402
from tests.factories import REPO_ROOT, tiny_llama  # noqa: E402

TINY = {"intermediate_size": 96, "max_position_embeddings": 512}


class CharTokenizer:
    """One token per character (ids modulo the tiny model's vocabulary)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


@pytest.fixture
def corpus(tmp_path):
    text = "".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog; " * (1 + i % 3) + "\n"
                   for i in range(300))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_plans_are_built_from_the_two_levels():
    plans = plan_specs(4, "A", "B")
    assert plans["alternate A/exact"] == ("A", "exact", "A", "exact")
    assert plans["front B, back exact"] == ("B", "B", "exact", "exact")
    assert plans["all A"] == ("A",) * 4 and all(len(p) == 4 for p in plans.values())


def test_settings_reject_what_cannot_be_measured(corpus):
    with pytest.raises(EvalError, match="at least 2"):
        PositionSettings(chunks=1)
    with pytest.raises(EvalError, match="at least one document"):
        PositionSettings(wikitext_documents=0, longchat_documents=0)
    with pytest.raises(EvalError, match="replaces the datasets"):
        PositionSettings(text_file=corpus)
    with pytest.raises(EvalError, match="positions; the model has 512"):
        run_position_eval(PositionSettings(chunk_tokens=200, chunks=3, longchat_documents=0, text_file=corpus),
                          corpus.parent / "out", model=tiny_llama(**TINY), tokenizer=CharTokenizer())


def test_position_eval_measures_every_chunk_and_level_and_caches_its_rows(tmp_path, corpus):
    s = PositionSettings(chunk_tokens=32, chunks=4, continuation_tokens=12, wikitext_documents=2, longchat_documents=0,
                         levels=("int8", "cachegen-1", "cachegen-2"), plan_levels=("cachegen-1", "cachegen-2"),
                         text_file=corpus)
    out = tmp_path / "out"
    lines: list[str] = []
    results = run_position_eval(s, out, model=tiny_llama(**TINY), tokenizer=CharTokenizer(), model_name="tiny",
                                log=lines.append)
    rows = [json.loads(x) for x in (out / "positions.jsonl").read_text().splitlines()]
    chunk_rows = [r for r in rows if r["kind"] == "chunk"]
    assert len(chunk_rows) == 2 * 3 * 4 and len(results["documents"]) == 2
    assert {r["distance_tokens"] for r in chunk_rows} == {112, 80, 48, 16}
    assert all(r["kl_per_token"] >= 0 and 0 <= r["top1_agreement"] <= 1 for r in rows)
    # a 1-bit level loses more than int8 on the same chunk of the same document
    kl = {(r["doc"], r["chunk"], r["level"]): r["kl_per_token"] for r in chunk_rows}
    assert all(kl[(d, c, "cachegen-1")] > kl[(d, c, "int8")] for d, c, _ in kl)
    assert len([r for r in rows if r["kind"] == "plan"]) == 2 * 8  # 7 mixed plans (2 of them "all"), all int8
    plans = {p["plan"]: p for p in results["plans"]}
    doc0 = results["plans_per_doc"][0]
    singles = sum(kl[(doc0["doc"], i, a)] for i, a in enumerate(doc0["actions"]) if a != "exact")
    assert doc0["sum_same_doc"] == pytest.approx(singles)
    assert plans["all cachegen-1"]["measured"] > plans["alternate cachegen-1/exact"]["measured"] > 0
    text = [r for r in rows if r["kind"] == "text"]
    assert len(text) == 2 * 2 * 2 and all(r["prefix"]["kl_per_token"] > 0 for r in text)
    assert math.isfinite(results["text_over_lossy_prefix_penalty"])
    factors = results["additivity_factors"]
    assert set(factors) == {"int8", "cachegen-1", "cachegen-2"} and all(f > 0 for f in factors.values())
    for level in factors:  # the factor: whole context at one level over the sum; the model takes its root
        whole = plans[f"all {level}"]
        assert whole["sum_mean_curve"] * factors[level] == pytest.approx(whole["measured"])
        assert whole["profile_model"] == pytest.approx(whole["sum_mean_curve"] * math.sqrt(factors[level]))
    entry = results["position_quality"]["levels"]["cachegen-1"]
    assert entry["first_chunk"]["distance_tokens"] == 112 and entry["additivity_factor"] == factors["cachegen-1"]
    assert [p["distance_tokens"] for p in entry["points"]] == [16, 48, 80]
    for p in entry["points"]:  # whole-context equivalent: the chunk's KL x 4 chunks x sqrt(additivity factor)
        assert p["quality_loss"] == pytest.approx(4 * p["kl_per_token"] * math.sqrt(factors["cachegen-1"]))
    assert "| cachegen-1 |" in markdown_table(results) and "penalty" in markdown_table(results)
    # a second run measures nothing again: every row comes from positions.jsonl
    again: list[str] = []
    second = run_position_eval(s, out, model=tiny_llama(**TINY), tokenizer=CharTokenizer(), model_name="tiny",
                               log=again.append)
    assert all("cached" in line for line in again) and len(again) == len(lines) - 2  # no prefill lines
    assert len((out / "positions.jsonl").read_text().splitlines()) == len(rows)
    assert second["levels"] == results["levels"]

    paths = write_outputs(results, out, profile=REPO_ROOT / "streamer" / "default_profile.json")
    assert paths["plot"].stat().st_size > 10_000 and json.loads(paths["json"].read_text())["format"] == \
        "kvcast-eval-position/1"
    from kvcast.streamer.profile import Profile

    merged = Profile.load(paths["profile"])
    assert merged.position_quality.context_tokens == 128 and merged.position_quality.chunk_tokens == 32
    assert merged.quality_loss_at("cachegen-1", 16) == pytest.approx(entry["points"][0]["quality_loss"])
    assert merged.position_quality.curve("cachegen-1").additivity_factor == pytest.approx(factors["cachegen-1"])
    assert merged.text_over_lossy_prefix_penalty == pytest.approx(max(0.0, results["text_over_lossy_prefix_penalty"]))


def test_cli_quick_run_end_to_end(tmp_path, corpus, monkeypatch):
    from typer.testing import CliRunner

    import kvcast.codec.position as position
    from kvcast.cli import app

    loaded = LoadedModel(model=tiny_llama(**TINY), tokenizer=CharTokenizer(), name="tiny", path=tmp_path)
    monkeypatch.setattr(position, "load_model", lambda name, progress=True: loaded)
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["eval", "position", "--quick", "--text-file", str(corpus), "--out", str(out),
                                    "--no-text-penalty", "--threads", "1"])
    assert done.exit_code == 0, done.output
    assert "| int8 |" in done.output and "| cachegen-1 |" in done.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["chunks"] == 4 and summary["settings"]["chunk_tokens"] == 64
    assert set(summary["levels"]) == {"int8", "cachegen-1"}  # kvcast-2 needs a sensitivity table: skipped
    assert "kvcast-2" in summary["skipped_levels"] and (out / "position.png").is_file()
    assert summary["plans"] and not summary["text"]
    bad = CliRunner().invoke(app, ["eval", "position", "--quick", "--text-file", str(corpus), "--out", str(out),
                                   "--plan-levels", "int8"])
    assert bad.exit_code == 2 and "two levels" in bad.output
