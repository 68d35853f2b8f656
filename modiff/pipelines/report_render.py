"""One document, two renderings: Markdown (index.md) and self-contained HTML (index.html, inline style,
no script, images referenced beside the page), built block by block so both say the same thing."""
from __future__ import annotations

import html
import re
from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["Document", "duration", "cell_text"]

VERDICT_CLASSES = {"reproduced": "ok", "partly": "partly", "not reproduced": "no", "inconclusive": "none",
                   "not measured": "none"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .5em;
vertical-align:top;text-align:left}th{background:#f3f3f3}.scroll{overflow-x:auto}
figure{margin:1em 0}figure img{max-width:min(100%,900px);height:auto;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
.small{font-size:.85em;color:#444}.finding{background:#f6f8fa;border-left:4px solid #5b8def;padding:.3em 1em;margin:1em 0}
.finding.missing{border-left-color:#999;color:#666}.banner{background:#fff4e5;border:2px solid #f0a030;padding:.6em 1em}
.v{font-weight:600;padding:0 .35em;border-radius:3px;white-space:nowrap}.v.ok{background:#d8f3dc;color:#1b5e20}
.v.partly{background:#fff1c2;color:#7a5200}.v.no{background:#fde2e1;color:#9b1c1c}.v.none{background:#eee;color:#555}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
"""


def duration(seconds: float) -> str:
    """``12.1 s``, ``11.5 min``, ``1.6 h``."""
    seconds = float(seconds or 0)
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def cell_text(value: object) -> str:
    """A table cell: floats with 4 significant digits, missing values empty."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _bold(match: re.Match) -> str:
    """Bold text; a verdict in bold becomes its coloured badge."""
    text = match.group(1)
    if text in VERDICT_CLASSES:
        return f"<span class='v {VERDICT_CLASSES[text]}'>{text}</span>"
    return f"<strong>{text}</strong>"


def _inline_html(markdown: str) -> str:
    """Escaped text with the inline Markdown a table cell uses: `code`, **bold** and [text](link)."""
    text = html.escape(markdown)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", _bold, text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)


def _block_html(markdown: str) -> str:
    import mistune

    return mistune.create_markdown(escape=True)(markdown)


def _md_cell(value: object) -> str:
    return cell_text(value).replace("|", "\\|").replace("\n", " ")


class Document:
    """Blocks appended in reading order; `markdown()` and `html()` render them."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._md: list[str] = []
        self._html: list[str] = []

    def heading(self, level: int, text: str, anchor: Optional[str] = None) -> None:
        self._md += ([f'<a id="{anchor}"></a>', ""] if anchor else []) + [f"{'#' * level} {text}", ""]
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self._html.append(f"<h{level}{ident}>{_inline_html(text)}</h{level}>")

    def paragraph(self, text: str, small: bool = False) -> None:
        self._md += [text, ""]
        self._html.append(f"<p{' class=small' if small else ''}>{_inline_html(text)}</p>")

    def banner(self, text: str) -> None:
        self._md += ["> " + text, ""]
        self._html.append(f"<div class=banner id=banner>{_inline_html(text)}</div>")

    def finding(self, markdown: str, missing: bool = False) -> None:
        self._md += ["> " + line if line else ">" for line in markdown.splitlines()] + [""]
        self._html.append(f"<div class='finding{' missing' if missing else ''}'>{_block_html(markdown)}</div>")

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self._md += [f"- {item}" for item in items] + [""]
            self._html.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in items) + "</ul>")

    @staticmethod
    def verdict(verdict: str) -> str:
        """The verdict as bold text; the HTML table renders a verdict column as a coloured badge."""
        return f"**{verdict}**"

    def figure(self, src: str, caption: str) -> None:
        self._md += [f"![{caption}]({src})", ""]
        self._html.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(src)}</figcaption></figure>")

    def contents(self, entries: Sequence[tuple[str, str]]) -> None:
        self.bullets([f"[{title}](#{anchor})" for anchor, title in entries])

    def table(self, df: pd.DataFrame, caption: Optional[str] = None, folded: bool = False,
              verdict_column: Optional[str] = None) -> None:
        columns = [str(c) for c in df.columns]
        md = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
        md += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
        self._md += ([caption, ""] if caption else []) + md + [""]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(self._html_cell(c, v, verdict_column) for c, v in zip(columns, row)) + "</tr>"
                       for row in df.itertuples(index=False))
        table = f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        label = _inline_html(caption) if caption else ""
        self._html.append(f"<details><summary>{label}</summary>{table}</details>" if folded
                          else (f"<p class=small>{label}</p>" if label else "") + table)

    @staticmethod
    def _html_cell(column: str, value: object, verdict_column: Optional[str]) -> str:
        text = cell_text(value)
        if column == verdict_column:
            return f"<td><span class='v {VERDICT_CLASSES.get(text, 'none')}'>{html.escape(text)}</span></td>"
        return f"<td>{_inline_html(text)}</td>"

    def markdown(self) -> str:
        return "\n".join(self._md).strip() + "\n"

    def html(self) -> str:
        body = "\n".join(self._html)
        return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=viewport "
                f"content='width=device-width, initial-scale=1'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
