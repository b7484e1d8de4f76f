"""The report as a page: `report.md` and its self-contained, responsive twin `report.html`.

The HTML is the Markdown rendered by Python-Markdown (with its `tables` and `fenced_code`
extensions) and `ReportExtension`, for what a report page adds: its images inlined from the
report's folder, a paragraph of images (one per line) as a grid of captioned figures, and tables
that scroll on a narrow screen and become cards of labelled values on a phone.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import xml.etree.ElementTree as etree
from dataclasses import dataclass
from pathlib import Path

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor


@dataclass
class Report:
    title: str
    intro: str
    sections: list[tuple[str, str]]  # (heading, markdown body); images as ![caption](file.png), one per line

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", self.intro, ""]
        for heading, body in self.sections:
            lines += [f"## {heading}", "", body, ""]
        return "\n".join(lines)


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """`report.md` and its self-contained HTML twin in `out`."""
    text = report.markdown()
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(text)
    html_path.write_text(render_html(report.title, text, out))
    return md_path, html_path


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:16px;line-height:1.5;max-width:1100px;
margin:1.5em auto;padding:0 1em;color:#1f2328}
h1{font-size:1.6em;line-height:1.25}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;background:#f2f4f6;padding:0 .25em;border-radius:3px}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
pre code{font:inherit;background:none;padding:0}
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


def render_html(title: str, text: str, folder: Path) -> str:
    """Markdown `text` as one HTML page that needs no other file (its images, read from `folder`, inlined)."""
    extensions = ["tables", "fenced_code", ReportExtension(folder)]
    body = markdown.markdown(text, extensions=extensions, output_format="html")
    head = ('<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>")  # fmt: skip
    return f'<!doctype html><html lang="en"><head>{head}</head><body>{body}</body></html>'


class ReportExtension(Extension):
    """A report's text is shown as written (raw HTML is escaped: a prompt or a note is text); its
    images are inlined and grouped into figures; its tables are labelled."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        # below the inline processor (20): images and cells are elements by then
        md.treeprocessors.register(FiguresProcessor(md, self.folder), "report_figures", 15)
        md.treeprocessors.register(TablesProcessor(md), "report_tables", 14)


class FiguresProcessor(Treeprocessor):
    """Every image inlined as a data URI of its file in the report's folder; a paragraph of images
    alone becomes `<div class="figures">` (or "figures single") of `<figure>`s captioned with their
    alt text, a responsive grid (STYLE)."""

    def __init__(self, md: markdown.Markdown, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root: etree.Element) -> None:
        for image in root.iter("img"):
            image.set("src", data_uri(self.folder / image.get("src")))
        for paragraph in [p for p in root.iter("p") if _images_alone(p)]:
            images, tail = list(paragraph), paragraph.tail
            paragraph.clear()
            paragraph.tag, paragraph.tail = "div", tail
            paragraph.set("class", "figures" if len(images) > 1 else "figures single")
            for image in images:
                image.tail = None
                figure = etree.SubElement(paragraph, "figure")
                figure.append(image)
                etree.SubElement(figure, "figcaption").text = image.get("alt")


def _images_alone(paragraph: etree.Element) -> bool:
    """Whether a paragraph holds images and nothing else (only the line breaks between them)."""
    blank = [paragraph.text, *(image.tail for image in paragraph)]
    return len(paragraph) > 0 and all(child.tag == "img" for child in paragraph) and not "".join(filter(None, blank)).strip()


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


class TablesProcessor(Treeprocessor):
    """Each table in a `<div class="table">` (it scrolls sideways on a narrow screen) and each
    cell labelled with its column's header (`data-label`), which the phone layout (STYLE) shows
    beside the value, a row becoming a card."""

    def run(self, root: etree.Element) -> None:
        for parent in list(root.iter()):
            for index, table in enumerate(parent):
                if table.tag == "table":
                    _label_cells(table)
                    wrapper = etree.Element("div", {"class": "table"})
                    wrapper.tail, table.tail = table.tail, None
                    parent[index] = wrapper
                    wrapper.append(table)


def _label_cells(table: etree.Element) -> None:
    headers = ["".join(header.itertext()).strip() for header in table.iter("th")]
    for row in table.iter("tr"):
        for header, cell in zip(headers, row.findall("td")):
            cell.set("data-label", header)
