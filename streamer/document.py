"""A small report document: headings, paragraphs, lists, tables and images, written as Markdown and as one
self-contained HTML file (inline CSS, images embedded as base64 ``data:`` URIs: it opens offline, loads nothing).

Inline text may use Markdown's ``**bold**`` and ```code``` spans; the HTML writer escapes everything else.

>>> doc = Document("Report")
>>> doc.paragraph("Sizes in **bytes**; see `report.json`.")
>>> doc.table(["level", "bytes"], [["int8", "1,024"]], align="lr")
>>> print(doc.markdown())
# Report
<BLANKLINE>
Sizes in **bytes**; see `report.json`.
<BLANKLINE>
| level | bytes |
|---|---:|
| int8 | 1,024 |
<BLANKLINE>
>>> "<strong>bytes</strong>" in doc.html() and "<code>report.json</code>" in doc.html()
True
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Document"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 76rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .88rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .5rem; }
th { background: #f4f4f6; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f6; padding: 0 .2rem; border-radius: 3px; font-size: .92em; }
pre { background: #f4f4f6; padding: .6rem; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
"""


@dataclass
class _Block:
    kind: str
    text: str = ""
    level: int = 0
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    align: str = ""
    path: Path | None = None


def _inline_html(text: str) -> str:
    """Escape `text` for HTML, then turn ``**bold**`` and ```code``` into tags."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Document:
    """A report built block by block; `markdown` and `html` write it. Images are files; the Markdown links them by
    name (relative to the report), the HTML embeds their bytes."""

    def __init__(self, title: str, base: Path | None = None) -> None:
        self.title = title
        self.base = base
        """The report's folder: the Markdown links images by their path relative to it (their name without one)."""
        self.blocks: list[_Block] = [_Block("heading", title, level=1)]

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(_Block("heading", text, level=level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(_Block("bullets", items=list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(_Block("code", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> None:
        """A table; `align` has one letter per column, ``l`` or ``r`` (default: the first left, the rest right)."""
        align = align or "l" + "r" * (len(headers) - 1)
        if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
            raise ValueError("every row and the alignment need one entry per header")
        self.blocks.append(_Block("table", headers=[str(h) for h in headers],
                                  rows=[[str(c) for c in r] for r in rows], align=align))

    def image(self, path: Path, caption: str) -> None:
        """An image file (PNG) in the report's folder (`base`) or below it: the Markdown links it, the HTML embeds
        it."""
        self.blocks.append(_Block("image", caption, path=Path(path)))

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b.kind == "heading":
                out.append(f"{'#' * b.level} {b.text}")
            elif b.kind == "paragraph":
                out.append(b.text)
            elif b.kind == "bullets":
                out.append("\n".join(f"* {item}" for item in b.items))
            elif b.kind == "code":
                out.append(f"```\n{b.text}\n```")
            elif b.kind == "table":
                lines = ["| " + " | ".join(_cell(h) for h in b.headers) + " |",
                         "|" + "|".join("---:" if a == "r" else "---" for a in b.align) + "|"]
                lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b.rows]
                out.append("\n".join(lines))
            elif b.kind == "image":
                assert b.path is not None
                link = (b.path.name if self.base is None
                        else b.path.resolve().relative_to(self.base.resolve()).as_posix())
                out.append(f"![{b.text}]({link})\n\n*{b.text}*")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        body: list[str] = []
        for b in self.blocks:
            if b.kind == "heading":
                body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
            elif b.kind == "paragraph":
                body.append(f"<p>{_inline_html(b.text)}</p>")
            elif b.kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
            elif b.kind == "code":
                body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
            elif b.kind == "table":
                def cls(a: str) -> str:
                    return ' class="r"' if a == "r" else ""

                head = "".join(f"<th{cls(a)}>{_inline_html(h)}</th>" for h, a in zip(b.headers, b.align))
                rows = "".join("<tr>" + "".join(f"<td{cls(a)}>{_inline_html(c)}</td>" for c, a in zip(row, b.align))
                               + "</tr>" for row in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b.kind == "image":
                assert b.path is not None
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b.text, quote=True)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{_inline_html(b.text)}</figcaption>'
                            "</figure>")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")
