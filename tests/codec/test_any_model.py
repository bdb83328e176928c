"""`kvcast calibrate`, `kvcast eval codec` and `kvcast eval demo` on models other than SmolLM2 (``--model DIR``).

Tiny random Qwen2 and Gemma models with a byte-level tokenizer (`tests.factories.save_tiny_model`), run through
the real CLI in-process: calibrate writes a table named after the model that fits it and drives the kvcast-*
levels; eval and demo run the other levels and skip kvcast-* (with a note) unless ``--tables`` has a table for
the model; a missing model exits 2 naming it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from typer.testing import CliRunner

from kvcast import codec
from kvcast.cli import app
from kvcast.codec.calibrate import table_filename
from kvcast.codec.hf import kv_from_cache
from kvcast.codec.model import load_model
from kvcast.codec.sensitivity import SensitivityTable, TableRegistry
from tests.factories import save_tiny_model

ARCHITECTURES = ("qwen2", "gemma")
SMALL = ["--passages", "1", "--context-tokens", "64", "--continuation-tokens", "8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models (folder per architecture), a text file, and the tables `kvcast calibrate` made of them."""
    root = tmp_path_factory.mktemp("any-model")
    text = root / "text.txt"
    text.write_text("".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; then it rests.\n"
                            for i in range(40)), encoding="utf-8")
    models = {arch: save_tiny_model(root / f"tiny-{arch}", seed=i, architecture=arch)
              for i, arch in enumerate(ARCHITECTURES)}
    tables = root / "tables"
    calibrated = {}
    for arch, folder in models.items():
        result = CliRunner().invoke(app, ["calibrate", "--model", str(folder), *SMALL, "--out-dir", str(tables),
                                          "--text-file", str(text)])
        assert result.exit_code == 0, result.output
        calibrated[arch] = json.loads(result.output.strip().splitlines()[-1])
    return {"root": root, "text": text, "models": models, "tables": tables, "calibrated": calibrated}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_calibrate_writes_a_table_named_after_the_model_that_fits_it(setup, arch):
    path = setup["tables"] / table_filename(f"tiny-{arch}")
    assert setup["calibrated"][arch]["table"] == str(path) and path.name == f"tiny-{arch}.safetensors"
    lm = load_model(setup["models"][arch], progress=False)
    fp = lm.fingerprint()
    table = SensitivityTable.load(path)
    assert table.matches(fp) and table.kv_signature == fp.kv_signature and table.kv_signature.model_type == arch
    assert table.shape == (fp.layers, fp.kv_heads, fp.head_dim) and table.model["name"] == f"tiny-{arch}"
    other = next(a for a in ARCHITECTURES if a != arch)
    assert not SensitivityTable.load(setup["tables"] / f"tiny-{other}.safetensors").matches(fp)
    # the kvcast-* levels encode with the table found through TableRegistry([folder]); none ships for this model
    with torch.inference_mode():
        kv = kv_from_cache(lm.model(torch.arange(40, 88).unsqueeze(0), use_cache=True).cache)
    with pytest.raises(codec.CodecError, match="no sensitivity table"):
        codec.encode(kv, "kvcast-2", model=fp)
    registry = TableRegistry([setup["tables"]])
    assert registry.find(fp).kv_signature == table.kv_signature
    data = codec.Codec(tables=registry).encode(kv, "kvcast-2", model=fp)
    assert data == codec.encode(kv, "kvcast-2", model=fp, sensitivity=table)
    decoded = codec.decode(data, dtype=torch.float32, expect_model=fp)
    assert codec.inspect(data)["level"]["name"] == "kvcast-2" and codec.inspect(data)["bits_per_value"] < 16
    x, y = (torch.cat([t.flatten() for pair in c for t in pair]) for c in (kv, decoded))
    assert x.shape == y.shape and float((x - y).norm() / x.norm()) < 1  # a tiny random model: coarse, not noise


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eval_codec_runs_the_levels_on_the_model(setup, arch, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "codec", "--model", str(setup["models"][arch]), *SMALL, "--chunk-tokens", "32",
        "--levels", "raw,int8,cachegen-2", "--baselines", "", "--text-file", str(setup["text"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["raw", "int8", "cachegen-2"] and "skipped_levels" not in doc
    assert doc["model"]["name"] == f"tiny-{arch}" and doc["model"]["layers"] == 2
    assert doc["rows"][0]["top1_agreement"] == 1.0 and (out / "profile.json").is_file()


def test_eval_codec_skips_kvcast_levels_without_a_table_and_uses_tables(setup, tmp_path):
    model = str(setup["models"]["qwen2"])
    common = ["eval", "codec", "--model", model, *SMALL, "--chunk-tokens", "32", "--levels", "raw,kvcast-2",
              "--baselines", "no-context", "--text-file", str(setup["text"])]
    skipped = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a")])
    assert skipped.exit_code == 0, skipped.output
    note = [line for line in skipped.output.splitlines() if line.startswith("skipped kvcast-2: ")]
    assert len(note) == 1 and "no sensitivity table fits model 'tiny-qwen2'" in note[0] and "--tables" in note[0]
    doc = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["raw", "no-context"] and list(doc["skipped_levels"]) == ["kvcast-2"]

    used = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b"), "--tables", str(setup["tables"])])
    assert used.exit_code == 0, used.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "eval.json").read_text())["rows"]}
    assert set(rows) == {"raw", "kvcast-2", "no-context"} and rows["kvcast-2"]["bits_per_value"] < 16
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "c"), "--tables", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "tables folder" in bad.output


def test_demo_runs_on_the_model_and_skips_kvcast_levels(setup, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["eval", "demo", "--model", str(setup["models"]["gemma"]), "--tokens", "64",
                                      "--next-tokens", "8", "--levels", "raw,int8,kvcast-1", "--text-file",
                                      str(setup["text"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "demo.json").read_text())
    assert [r["level"] for r in doc["levels"]] == ["raw", "int8"] and doc["model"]["name"] == "tiny-gemma"
    assert list(doc["skipped_levels"]) == ["kvcast-1"] and doc["levels"][0]["top1_agreement"] == 1.0
    assert "skipped kvcast-1: no sensitivity table fits model 'tiny-gemma'" in result.output


@pytest.mark.parametrize("command", [
    ["calibrate", *SMALL],
    ["eval", "codec", *SMALL, "--levels", "raw", "--baselines", ""],
    ["eval", "demo", "--tokens", "64", "--next-tokens", "8", "--levels", "raw"],
])
def test_a_missing_model_exits_2_naming_it(setup, command, tmp_path):
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(app, [*command, "--model", str(missing), "--text-file", str(setup["text"]),
                                      "--out-dir" if command[0] == "calibrate" else "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0]
    assert not (tmp_path / "out").exists()
