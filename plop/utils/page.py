"""The one skeleton of every HTML page plop writes (``plop show --html``, ``plop check --html``).

A page is self-contained, so it opens offline, mails and attaches to a ticket: it makes no network
request (figures are inline PNG data URIs, the CSS and any script are inline) and a
Content-Security-Policy pins the CSS and script by hash, so that nothing else can load or run.
The strings a page shows come from reports and configs, which are untrusted: :func:`html_page`
escapes the title and :func:`html_table` its cells; the caller escapes the rest of the body.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from html import escape

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2228; max-width: 1180px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1em; margin: .5em 0; }
dt { color: #5b6570; } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5em 0; } caption { text-align: left; color: #5b6570; padding: .3em 0; }
th, td { padding: .25em .8em; border-bottom: 1px solid #dde1e5; white-space: nowrap; }
th { text-align: left; border-bottom: 2px solid #9aa4ae; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.rec td { background: #e7f5e9; font-weight: 600; color: #14632a; }
img { max-width: 100%; height: auto; border: 1px solid #dde1e5; }
.export { margin: .6em 0; } .export-head { display: flex; gap: 1em; align-items: center; font-weight: 600; }
pre { background: #f4f6f8; border: 1px solid #dde1e5; padding: .6em; overflow-x: auto; margin: .3em 0; }
button { font: inherit; padding: .15em .9em; cursor: pointer; }
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def html_page(title: str, body: str, script: str = "") -> str:
    """A whole page: ``title`` (escaped here), ``body`` (HTML, escaped by the caller) and an inline
    ``script``, the only one its policy lets run (none without one)."""
    scripts = _csp_hash(script) if script else "'none'"
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(CSS)}; script-src {scripts}; "
           "base-uri 'none'; form-action 'none'")
    tail = f"<script>{script}</script>\n" if script else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
{body}
{tail}</body>
</html>
"""


def html_table(caption: str, headers: Sequence[str], numeric: set[int],
               rows: Sequence[tuple[Sequence[str], bool]]) -> str:
    """An escaped HTML table; ``numeric`` columns are right-aligned, rows flagged True are recommended."""

    def cell(tag: str, i: int, text: str) -> str:
        align = ' class="num"' if i in numeric else ""
        return f"<{tag}{align}>{escape(text)}</{tag}>"

    def row(values: Sequence[str], recommended: bool) -> str:
        tag = '<tr class="rec">' if recommended else "<tr>"
        return tag + "".join(cell("td", i, v) for i, v in enumerate(values)) + "</tr>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "\n".join(row(values, recommended) for values, recommended in rows)
    return (f"<table>\n<caption>{escape(caption)}</caption>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody>\n</table>")
