"""Readers for throughput-trace file formats, with format auto-detection.

Formats (``FORMATS``; details and units in ``traces/README.md``):

- ``pensieve_time_mbps``: ``<time_s> <Mbps>`` per line; the value on line i holds over (t[i-1], t[i]].
- ``mahimahi_pkt_ms``: one integer ms timestamp per line, one 1500-byte delivery opportunity each;
  binned into ``mahimahi_bin_s`` bins.
- ``sabre_json``: JSON list of ``{"duration_ms", "bandwidth_kbps", "latency_ms"}`` periods.
- ``oboe_pair_ms_kbps``: ``<t_ms> <kbps>`` lines in (start, end) pairs; gaps get their neighbours' mean.
- ``cachegen_jsonl_gbps``: JSON Lines ``{"bw": [Gbps, ...]}``, one trace per line, one value per KV chunk
  (read as :class:`~traces.trace.ChunkTrace` of ``chunk_duration_s`` chunks).
- ``kvcast_json``: kvcast's own JSON trace (:meth:`Trace.to_jsonable`).

The format comes from, in order: the ``format=`` argument, a ``MANIFEST.tsv`` (columns ``path`` and
``format``) in the file's folder or an ancestor folder, the file's content. Every problem raises
:class:`~traces.trace.TraceError` naming the file and, where it applies, the line.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import numpy as np

from kvcast.traces.trace import ChunkTrace, Trace, TraceError

__all__ = [
    "DEFAULT_CHUNK_DURATION_S",
    "FORMATS",
    "MAHIMAHI_PACKET_BITS",
    "LoadResult",
    "ReadOptions",
    "TraceFile",
    "detect_format",
    "iter_trace_paths",
    "load_trace",
    "load_traces",
    "read_trace_file",
]

MAHIMAHI_PACKET_BITS = 1500 * 8
"""Bits per mahimahi delivery opportunity (one 1500-byte packet)."""

DEFAULT_CHUNK_DURATION_S = 0.05
"""Default time span of one CacheGen per-chunk value: CacheGen's artifact budget per chunk (SLO 0.5 s over
its 10 chunks)."""

_IGNORED_SUFFIXES = frozenset({".md", ".tsv", ".png", ".pdf", ".py", ".pyc", ".gz", ".zip", ".csv"})


@dataclass(frozen=True)
class ReadOptions:
    """Options of the readers.

    Attributes:
        chunk_duration_s: seconds per value of ``cachegen_jsonl_gbps`` traces.
        mahimahi_bin_s: bin width for ``mahimahi_pkt_ms`` (the last bin may be shorter).
        bandwidth_scale: multiply every bandwidth by this (e.g. 8 to read Puffer's values as MBytes/s,
            see the unit warning in ``traces/README.md``; or to move a trace to Gbps).
        wrap: the ``wrap`` flag of the traces read (all these formats loop in their reference players).
    """

    chunk_duration_s: float = DEFAULT_CHUNK_DURATION_S
    mahimahi_bin_s: float = 1.0
    bandwidth_scale: float = 1.0
    wrap: bool = True

    def __post_init__(self) -> None:
        for name in ("chunk_duration_s", "mahimahi_bin_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.bandwidth_scale, (int, float)) and 0 <= self.bandwidth_scale < math.inf):
            raise ValueError(f"bandwidth_scale must be a finite number >= 0, got {self.bandwidth_scale!r}")


@dataclass(frozen=True)
class TraceFile:
    """What one file holds: its format and its traces (several for ``cachegen_jsonl_gbps``)."""

    path: Path
    format: str
    traces: tuple[Trace, ...]


class LoadResult(NamedTuple):
    """Result of :func:`load_traces`: the traces, the files they came from, and the skipped files."""

    traces: list[Trace]
    skipped: list[tuple[Path, Exception]]
    files: list[TraceFile]


@dataclass(frozen=True)
class TraceFormat:
    """One file format: its reader (text, path, options) -> traces, and a one-line description."""

    name: str
    description: str
    read: Callable[[str, str, ReadOptions], list[Trace]] = field(repr=False)


# ---------------------------------------------------------------------------------------------- helpers
def _fail(path: str, line: int | None, message: str) -> TraceError:
    return TraceError(message, path=path, line=line)


def _number(token: str, path: str, line: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _fail(path, line, f"{what} is not a number: {token!r}") from None
    if not math.isfinite(value):
        raise _fail(path, line, f"{what} is not finite: {token!r}")
    return value


def _bandwidth(token: Any, path: str, line: int, unit: str) -> float:
    """A text field (str) or a JSON value (int/float; JSON strings and booleans are rejected)."""
    if isinstance(token, bool) or not isinstance(token, (int, float, str)):
        raise _fail(path, line, f"bandwidth ({unit}) must be a number, got {token!r}")
    value = _number(token, path, line, f"bandwidth ({unit})") if isinstance(token, str) else float(token)
    if not math.isfinite(value):
        raise _fail(path, line, f"bandwidth ({unit}) is not finite: {token!r}")
    if value < 0:
        raise _fail(path, line, f"bandwidth ({unit}) is negative: {token!r}")
    return value


def _json_bandwidth(value: Any, path: str, line: int, unit: str) -> float:
    """A bandwidth from JSON: a number (strings, booleans and null are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, line, f"bandwidth ({unit}) must be a number, got {value!r}")
    return _bandwidth(value, path, line, unit)


def _numbered_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of every non-blank line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields:
            yield lineno, fields


def _make_trace(path: str, times: np.ndarray, bw_bps: np.ndarray, lines: np.ndarray, opts: ReadOptions,
                name: str) -> Trace:
    """Trace from segment boundary times (any origin) and per-segment bandwidths; zero-length segments
    (repeated timestamps) are dropped."""
    widths = np.diff(times)
    keep = widths > 0
    if not np.any(keep):
        raise _fail(path, int(lines[-1]) if lines.size else None,
                    "the trace has zero duration (needs two different timestamps)")
    bnd = np.concatenate([[0.0], times[1:][keep] - times[0]])
    return Trace(bnd, bw_bps[keep] * opts.bandwidth_scale, name=name, source=path, wrap=opts.wrap)


def _trace_name(path: str) -> str:
    return os.path.basename(path)


# ---------------------------------------------------------------------------------------------- readers
def _read_pensieve(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    times: list[float] = []
    values: list[float] = []
    lines: list[int] = []
    for lineno, fields in _numbered_lines(text):
        if len(fields) != 2:
            raise _fail(path, lineno, f"expected '<time_s> <Mbps>' (2 fields), got {len(fields)}: "
                                      f"{' '.join(fields)[:80]!r}")
        t = _number(fields[0], path, lineno, "time (s)")
        v = _bandwidth(fields[1], path, lineno, "Mbps")
        if times and t < times[-1]:
            raise _fail(path, lineno, f"time {t} s is before the previous line's {times[-1]} s "
                                      "(timestamps must not decrease)")
        times.append(t)
        values.append(v)
        lines.append(lineno)
    if not times:
        raise _fail(path, None, "no samples (the file is empty or blank)")
    if len(times) < 2:
        raise _fail(path, lines[0], "a pensieve trace needs at least two lines (line i's bandwidth "
                                    "holds from t[i-1] to t[i])")
    t = np.array(times)
    bw = np.array(values[1:]) * 1e6
    return [_make_trace(path, t, bw, np.array(lines), opts, _trace_name(path))]


def _read_mahimahi(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    tokens = text.split()
    if not tokens:
        raise _fail(path, None, "no samples (the file is empty or blank)")
    ms: np.ndarray | None = None
    if text.count("\n") + 1 >= len(tokens):  # fast path; any anomaly is located by the slow path below
        try:
            ms = np.array(tokens, dtype=np.int64)
        except (ValueError, OverflowError):
            ms = None
        if ms is not None and (len(tokens) != sum(1 for _ in _nonblank(text)) or np.any(ms < 0)
                               or np.any(np.diff(ms) < 0)):
            ms = None
    if ms is None:
        values: list[int] = []
        for lineno, fields in _numbered_lines(text):
            if len(fields) != 1:
                raise _fail(path, lineno, f"expected one integer ms timestamp per line, got {len(fields)} "
                                          f"fields: {' '.join(fields)[:80]!r}")
            try:
                value = int(fields[0])
            except ValueError:
                raise _fail(path, lineno, f"timestamp is not an integer (ms): {fields[0]!r}") from None
            if value < 0:
                raise _fail(path, lineno, f"timestamp is negative: {value}")
            if values and value < values[-1]:
                raise _fail(path, lineno, f"timestamp {value} ms is before the previous line's "
                                          f"{values[-1]} ms (timestamps must not decrease)")
            values.append(value)
        ms = np.array(values, dtype=np.int64)
    period_ms = int(ms[-1])  # mm-link loops with the last timestamp as the period
    if period_ms <= 0:
        raise _fail(path, None, "the trace has zero duration (the last timestamp must be > 0 ms)")
    bin_ms = opts.mahimahi_bin_s * 1000.0
    nbins = max(math.ceil(period_ms / bin_ms - 1e-9), 1)
    edges_ms = np.minimum(np.arange(nbins + 1, dtype=np.float64) * bin_ms, period_ms)
    edges_ms[-1] = period_ms
    index = np.minimum((ms / bin_ms).astype(np.int64), nbins - 1)
    counts = np.bincount(index, minlength=nbins).astype(np.float64)
    widths_s = np.diff(edges_ms) / 1000.0
    bw = counts * MAHIMAHI_PACKET_BITS / widths_s
    return [_make_trace(path, edges_ms / 1000.0, bw, np.array([len(tokens)]), opts, _trace_name(path))]


def _nonblank(text: str) -> Iterator[str]:
    return (line for line in text.splitlines() if line.strip())


def _json_list_items(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """Items of a top-level JSON list with the line each starts on."""
    decoder = json.JSONDecoder()
    n = len(text)
    pos = _skip_ws(text, 0)
    if pos >= n or text[pos] != "[":
        raise _fail(path, _line_of(text, pos), "expected a JSON list ('[')")
    pos = _skip_ws(text, pos + 1)
    if pos < n and text[pos] == "]":
        _expect_end(text, pos + 1, path)
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _fail(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
        yield _line_of(text, pos), item
        pos = _skip_ws(text, end)
        if pos < n and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < n and text[pos] == "]":
            _expect_end(text, pos + 1, path)
            return
        raise _fail(path, _line_of(text, pos), "invalid JSON: expected ',' or ']' in the list")


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _expect_end(text: str, pos: int, path: str) -> None:
    pos = _skip_ws(text, pos)
    if pos < len(text):
        raise _fail(path, _line_of(text, pos), "invalid JSON: extra data after the list")


def _read_sabre(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    durations: list[float] = []
    values: list[float] = []
    lines: list[int] = []
    for lineno, item in _json_list_items(text, path):
        if not isinstance(item, dict):
            raise _fail(path, lineno, f"expected an object with duration_ms and bandwidth_kbps, got "
                                      f"{type(item).__name__}")
        for key in ("duration_ms", "bandwidth_kbps"):
            if key not in item:
                raise _fail(path, lineno, f"missing {key!r}")
        duration = item["duration_ms"]
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration):
            raise _fail(path, lineno, f"duration_ms must be a finite number, got {duration!r}")
        if duration < 0:
            raise _fail(path, lineno, f"duration_ms is negative: {duration!r}")
        values.append(_json_bandwidth(item["bandwidth_kbps"], path, lineno, "kbps"))
        durations.append(float(duration))
        lines.append(lineno)
    if not durations:
        raise _fail(path, None, "the JSON list has no periods")
    times = np.concatenate([[0.0], np.cumsum(durations)]) / 1000.0
    return [_make_trace(path, times, np.array(values) * 1e3, np.array(lines), opts, _trace_name(path))]


def _read_oboe(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    rows: list[tuple[int, float, float]] = []
    for lineno, fields in _numbered_lines(text):
        if len(fields) != 2:
            raise _fail(path, lineno, f"expected '<t_ms> <kbps>' (2 fields), got {len(fields)}: "
                                      f"{' '.join(fields)[:80]!r}")
        t = _number(fields[0], path, lineno, "time (ms)")
        v = _bandwidth(fields[1], path, lineno, "kbps")
        if rows and t < rows[-1][1]:
            raise _fail(path, lineno, f"time {t} ms is before the previous line's {rows[-1][1]} ms "
                                      "(timestamps must not decrease)")
        rows.append((lineno, t, v))
    if not rows:
        raise _fail(path, None, "no samples (the file is empty or blank)")
    if len(rows) % 2:
        raise _fail(path, rows[-1][0], f"odd number of lines ({len(rows)}): oboe lines come in "
                                       "(start, end) pairs")
    times: list[float] = []
    values: list[float] = []
    for k in range(0, len(rows), 2):
        (l0, s, v0), (l1, e, v1) = rows[k], rows[k + 1]
        if v0 != v1:
            raise _fail(path, l1, f"a chunk's end line carries {v1} kbps but its start line (line {l0}) "
                                  f"{v0} kbps; both lines of a pair must carry the chunk's bandwidth")
        if times:  # gap between the previous chunk's end and this chunk's start: mean of the neighbours
            values.append((values[-1] + v0) / 2.0)
            times.append(s)
        else:
            times.append(s)
        values.append(v0)
        times.append(e)
    return [_make_trace(path, np.array(times) / 1000.0, np.array(values) * 1e3, np.array([r[0] for r in rows]), opts,
                        _trace_name(path))]


def _read_cachegen(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    traces: list[Trace] = []
    base = _trace_name(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, lineno, f"invalid JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("bw"), list):
            raise _fail(path, lineno, 'expected {"bw": [Gbps, ...]}')
        if not obj["bw"]:
            raise _fail(path, lineno, "'bw' is empty")
        gbps = [_json_bandwidth(v, path, lineno, "Gbps") for v in obj["bw"]]
        bps = np.array(gbps) * 1e9 * opts.bandwidth_scale
        traces.append(ChunkTrace(bps, opts.chunk_duration_s, name=f"{base}#{len(traces)}", source=path,
                                 wrap=opts.wrap))
    if not traces:
        raise _fail(path, None, "no traces (the file is empty or blank)")
    return traces


def _read_kvcast(text: str, path: str, opts: ReadOptions) -> list[Trace]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    try:
        trace = Trace.from_jsonable(obj)
    except TraceError as exc:
        raise _fail(path, None, exc.reason) from None
    if not trace.name:
        trace = trace.with_name(_trace_name(path))
    if opts.bandwidth_scale != 1.0:
        trace = trace.scaled(opts.bandwidth_scale)
    return [trace]


FORMATS: Mapping[str, TraceFormat] = MappingProxyType({
    f.name: f for f in (
        TraceFormat("pensieve_time_mbps", "'<time_s> <Mbps>' lines; line i holds over (t[i-1], t[i]]",
                    _read_pensieve),
        TraceFormat("mahimahi_pkt_ms", "one ms timestamp per line = one 1500-byte opportunity",
                    _read_mahimahi),
        TraceFormat("sabre_json", "JSON list of {duration_ms, bandwidth_kbps, latency_ms}", _read_sabre),
        TraceFormat("oboe_pair_ms_kbps", "'<t_ms> <kbps>' (start, end) line pairs; gaps interpolated",
                    _read_oboe),
        TraceFormat("cachegen_jsonl_gbps", 'JSON Lines {"bw": [Gbps per KV chunk]}', _read_cachegen),
        TraceFormat("kvcast_json", "kvcast's own JSON trace (Trace.to_jsonable)", _read_kvcast),
    )
})
"""The known formats by name (read-only)."""


# ---------------------------------------------------------------------------------------------- detection
def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise _fail(str(path), None, "is a directory, not a trace file") from None
    except OSError as exc:
        raise _fail(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise _fail(str(path), None, "the file is empty")
    if b"\x00" in data:
        raise _fail(str(path), _line_of_bytes(data, data.index(b"\x00")), "binary data (NUL byte): "
                                                                           "not a text trace file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(str(path), _line_of_bytes(data, exc.start), "not UTF-8 text") from None


def _line_of_bytes(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _manifest_format(path: Path, cache: dict[Path, dict[str, str] | None]) -> str | None:
    """The format listed for ``path`` in a MANIFEST.tsv of its folder or an ancestor folder, if any."""
    resolved = path.resolve()
    for folder in resolved.parents:
        manifest = folder / "MANIFEST.tsv"
        if manifest not in cache:
            cache[manifest] = _parse_manifest(manifest) if manifest.is_file() else None
        rows = cache[manifest]
        if rows is not None:
            fmt = rows.get(resolved.relative_to(folder).as_posix())
            if fmt is not None:
                return fmt
    return None


def _parse_manifest(manifest: Path) -> dict[str, str] | None:
    try:
        with manifest.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or "path" not in reader.fieldnames or "format" not in reader.fieldnames:
                return None
            return {row["path"]: row["format"] for row in reader
                    if row.get("path") and row.get("format") in FORMATS}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # a manifest is only a hint; content detection still applies


def _sniff(text: str, path: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "sabre_json"
    if stripped.startswith("{"):
        first = stripped.split("\n", 1)[0]
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "bw" in obj:
            return "cachegen_jsonl_gbps"
        return "kvcast_json"
    rows = list(_numbered_lines(text))
    widths = {len(fields) for _, fields in rows}
    if widths == {1}:
        return "mahimahi_pkt_ms"
    if widths == {2}:
        if len(rows) >= 4 and len(rows) % 2 == 0 and all(
                rows[k][1][1] == rows[k + 1][1][1] for k in range(0, len(rows), 2)):
            return "oboe_pair_ms_kbps"
        return "pensieve_time_mbps"
    lineno, fields = next(((n, f) for n, f in rows if len(f) not in (1, 2)), rows[0])
    raise _fail(path, lineno, f"unrecognised trace format (line has {len(fields)} fields: "
                              f"{' '.join(fields)[:80]!r}); pass format= one of {', '.join(FORMATS)}")


def detect_format(path: str | os.PathLike[str], *, use_manifest: bool = True) -> str:
    """The format name of a trace file: from a MANIFEST.tsv listing it, else from its content."""
    path = Path(path)
    if use_manifest:
        fmt = _manifest_format(path, {})
        if fmt is not None:
            return fmt
    return _sniff(_read_text(path), str(path))


# ---------------------------------------------------------------------------------------------- loading
def _options(options: ReadOptions | None, overrides: dict[str, Any]) -> ReadOptions:
    base = options or ReadOptions()
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    return ReadOptions(**{**base.__dict__, **given})


def read_trace_file(path: str | os.PathLike[str], *, format: str | None = None,
                    options: ReadOptions | None = None,
                    _manifest_cache: dict[Path, dict[str, str] | None] | None = None) -> TraceFile:
    """Read every trace of one file (format from ``format=``, a MANIFEST.tsv, or the content)."""
    path = Path(path)
    opts = options or ReadOptions()
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown trace format {format!r}; known: {', '.join(FORMATS)}")
    text = _read_text(path)
    fmt = format
    if fmt is None:
        fmt = _manifest_format(path, {} if _manifest_cache is None else _manifest_cache)
    if fmt is None:
        fmt = _sniff(text, str(path))
    try:
        traces = FORMATS[fmt].read(text, str(path), opts)
    except TraceError as exc:
        if exc.path is None:  # a Trace-level error: attach the file
            raise _fail(str(path), None, f"{exc} (read as {fmt})") from None
        raise
    return TraceFile(path=path, format=fmt, traces=tuple(traces))


def load_trace(path: str | os.PathLike[str], *, format: str | None = None, index: int | None = None,
               options: ReadOptions | None = None, chunk_duration_s: float | None = None,
               mahimahi_bin_s: float | None = None, bandwidth_scale: float | None = None,
               wrap: bool | None = None) -> Trace:
    """Read one trace from a file.

    Files with several traces (``cachegen_jsonl_gbps``) need ``index=`` (0-based); the keyword options
    override the fields of ``options`` (see :class:`ReadOptions`).
    """
    opts = _options(options, {"chunk_duration_s": chunk_duration_s, "mahimahi_bin_s": mahimahi_bin_s,
                                  "bandwidth_scale": bandwidth_scale, "wrap": wrap})
    tf = read_trace_file(path, format=format, options=opts)
    if index is None:
        if len(tf.traces) != 1:
            raise TraceError(f"holds {len(tf.traces)} traces ({tf.format}); pass index= (0 to "
                             f"{len(tf.traces) - 1}) or use load_traces()", path=str(path))
        return tf.traces[0]
    if not -len(tf.traces) <= index < len(tf.traces):
        raise TraceError(f"trace index {index} out of range: the file holds {len(tf.traces)} traces",
                         path=str(path))
    return tf.traces[index]


def iter_trace_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                     recursive: bool = True) -> list[Path]:
    """Files named, plus the trace files inside folders named (sorted; hidden files, README/MANIFEST and
    other non-trace suffixes such as .md .tsv .png .py are left out)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(f for f in found if f.is_file() and _looks_like_trace(f, p)))
        else:
            out.append(p)
    return out


def _looks_like_trace(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts
    if any(part.startswith(".") or part == "__pycache__" for part in rel):
        return False
    return path.suffix.lower() not in _IGNORED_SUFFIXES and not path.name.upper().startswith("README")


def load_traces(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, recursive: bool = True,
                on_error: Literal["raise", "skip"] = "raise", format: str | None = None,
                options: ReadOptions | None = None, progress: bool = False,
                chunk_duration_s: float | None = None, mahimahi_bin_s: float | None = None,
                bandwidth_scale: float | None = None, wrap: bool | None = None) -> LoadResult:
    """Read all traces of the given files and folders (recursively by default).

    With ``on_error="skip"`` a file that cannot be read is recorded in ``skipped`` as (path, error) and the
    sweep goes on; with ``"raise"`` the first error is raised. ``progress`` shows a tqdm bar.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    opts = _options(options, {"chunk_duration_s": chunk_duration_s, "mahimahi_bin_s": mahimahi_bin_s,
                                  "bandwidth_scale": bandwidth_scale, "wrap": wrap})
    files = iter_trace_paths(paths, recursive=recursive)
    manifest_cache: dict[Path, dict[str, str] | None] = {}
    result = LoadResult([], [], [])
    iterator: Iterable[Path] = files
    if progress:
        from tqdm import tqdm
        iterator = tqdm(files, desc="reading traces", unit="file")
    for path in iterator:
        try:
            tf = read_trace_file(path, format=format, options=opts, _manifest_cache=manifest_cache)
        except Exception as exc:
            if on_error == "raise":
                raise
            if not isinstance(exc, TraceError):
                exc = TraceError(f"unexpected {type(exc).__name__}: {exc}", path=str(path))
            result.skipped.append((path, exc))
            continue
        result.files.append(tf)
        result.traces.extend(tf.traces)
    return result
