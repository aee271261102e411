"""The report's two renderings: Markdown (report.md) and self-contained HTML (report.html). A section is a
list of blocks: ("p", text), ("img", figure name, caption) or ("table", header, rows); notes are
(key, text) pairs. Text is escaped for each format here, so the document never carries markup."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}")


def markdown(title: str, sections: Mapping[str, list], notes: list) -> str:
    lines = [f"# {_md(title)}", ""]
    for name, blocks in sections.items():
        lines += [f"## {name}", ""]
        for block in blocks:
            lines += _md_block(block) + [""]
    if notes:
        lines += ["## Notes", ""] + [_md(text) + "\n" for _, text in notes]
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block: tuple) -> list[str]:
    kind = block[0]
    if kind == "p":
        return [_md(block[1])]
    if kind == "img":
        return [f"![{_md(block[2])}](figures/{block[1]}.png)"]
    header, rows = block[1], block[2]
    return (["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def _md(text: str) -> str:
    """Markdown passes raw HTML through, so angle brackets are escaped; a pipe would split a table cell."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def html_page(title: str, sections: Mapping[str, list], notes: list, embed_from: Path | None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for name, blocks in sections.items():
        parts.append(f"<h2>{e(name)}</h2>")
        parts += [_html_block(b, embed_from) for b in blocks]
    if notes:
        parts += ["<h2>Notes</h2>"] + [f"<p>{e(text)}</p>" for _, text in notes]
    return "\n".join(parts + ["</body></html>"]) + "\n"


def _html_block(block: tuple, embed_from: Path | None) -> str:
    e = html.escape
    if block[0] == "p":
        return f"<p>{e(block[1])}</p>"
    if block[0] == "img":
        src = f"figures/{block[1]}.png"
        if embed_from is not None:
            src = "data:image/png;base64," + base64.b64encode((embed_from / src).read_bytes()).decode()
        return f'<figure><img src="{e(src)}" alt="{e(block[2])}"><figcaption>{e(block[2])}</figcaption></figure>'
    head = "".join(f"<th>{e(h)}</th>" for h in block[1])
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
