"""report.md (figures beside it in figures/), a self-contained report.html (figures inline) and report.json."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from edgekd.report.tables import Table


@dataclass
class Figure:
    name: str  # file stem under figures/
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    scale: list[tuple[str, str, str]]  # (what, these runs, the paper)
    scale_warning: str | None
    legend: str
    tables: list[Table]
    sections: list[Section]
    not_included: list[str]
    source: str
    omitted: list[str] = field(default_factory=list)  # "title: why it has no rows"


# ----- markdown -----------------------------------------------------------------------------------------

def markdown(report: Report) -> str:
    out = [f"# {report.title}", "", report.source, ""]
    if report.scale_warning:
        out += [f"> **{report.scale_warning}**", ""]
    if _with_paper(report):
        out += ["| scale | these runs | the paper |", "|---|---|---|"]
        out += [f"| {what} | {ours} | {theirs} |" for what, ours, theirs in report.scale]
    else:
        out += ["| scale | these runs |", "|---|---|"] + [f"| {what} | {ours} |" for what, ours, _ in report.scale]
    out += ["", report.legend]
    for table in report.tables:
        out += ["", f"## {table.title}", "", _md_table(table)]
        out += [""] + [f"- {note}" for note in table.notes] if table.notes else []
    if report.omitted:
        out += ["", "Tables not shown (no rows): " + " ".join(report.omitted)]
    for section in report.sections:
        out += ["", f"## {section.title}", ""]
        out += [section.intro, ""] if section.intro else []
        out += [f"![{figure.title}](figures/{figure.name}.png)\n" for figure in section.figures]
        out += [f"- {note}" for note in section.notes]
    if report.not_included:
        out += ["", "## Not included", ""] + [f"- {line}" for line in report.not_included]
    return "\n".join(out).rstrip() + "\n"


def _with_paper(report: Report) -> bool:
    return any(theirs is not None for _, _, theirs in report.scale)


def _md_table(table: Table) -> str:
    if not table.rows:
        return "(no rows)"
    lines = ["| " + " | ".join(c.header for c in table.columns) + " |",
             "|" + "|".join("---" if c.key in TEXT_COLUMNS else "---:" for c in table.columns) + "|"]
    lines += ["| " + " | ".join(table.cell(row, c) for c in table.columns) + " |" for row in table.rows]
    return "\n".join(lines)


# ----- html ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: .6em 1em; font-weight: 600; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; } th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td { white-space: nowrap; }
td.model { white-space: normal; }
th.paper, td.paper { background: #eef2f7; color: #445; font-style: italic; }
.notes { font-size: .85em; color: #555; } .source { color: #666; font-size: .9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; max-width: calc(50% - 1em); }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: .8em; color: #555; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


TEXT_COLUMNS = ("run", "model", "precision")


def _inline(text: str) -> str:
    """Escaped text with `code` spans, the one markdown feature the notes use."""
    parts = html.escape(text, quote=False).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{e(report.title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(report.title)}</h1>",
           f"<p class='source'>{e(report.source)}</p>"]
    if report.scale_warning:
        out.append(f"<p class='warning'>{e(report.scale_warning)}</p>")
    paper = _with_paper(report)
    out.append("<table><tr><th>scale</th><th>these runs</th>" + ("<th class='paper'>the paper</th>" if paper else "")
               + "</tr>")
    out += [f"<tr><td>{e(w)}</td><td>{e(o)}</td>" + (f"<td class='paper'>{e(t)}</td>" if paper else "") + "</tr>"
            for w, o, t in report.scale]
    out += ["</table>", f"<p class='notes'>{_inline(report.legend)}</p>"]
    for table in report.tables:
        out += [f"<h2 id='table-{table.key}'>{e(table.title)}</h2>", _html_table(table)]
        out += ["<ul class='notes'>" + "".join(f"<li>{_inline(n)}</li>" for n in table.notes) + "</ul>"] if table.notes else []
    if report.omitted:
        out.append("<p class='notes'>Tables not shown (no rows): " + " ".join(map(_inline, report.omitted)) + "</p>")
    for section in report.sections:
        out.append(f"<h2>{e(section.title)}</h2>")
        out += [f"<p>{_inline(section.intro)}</p>"] if section.intro else []
        out.append("<div class='figures'>")
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode("ascii")
            caption = f"<figcaption>{_inline(figure.caption)}</figcaption>" if figure.caption else ""
            out.append(f"<figure><img alt='{e(figure.title)}' src='data:image/png;base64,{data}'>{caption}</figure>")
        out.append("</div>")
        out += ["<ul class='notes'>" + "".join(f"<li>{_inline(n)}</li>" for n in section.notes) + "</ul>"] if section.notes else []
    if report.not_included:
        out += ["<h2>Not included</h2>", "<ul class='notes'>" + "".join(f"<li>{_inline(n)}</li>" for n in report.not_included)
                + "</ul>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    if not table.rows:
        return "<p class='notes'>(no rows)</p>"
    e = html.escape
    head = "".join(f"<th class='{'paper' if c.paper else ''}'>{e(c.header)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for c in table.columns:
            kind = " ".join(k for k, on in (("paper", c.paper), ("num", c.key not in TEXT_COLUMNS),
                                            ("model", c.key == "model")) if on)
            cells.append(f"<td class='{kind}'>{e(table.cell(row, c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
