"""kvcast's generated evaluation data: deterministic, split-disjoint, well-formed, and used when no datasets
folder is found."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcast.codec import evaluate
from kvcast.codec.corpus import SPLIT_SEEDS, encyclopedia_text, line_retrieval_cases
from kvcast.codec.settings import EvalError, EvalSettings


def test_splits_are_deterministic_and_disjoint():
    texts = {split: encyclopedia_text(split, articles=200) for split in SPLIT_SEEDS}
    assert texts["test"] == encyclopedia_text("test", articles=200)
    titles = {split: set(re.findall(r"^ = (.+) = $", t, re.M)) for split, t in texts.items()}
    assert all(len(v) > 150 for v in titles.values())
    assert len(titles["test"] & titles["valid"]) < 20   # short fictional names may collide
    paragraphs = {split: {line for line in t.splitlines() if not line.startswith(" = ")}
                  for split, t in texts.items()}
    assert not paragraphs["test"] & paragraphs["valid"]


def test_text_is_plain_english_lines_with_headings():
    text = encyclopedia_text("valid", articles=50)
    assert text.endswith("\n") and "\r" not in text and text.isascii()
    assert not re.search(r"\ba [aeiou]", text)   # articles agree with their nouns
    lines = text.splitlines()
    assert sum(line.startswith(" = ") for line in lines) == 50
    assert all(line.startswith(" ") for line in lines)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown split"):
        encyclopedia_text("dev")
    with pytest.raises(ValueError, match="at most"):
        line_retrieval_cases(1, lines=100_000)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(0, 10_000))
def test_line_retrieval_cases_have_one_right_answer(lines, seed):
    case = line_retrieval_cases(2, lines=lines, seed=seed)[1]
    record = re.findall(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", case.prompt, re.M)
    assert len(record) == lines == case.lines
    names = [name for name, _ in record]
    assert len(set(names)) == lines
    assert record[case.line_index] == (case.line_name, str(case.expected_number))
    assert case.prompt.endswith(case.question) and case.line_name in case.question


def test_evaluation_falls_back_to_the_generated_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCAST_CACHE_DIR", str(tmp_path))

    original = evaluate.find_datasets_dir

    def missing(explicit=None):   # as on a machine without ../shared
        if explicit is not None:
            return original(explicit)
        raise EvalError("datasets folder not found")

    monkeypatch.setattr(evaluate, "find_datasets_dir", missing)
    path = evaluate.corpus_path(EvalSettings(split="test"))
    assert path.parent == tmp_path / "corpus"
    assert evaluate.read_text(path) == encyclopedia_text("test")
    assert evaluate.corpus_path(EvalSettings(split="test")) == path   # written once
    # an explicit folder that does not exist stays an error
    with pytest.raises(EvalError, match="does not exist"):
        evaluate.corpus_path(EvalSettings(split="test", datasets=tmp_path / "nope"))
