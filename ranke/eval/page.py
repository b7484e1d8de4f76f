"""The report as a page: `report.md` and its self-contained, responsive twin `report.html` (images inlined)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Report:
    title: str
    intro: str
    sections: list[tuple[str, str]]  # (heading, markdown body); images as ![caption](file.png), one per line


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """`report.md` and its self-contained HTML twin in `out`."""
    markdown = [f"# {report.title}", "", report.intro, ""]
    for heading, body in report.sections:
        markdown += [f"## {heading}", "", body, ""]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(markdown))
    html_path.write_text(_html(report, out))
    return md_path, html_path


def _text(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _image_lines(lines: list[str], i: int) -> tuple[list[tuple[str, str]], int]:
    images = []
    while i < len(lines) and lines[i].startswith("![") and "](" in lines[i]:
        caption, src = lines[i][2:].rsplit("](", 1)
        images.append((caption, src.rstrip(")")))
        i += 1
    return images, i


def _inline(text: str, out: Path) -> str:
    """Minimal markdown-to-HTML for what reports use: paragraphs, tables, images, code, lists."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i].replace("|", "").strip()) <= {"-", ":"}:
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head = "".join(f"<th>{_text(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f'<td data-label="{html.escape(h)}">{_text(c)}</td>' for h, c in zip(rows[0], row)) + "</tr>"
                for row in rows[1:]
            )
            blocks.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
            continue
        if line.startswith("![") and "](" in line:
            images, i = _image_lines(lines, i)
            figures = []
            for caption, src in images:
                data = base64.b64encode((out / src).read_bytes()).decode()
                figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{_text(caption)}</figcaption></figure>")  # fmt: skip
            css = "figures" if len(figures) > 1 else "figures single"
            blocks.append(f'<div class="{css}">' + "".join(figures) + "</div>")
            continue
        if line.startswith("```"):
            code = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                code.append(html.escape(lines[i]))
                i += 1
            blocks.append("<pre>" + "\n".join(code) + "</pre>")
        elif line.startswith("* "):
            items = []
            while i < len(lines) and lines[i].startswith("* "):
                items.append(f"<li>{_text(lines[i][2:])}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            blocks.append(f"<p>{_text(line)}</p>")
        i += 1
    return "\n".join(blocks)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:16px;line-height:1.5;max-width:1100px;
margin:1.5em auto;padding:0 1em;color:#1f2328}
h1{font-size:1.6em;line-height:1.25}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;background:#f2f4f6;padding:0 .25em;border-radius:3px}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.table{overflow-x:auto;margin:1em 0}
table{border-collapse:collapse;font-size:.9em;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:1.2em;margin:1em 0}
.figures.single{grid-template-columns:minmax(0,760px)}
figure{margin:0}img{max-width:100%;height:auto;display:block}
figcaption{font-size:.88em;color:#57606a;margin-top:.3em}
@media (max-width:700px){
body{margin:.8em auto;padding:0 .7em}
table,thead,tbody,tr,td{display:block}thead{display:none}
tr{border:1px solid #d0d7de;border-radius:6px;margin:0 0 .8em;padding:.3em .5em}
td{display:flex;justify-content:space-between;gap:.8em;border:none;border-bottom:1px solid #eef0f2;padding:3px 0;text-align:right}
td:last-child{border-bottom:none}
td::before{content:attr(data-label);flex:0 0 50%;text-align:left;font-weight:600;color:#57606a}
td:first-child{font-weight:600}
}
"""


def _html(report: Report, out: Path) -> str:
    parts = [f"<h1>{_text(report.title)}</h1>", _inline(report.intro, out)]
    for heading, body in report.sections:
        parts += [f"<h2>{_text(heading)}</h2>", _inline(body, out)]
    head = ('<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{STYLE}</style>")  # fmt: skip
    return f"<!doctype html><html lang=\"en\"><head>{head}</head><body>{''.join(parts)}</body></html>"
