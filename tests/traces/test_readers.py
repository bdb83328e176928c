"""Trace readers: every file of ../shared/traces against MANIFEST.tsv, format semantics on small hand-written
files, detection, and malformed files (each error names the file and the line)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kvcast.traces.readers import (
    FORMATS,
    MAHIMAHI_PACKET_BITS,
    ReadOptions,
    detect_format,
    load_trace,
    load_traces,
    read_trace_file,
)
from kvcast.traces.trace import ChunkTrace, Trace, TraceError
from tests.factories import SHARED_DIR

SHARED = SHARED_DIR / "traces"
MANIFEST = SHARED / "MANIFEST.tsv"


def _manifest_rows() -> list[dict[str, str]]:
    if not MANIFEST.is_file():
        return []
    with MANIFEST.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = _manifest_rows()
needs_shared = pytest.mark.skipif(not ROWS, reason="../shared/traces is not present")


def _pooled(traces: list[Trace]) -> Trace:
    """All traces of a file back to back (CacheGen files: the manifest pools every per-chunk value)."""
    bw = np.concatenate([t.bandwidth_bps for t in traces])
    widths = np.concatenate([np.diff(t.boundaries_s) for t in traces])
    return Trace(np.concatenate([[0.0], np.cumsum(widths)]), bw)


# ---------------------------------------------------------------------------------------------- MANIFEST parity
@needs_shared
def test_manifest_lists_every_file_and_all_formats():
    paths = {r["path"] for r in ROWS}
    on_disk = {p.relative_to(SHARED).as_posix() for p in SHARED.rglob("*")
               if p.is_file() and p.name not in ("README.md", "MANIFEST.tsv")}
    assert paths == on_disk
    assert {r["format"] for r in ROWS} <= set(FORMATS)


@needs_shared
@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_reader_matches_manifest(row):
    """Mean, p10 and p90 (time-weighted, README's conventions) agree with MANIFEST.tsv to its rounding."""
    path = SHARED / row["path"]
    tf = read_trace_file(path)
    assert tf.format == row["format"]
    assert detect_format(path, use_manifest=False) == row["format"]  # content detection agrees
    trace = _pooled(list(tf.traces)) if len(tf.traces) > 1 else tf.traces[0]
    for stat, value in (("mean_mbps", trace.mean_bps), ("p10_mbps", trace.percentile_bps(10)),
                        ("p90_mbps", trace.percentile_bps(90))):
        expected = float(row[stat])
        assert value / 1e6 == pytest.approx(expected, abs=5.1e-4, rel=1e-6), stat  # 3 decimals in the TSV
    if row["duration_s"] != "NA":
        assert tf.traces[0].duration_s == pytest.approx(float(row["duration_s"]), abs=0.051)  # 1 decimal
    else:
        assert all(isinstance(t, ChunkTrace) for t in tf.traces)


@needs_shared
def test_load_whole_shared_folder():
    result = load_traces(SHARED)
    assert not result.skipped
    assert len(result.files) == len(ROWS)
    assert len(result.traces) == len(ROWS) - 2 + 13  # the two CacheGen files hold 10 + 3 traces
    assert all(t.wrap and t.source for t in result.traces)


@needs_shared
def test_puffer_unit_option_scales_by_eight():
    path = next(SHARED / r["path"] for r in ROWS if r["source"] == "puffer")
    labelled = load_trace(path)
    as_mbytes = load_trace(path, bandwidth_scale=8.0)
    assert as_mbytes.mean_bps == pytest.approx(8 * labelled.mean_bps)
    assert np.array_equal(as_mbytes.boundaries_s, labelled.boundaries_s)


# ---------------------------------------------------------------------------------------------- semantics
def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_pensieve_semantics(tmp_path):
    # line i's value holds over (t[i-1], t[i]]; line 0's value is never used; origin shifted to 0
    path = write(tmp_path, "p", "1.0\t99\n2.0\t3\n2.0\t7\n4.0 5\n\n")
    t = load_trace(path, format="pensieve_time_mbps")
    assert list(t.boundaries_s) == [0.0, 1.0, 3.0]  # the repeated timestamp is a zero-length interval
    assert list(t.bandwidth_bps) == [3e6, 5e6]
    assert t.mean_bps == pytest.approx((3 + 10) / 3 * 1e6)
    assert t.name == "p" and t.source == str(path) and t.wrap


def test_mahimahi_binning_conserves_packets(tmp_path):
    # opportunities at ms 0,0,1,999,1000,1500 and the last timestamp 2500 (the period)
    path = write(tmp_path, "m.down", "0\n0\n1\n999\n1000\n1500\n2500\n")
    t = load_trace(path)
    assert list(t.boundaries_s) == [0.0, 1.0, 2.0, 2.5]
    assert t.total_bits == 7 * MAHIMAHI_PACKET_BITS
    assert list(t.bandwidth_bps) == [4 * 12000.0, 2 * 12000.0, 1 * 12000 / 0.5]
    fine = load_trace(path, mahimahi_bin_s=0.5)
    assert fine.total_bits == t.total_bits and fine.num_segments == 5


def test_sabre_semantics(tmp_path):
    entries = [{"duration_ms": 500, "bandwidth_kbps": 2000, "latency_ms": 20},
               {"duration_ms": 0, "bandwidth_kbps": 9000, "latency_ms": 20},
               {"duration_ms": 1500, "bandwidth_kbps": 1000, "latency_ms": 20}]
    path = write(tmp_path, "s.json", json.dumps(entries, indent=2))
    t = load_trace(path)
    assert list(t.boundaries_s) == [0.0, 0.5, 2.0]
    assert list(t.bandwidth_bps) == [2e6, 1e6]


def test_oboe_gap_gets_neighbour_mean(tmp_path):
    path = write(tmp_path, "o.txt", "100 1000\n1100 1000\n1600 3000\n2100 3000\n")
    t = load_trace(path)
    assert list(t.boundaries_s) == [0.0, 1.0, 1.5, 2.0]
    assert list(t.bandwidth_bps) == [1e6, 2e6, 3e6]


def test_cachegen_chunks(tmp_path):
    path = write(tmp_path, "bw.jsonl", '{"bw": [1.0, 2.5]}\n\n{"bw": [4, 0.5, 0.25]}  \n')
    tf = read_trace_file(path)
    assert tf.format == "cachegen_jsonl_gbps" and len(tf.traces) == 2
    a, b = tf.traces
    assert isinstance(a, ChunkTrace) and list(a.chunk_bps) == [1e9, 2.5e9]
    assert a.chunk_duration_s == pytest.approx(0.05) and a.name == "bw.jsonl#0"
    assert list(b.chunk_bps) == [4e9, 0.5e9, 0.25e9]
    slow = load_trace(path, index=1, chunk_duration_s=2.0)
    assert slow.duration_s == 6.0 and slow.delivered_bits(0, 2.0) == pytest.approx(8e9)
    with pytest.raises(TraceError, match="holds 2 traces"):
        load_trace(path)
    with pytest.raises(TraceError, match="out of range"):
        load_trace(path, index=5)


def test_kvcast_json_round_trip(tmp_path):
    original = Trace([0, 0.5, 2.0], [1e9, 3e9], name="k", source="synthetic:x", wrap=False)
    path = write(tmp_path, "k.json", json.dumps(original.to_jsonable()))
    assert detect_format(path) == "kvcast_json"
    back = load_trace(path)
    assert back == original


def test_format_override_and_unknown_format(tmp_path):
    # four lines with equal pairs: detected as oboe, readable as pensieve on request
    path = write(tmp_path, "amb", "0 5\n1 5\n2 7\n3 7\n")
    assert read_trace_file(path).format == "oboe_pair_ms_kbps"
    assert read_trace_file(path, format="pensieve_time_mbps").traces[0].num_segments == 3
    with pytest.raises(ValueError, match="unknown trace format"):
        read_trace_file(path, format="csv")


def test_manifest_decides_the_format(tmp_path):
    sub = tmp_path / "set" / "a"
    sub.mkdir(parents=True)
    write(sub, "x", "0 5\n1 5\n2 7\n3 7\n")
    (tmp_path / "set" / "MANIFEST.tsv").write_text("path\tformat\na/x\tpensieve_time_mbps\n")
    assert detect_format(sub / "x") == "pensieve_time_mbps"
    assert detect_format(sub / "x", use_manifest=False) == "oboe_pair_ms_kbps"
    result = load_traces(tmp_path / "set")
    assert [tf.format for tf in result.files] == ["pensieve_time_mbps"]  # MANIFEST.tsv itself is not read


def test_options_validate():
    with pytest.raises(ValueError):
        ReadOptions(chunk_duration_s=0)
    with pytest.raises(ValueError):
        ReadOptions(bandwidth_scale=-1)


# ---------------------------------------------------------------------------------------------- malformed
MALFORMED = [
    # (file name, content, explicit format or None, expected line, message fragment)
    ("empty", "", None, None, "empty"),
    ("blank", "\n  \n", None, None, "empty"),
    ("nan", "0 1\n1 nan\n2 3\n", None, 2, "not finite"),
    ("negative", "0 1\n1 2\n2 -3\n", None, 3, "negative"),
    ("unsorted", "0 1\n5 2\n4 3\n", None, 3, "before the previous"),
    ("fields", "0 1\n1 2 3\n", "pensieve_time_mbps", 2, "2 fields"),
    ("text", "0 1\n1 fast\n", None, 2, "not a number"),
    ("single", "0 1\n", None, 1, "at least two lines"),
    ("garbage", "hello world, this is not a trace at all\n", None, 1, "unrecognised trace format"),
    ("binary", b"0 1\n\x00\x01\x02", None, 2, "binary"),
    ("latin1", b"0 1\n1 2\xe9\n", None, 2, "UTF-8"),
    ("mm-float.down", "0\n1.5\n2\n", "mahimahi_pkt_ms", 2, "not an integer"),
    ("mm-unsorted.down", "0\n5\n3\n", None, 3, "before the previous"),
    ("mm-negative.down", "-1\n5\n", "mahimahi_pkt_ms", 1, "negative"),
    ("mm-zero.down", "0\n0\n", None, None, "zero duration"),
    ("oboe-odd.txt", "0 5\n10 5\n20 6\n", "oboe_pair_ms_kbps", 3, "odd number"),
    ("oboe-pair.txt", "0 5\n10 6\n", "oboe_pair_ms_kbps", 2, "both lines of a pair"),
    ("sabre-json.json", '[\n{"duration_ms": 1000, "bandwidth_kbps": 10},\n{"duration_ms": 5,\n', None, 4,
     "invalid JSON"),
    ("sabre-key.json", '[\n {"duration_ms": 1000, "bandwidth_kbps": 10},\n {"duration_ms": 1000}\n]', None, 3,
     "bandwidth_kbps"),
    ("sabre-neg.json", ('[{"duration_ms": 1000, "bandwidth_kbps": 10},\n {"duration_ms": 1000,\n'
                        '  "bandwidth_kbps": -4}]'), None, 2, "negative"),
    ("sabre-str.json", '[{"duration_ms": "1000", "bandwidth_kbps": 10}]', None, 1, "duration_ms"),
    ("sabre-empty.json", "[]", None, None, "no periods"),
    ("sabre-extra.json", '[{"duration_ms": 1, "bandwidth_kbps": 1}]\n]', None, 2, "extra data"),
    ("cg.jsonl", '{"bw": [1, 2]}\n{"bw": [1, NaN]}\n', None, 2, "not finite"),
    ("cg-empty.jsonl", '{"bw": [1, 2]}\n{"bw": []}\n', None, 2, "empty"),
    ("cg-broken.jsonl", '{"bw": [1, 2]}\n{"bw": [1, \n', None, 2, "invalid JSON"),
    ("cg-type.jsonl", '{"bw": [1, 2]}\n{"bw": [1, "x"]}\n', None, 2, "must be a number"),
    ("cg-string.jsonl", '{"bw": ["1.5"]}\n', None, 1, "must be a number"),
    ("kv.json", '{"format": "kvcast-trace", "version": 1, "durations_s": [1], "bandwidth_bps": [-1]}', None,
     None, "negative"),
    ("kv-other.json", '{"format": "something"}', None, None, "not a kvcast trace"),
]


@pytest.mark.parametrize("name, content, fmt, line, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_names_file_and_line(tmp_path, name, content, fmt, line, fragment):
    path = write(tmp_path, name, content)
    with pytest.raises(TraceError, match=fragment) as info:
        read_trace_file(path, format=fmt)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert err.line == line
    if line is not None:
        assert f"line {line}" in str(err)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TraceError, match="cannot read"):
        read_trace_file(tmp_path / "nope")
    with pytest.raises(TraceError, match="directory"):
        read_trace_file(tmp_path)


def test_load_traces_skips_bad_files_and_keeps_going(tmp_path):
    good = write(tmp_path, "a_good", "0 1\n1 2\n2 3\n")
    write(tmp_path, "b_bad", "0 1\n1 -2\n")
    write(tmp_path, "c_garbage", b"\x00\xff")
    nested = tmp_path / "deeper"
    nested.mkdir()
    write(nested, "d_good.json", json.dumps([{"duration_ms": 1000, "bandwidth_kbps": 5}]))
    write(tmp_path, "README.md", "not a trace")
    write(tmp_path, ".hidden", "garbage garbage garbage")
    with pytest.raises(TraceError, match="b_bad, line 2"):
        load_traces(tmp_path)
    result = load_traces(tmp_path, on_error="skip")
    assert [t.name for t in result.traces] == ["a_good", "d_good.json"]
    assert [p.name for p, _ in result.skipped] == ["b_bad", "c_garbage"]
    assert all(isinstance(e, TraceError) and e.line is not None for _, e in result.skipped)
    flat = load_traces(tmp_path, on_error="skip", recursive=False)
    assert [t.name for t in flat.traces] == ["a_good"]
    explicit = load_traces([good, nested / "d_good.json"])
    assert len(explicit.traces) == 2 and not explicit.skipped
    with pytest.raises(ValueError):
        load_traces(tmp_path, on_error="ignore")  # type: ignore[arg-type]
