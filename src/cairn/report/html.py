"""One self-contained HTML page: inline CSS, images embedded as base64 data URIs, no scripts.

The page must open from a file, an e-mail attachment or an air-gapped machine, so it references
nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from cairn.report.tables import Table, to_html

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2330; background: #f6f7f9; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
header { background: #1f3a5f; color: #fff; padding: 22px 32px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; opacity: .85; }
h2 { border-bottom: 2px solid #1f3a5f; padding-bottom: 4px; margin-top: 40px; }
h3 { margin: 28px 0 8px; color: #1f3a5f; }
section.card { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 8px 24px 20px;
               margin: 24px 0; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
table.results { border-collapse: collapse; margin: 8px 0 4px; font-size: 13px; font-variant-numeric: tabular-nums; }
table.results caption { text-align: left; font-weight: 600; padding: 4px 0 6px; white-space: nowrap; }
table.results th, table.results td { padding: 4px 9px; border-bottom: 1px solid #e6e8ec; }
table.results thead th { background: #eef1f5; border-bottom: 2px solid #c9cfd8; text-align: right; }
table.results thead th:first-child, table.results tbody th { text-align: left; font-weight: 500; }
table.results td.num { text-align: right; }
table.results tr.summary { background: #fafbfc; font-weight: 600; }
table.results tr.summary:first-of-type, table.results tr.summary + tr:not(.summary) { border-top: 2px solid #c9cfd8; }
td.neg { color: #b3261e; } td.pos { color: #1b7f3b; }
.scroll { overflow-x: auto; }
p.note { color: #5b6473; font-size: 12.5px; margin: 2px 0 10px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 10px 0; }
dl.meta dt { color: #5b6473; } dl.meta dd { margin: 0; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #e6e8ec; border-radius: 4px; background: #fff; }
figcaption { color: #5b6473; font-size: 13px; }
details { margin: 10px 0; } summary { cursor: pointer; color: #1f3a5f; font-weight: 600; }
pre { background: #f3f4f6; border: 1px solid #e1e4e8; border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      font-size: 12.5px; line-height: 1.4; }
.warn { background: #fff4e5; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 14px; }
"""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Section:
    """A titled block of the page: metadata, tables, figures, collapsible text blocks."""

    title: str
    meta: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)  # (summary, preformatted text)
    warnings: list[str] = field(default_factory=list)


def img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _section(s: Section) -> str:
    out = [f'<section class="card"><h2>{html.escape(s.title)}</h2>']
    out += [f'<p class="warn">{html.escape(w)}</p>' for w in s.warnings]
    if s.meta:
        out.append('<dl class="meta">' + "".join(
            f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in s.meta) + "</dl>")
    for t in s.tables:
        out.append(f'<div class="scroll">{to_html(t)}</div>')
    for f in s.figures:
        out.append(f"<figure>{img_tag(f.path, f.caption)}<figcaption>{html.escape(f.caption)}</figcaption></figure>")
    for summary, text in s.details:
        out.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    body = "\n".join(_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>\n"
        f"<main>\n{body}\n</main></body></html>\n"
    )


def pretty_json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
