"""The report as a document: sections of text, tables and plots, rendered to Markdown and HTML.

report.md links its figures (figures/*.png); report.html embeds them as base64 PNG, so the one
file can be mailed or opened anywhere. Every table's numbers go to tables/<name>.csv.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from boatray.results import atomic_write_bytes, atomic_write_text

DASH = "–"


@dataclass
class Table:
    """A table: `data` (numbers, saved as CSV) shown as `shown`, or only saved when None."""

    name: str
    data: pd.DataFrame
    shown: pd.DataFrame | None = None


@dataclass
class Plot:
    """A figure, saved as figures/<name>.png."""

    name: str
    png: bytes
    caption: str


@dataclass
class Code:
    """A preformatted block (e.g. the config as YAML)."""

    text: str


@dataclass
class Section:
    """A titled part of the report: paragraphs (str), bullet lists (list[str]), and the rest."""

    title: str
    blocks: list[str | list[str] | Table | Plot | Code] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def format_frame(frame: pd.DataFrame, formats: dict[str, str] | None = None,
                 default: str = "{:.3f}") -> pd.DataFrame:
    """Numbers to strings: floats by `formats[column]` (else `default`), missing as a dash."""
    formats = formats or {}

    def cell(value, spec):
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return DASH
        if isinstance(value, float):
            return spec.format(value)
        return str(value)

    return pd.DataFrame({column: [cell(v, formats.get(str(column), default))
                                  for v in frame[column].tolist()]
                         for column in frame.columns}, index=frame.index)


def markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown (figures linked from figures/)."""
    lines = [f"# {title}", ""]
    lines += [f"- [{s.title}](#{s.anchor})" for s in sections] + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, str):
                lines += [block, ""]
            elif isinstance(block, list):
                lines += [f"- {item}" for item in block] + [""]
            elif isinstance(block, Table):
                if block.shown is not None:
                    lines += [_markdown_table(block.shown), ""]
                lines += [f"(CSV: `tables/{block.name}.csv`)", ""]
            elif isinstance(block, Plot):
                lines += [f"![{block.caption}](figures/{block.name}.png)", "",
                          f"*{block.caption}*", ""]
            elif isinstance(block, Code):
                lines += ["```yaml", block.text.rstrip(), "```", ""]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> str:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    head = [row(frame.columns), row(["---"] * len(frame.columns))]
    return "\n".join(head + [row(values) for values in frame.itertuples(index=False)])


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1350px; margin: 2em auto; padding: 0 1em;
       color: #1d2330; line-height: 1.45; }
h1 { border-bottom: 2px solid #2b5c8a; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #2b5c8a; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.86em; }
th, td { border: 1px solid #ccd; padding: .3em .6em; text-align: left; }
th { background: #eef2f7; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8f9fb; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f4f4f4; padding: 1em; overflow-x: auto; font-size: 0.85em; }
nav ul { columns: 2; }
.csv { font-size: 0.8em; color: #777; }
"""


def html_page(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (figures embedded)."""
    esc = html.escape
    parts = [(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
              f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"),
             f"<h1>{esc(title)}</h1>", "<nav><ul>"]
    parts += [f'<li><a href="#{s.anchor}">{esc(s.title)}</a></li>' for s in sections]
    parts.append("</ul></nav>")
    for section in sections:
        parts.append(f'<section id="{section.anchor}"><h2>{esc(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, str):
                parts.append(f"<p>{esc(block)}</p>")
            elif isinstance(block, list):
                parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block) + "</ul>")
            elif isinstance(block, Table):
                if block.shown is not None:
                    parts.append(_html_table(block.shown))
                parts.append(f'<p class="csv">CSV: tables/{esc(block.name)}.csv</p>')
            elif isinstance(block, Plot):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<figure><img alt="{esc(block.caption)}" '
                             f'src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, Code):
                parts.append(f"<pre>{esc(block.text)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


NUMBER = re.compile(r"^[-+0-9.,e x±%\[\]–]+$")


def _html_table(frame: pd.DataFrame) -> str:
    """A plain HTML table; cells that read as numbers are right-aligned."""
    def cell(tag: str, value) -> str:
        text = str(value)
        kind = ' class="num"' if NUMBER.match(text) else ""
        return f"<{tag}{kind}>{html.escape(text)}</{tag}>"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write(out_dir: Path, title: str, sections: list[Section]) -> Path:
    """Write report.md, report.html, figures/*.png and tables/*.csv (each atomically); the
    CSVs and figures of an earlier report that this one does not have are removed."""
    written = set()
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Table):
                keep_index = not isinstance(block.data.index, pd.RangeIndex)
                written.add(atomic_write_text(out_dir / "tables" / f"{block.name}.csv",
                                              block.data.to_csv(index=keep_index)))
            elif isinstance(block, Plot):
                written.add(atomic_write_bytes(out_dir / "figures" / f"{block.name}.png",
                                               block.png))
    for folder, pattern in (("tables", "*.csv"), ("figures", "*.png")):
        for stale in set((out_dir / folder).glob(pattern)) - written:
            stale.unlink()
    atomic_write_text(out_dir / "report.md", markdown(title, sections))
    return atomic_write_text(out_dir / "report.html", html_page(title, sections))
