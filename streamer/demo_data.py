"""The data ``kvcast demo`` runs on: text passages, line-retrieval questions and throughput traces, and which
ones were used.

* Passages: WikiText-2 test (``wikitext-2-raw/wiki.test.raw``) from ``../shared/datasets`` (or ``--datasets``),
  else kvcast's generated corpus (`kvcast.codec.corpus.encyclopedia_text`): `kvcast.codec.evaluate.corpus_path`
  decides, as for ``kvcast eval codec``.
* Questions: LongChat's line retrieval (``longchat-lines/200_lines.jsonl``), each record cut to `qa_lines` lines
  around the asked line (SmolLM2 on two CPU cores cannot afford 4,400-token records here), else kvcast's generated
  cases (`kvcast.codec.corpus.line_retrieval_cases`). The record is the stored context; the question, with the
  answer's opening ``line NAME: REGISTER_CONTENT is <``, is what the model reads after loading it.
* Traces: ``--traces``, else ``../shared/traces``, else kvcast's shipped synthetic set; at most `max_traces`,
  taken in turn from each source folder.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcast.codec.corpus import line_retrieval_cases
from kvcast.codec.evaluate import EvalError, corpus_path, find_datasets_dir, passages_from_text, read_text
from kvcast.codec.settings import EvalSettings
from kvcast.streamer.demo_config import DemoConfig
from kvcast.traces.trace import Trace

__all__ = ["LONGCHAT_LINES_FILE", "DemoContext", "DemoData", "find_shared_traces", "load_demo_data", "parse_answer",
           "select_traces"]

LONGCHAT_LINES_FILE = "longchat-lines/200_lines.jsonl"
_RECORD_END = "Now the record is over."
_LINE = re.compile(r"^line ([^:]+): REGISTER_CONTENT is <(\d+)>$")


@dataclass(frozen=True)
class DemoContext:
    """One stored context: its token ids and how its cache is scored (a continuation, or a question)."""

    context_id: str
    kind: str
    """``text`` (the continuation is scored) or ``qa`` (a question is answered)."""
    token_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...] = ()
    """``text``: the tokens after the context (fed teacher-forced; each is scored on predicting the next)."""
    question: str = ""
    question_ids: tuple[int, ...] = ()
    expected_answer: str = ""
    """``qa``: the number the question asks for."""
    source: str = ""


@dataclass(frozen=True)
class DemoData:
    """The contexts and traces of a run, and where they came from (the report states it)."""

    contexts: tuple[DemoContext, ...]
    traces: tuple[Trace, ...]
    text_source: str
    qa_source: str
    trace_source: str
    shared_datasets: bool = False
    """Whether any context came from a datasets folder (not kvcast's generated corpus)."""
    real_traces: bool = False
    """Whether the traces were read from files (``--traces`` or ``../shared/traces``), not kvcast's synthetic set."""


def parse_answer(text: str) -> str:
    """The number an answer gives: its leading digits (after spaces), else ``""``.

    >>> parse_answer(" 2416>\\n"), parse_answer("no idea")
    ('2416', '')
    """
    match = re.match(r"\s*(\d+)", text)
    return match.group(1) if match else ""


def find_shared_traces() -> Path | None:
    """``../shared/traces`` from the working directory or the repository root, if present."""
    repo = Path(__file__).resolve().parents[1]
    for path in (Path.cwd() / ".." / "shared" / "traces", repo / ".." / "shared" / "traces"):
        if path.is_dir():
            return path.resolve()
    return None


def select_traces(traces: Sequence[Trace], limit: int) -> list[Trace]:
    """At most `limit` of `traces`, taken in turn from each source folder (sorted by folder, then by file and name),
    so every source is represented.

    >>> ts = [Trace([0.0, 1.0], [1e9], name=n, source=f"{d}/{n}") for d in "ab" for n in ("x", "y", "z")]
    >>> [t.source for t in select_traces(ts, 4)]
    ['a/x', 'b/x', 'a/y', 'b/y']
    """
    groups: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        groups[str(Path(trace.source).parent)].append(trace)
    queues = [sorted(groups[k], key=lambda t: (t.source, t.name)) for k in sorted(groups)]
    picked: list[Trace] = []
    depth = 0
    while len(picked) < limit and any(depth < len(q) for q in queues):
        picked.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return picked[:limit]


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def _question_prompt(question: str, line_name: str) -> str:
    """What the model reads after the record: the question and the answer's opening, so that a small model
    answers with the number (the first digits it generates)."""
    return f" {question}\nAnswer: line {line_name}: REGISTER_CONTENT is <"


def _text_contexts(config: DemoConfig, tokenizer: Any) -> tuple[list[DemoContext], str, bool]:
    if config.text_contexts == 0:
        return [], "none", False
    path = corpus_path(EvalSettings(split="test", datasets=config.datasets))
    generated = path.name.startswith("kvcast-synthetic-")
    need = config.context_tokens + config.next_tokens + 1
    passages = passages_from_text(read_text(path), tokenizer, config.text_contexts, need, source=str(path))
    contexts = []
    for i, passage in enumerate(passages):
        ids = [int(t) for t in passage.token_ids[0].tolist()]
        contexts.append(DemoContext(f"text-{i}", "text", tuple(ids[:config.context_tokens]),
                                    continuation_ids=tuple(ids[config.context_tokens:need]),
                                    source=f"{path.name} at character {passage.char_offset:,}"))
    where = ("kvcast's generated encyclopedia (kvcast.codec.corpus, test split; no ../shared/datasets)" if generated
             else f"WikiText-2 test ({path})")
    plural = "s" if len(contexts) != 1 else ""
    return contexts, f"{len(contexts)} passage{plural} of {config.context_tokens:,} tokens + {config.next_tokens} " \
                     f"scored tokens from {where}", not generated


def _longchat_cases(path: Path, config: DemoConfig) -> list[tuple[str, str, str, str]]:
    """(record text, question, line name, expected number) of the first cases of LongChat's line-retrieval file,
    each record cut to `config.qa_lines` lines around the asked line."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if len(out) >= config.qa_contexts:
                break
            try:
                case = json.loads(line)
                prompt, (name, _), expected = case["prompt"], case["random_idx"], int(case["expected_number"])
                head, _, rest = prompt.partition("\n\n")
                record, _, tail = rest.partition(f"\n\n{_RECORD_END}")
                lines = record.split("\n")
                asked = next(i for i, text in enumerate(lines) if text.startswith(f"line {name}:"))
            except (ValueError, KeyError, TypeError, StopIteration) as exc:
                raise EvalError(f"{path}:{number}: not a LongChat line-retrieval case ({exc})") from None
            if not all(_LINE.match(text) for text in lines):
                raise EvalError(f"{path}:{number}: a record line is not 'line NAME: REGISTER_CONTENT is <N>'")
            first = min(max(0, asked - config.qa_lines // 2), max(0, len(lines) - config.qa_lines))
            kept = lines[first:first + config.qa_lines]
            question = tail.strip()
            out.append((f"{head}\n\n" + "\n".join(kept) + f"\n\n{_RECORD_END}", question, name, str(expected)))
    if len(out) < config.qa_contexts:
        raise EvalError(f"{path} has {len(out)} cases; the demo asks for {config.qa_contexts}")
    return out


def _qa_contexts(config: DemoConfig, tokenizer: Any) -> tuple[list[DemoContext], str, bool]:
    if config.qa_contexts == 0:
        return [], "none", False
    try:
        folder = find_datasets_dir(config.datasets)
    except EvalError:
        if config.datasets is not None:
            raise
        folder = None
    path = folder / LONGCHAT_LINES_FILE if folder is not None else None
    if path is not None and path.is_file():
        cases = _longchat_cases(path, config)
        where = f"LongChat line retrieval ({path}), records cut to {config.qa_lines} lines around the asked line"
        shared = True
    else:
        cases = []
        for case in line_retrieval_cases(config.qa_contexts, lines=config.qa_lines, seed=config.seed):
            record = case.prompt[:case.prompt.rindex(case.question)].rstrip()
            cases.append((record, case.question, case.line_name, str(case.expected_number)))
        where = (f"kvcast's generated line-retrieval cases (kvcast.codec.corpus, {config.qa_lines} lines each; "
                 + ("no LongChat file in the datasets folder)" if folder is not None else "no ../shared/datasets)"))
        shared = False
    contexts = []
    for i, (record, question, name, expected) in enumerate(cases):
        prompt = _question_prompt(question, name)
        contexts.append(DemoContext(f"qa-{i}", "qa", _encode(tokenizer, record), question=prompt,
                                    question_ids=_encode(tokenizer, prompt), expected_answer=expected,
                                    source=f"asks for line {name}"))
    return contexts, f"{len(contexts)} question{'s' if len(contexts) != 1 else ''} from {where}", shared


def _traces(config: DemoConfig) -> tuple[list[Trace], str, bool]:
    from kvcast.traces.readers import load_traces

    if config.traces:
        loaded = load_traces([str(p) for p in config.traces], on_error="skip")
        usable = [t for t in loaded.traces if t.mean_bps > 0]
        if not usable:
            raise EvalError("no usable trace in " + ", ".join(map(str, config.traces)))
        picked = select_traces(usable, config.max_traces)
        return picked, (f"{len(picked)} of {len(usable)} traces from {', '.join(map(str, config.traces))}"
                        + (f" ({len(loaded.skipped)} unreadable files skipped)" if loaded.skipped else "")), True
    shared = find_shared_traces()
    if shared is not None:
        loaded = load_traces([str(shared)], on_error="skip")
        usable = [t for t in loaded.traces if t.mean_bps > 0]
        picked = select_traces(usable, config.max_traces)
        sources = sorted({Path(t.source).parent.name for t in picked})
        return picked, (f"{len(picked)} of {len(usable)} real throughput traces from {shared} (in turn from "
                        f"{', '.join(sources)})"), True
    from kvcast.traces.defaults import default_traces

    picked = list(default_traces())[:config.max_traces]
    return picked, (f"kvcast's {len(picked)} shipped synthetic traces (kvcast.traces.defaults; no ../shared/traces: "
                    "not real traces)"), False


def load_demo_data(config: DemoConfig, tokenizer: Any) -> DemoData:
    """The run's contexts (tokenized with `tokenizer`) and traces; `EvalError` for missing or malformed data."""
    text, text_source, shared_text = _text_contexts(config, tokenizer)
    qa, qa_source, shared_qa = _qa_contexts(config, tokenizer)
    traces, trace_source, real_traces = _traces(config)
    return DemoData(contexts=tuple(text + qa), traces=tuple(traces), text_source=text_source, qa_source=qa_source,
                    trace_source=trace_source, shared_datasets=shared_text or shared_qa, real_traces=real_traces)
