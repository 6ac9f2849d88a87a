"""``plop check`` output: a terminal table and coverage matrix, or one self-contained HTML page.
Every string from the config or the model config is escaped (untrusted input)."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from ..utils.fsio import atomic_write
from ..utils.page import html_page, html_table
from ..utils.untrusted import plain_safe
from .result import CheckResult, RoleRow

_MARKS = {True: "█", False: "·"}
_WIDTH = 100  # layers shown per matrix row before it wraps


def _cells(row: RoleRow) -> str:
    layers = sorted(k for k in row.layers if k is not None)
    if not layers:
        return _MARKS[row.layers.get(None, False)]
    return "".join(_MARKS[row.layers[k]] for k in layers[:_WIDTH]) + ("…" if len(layers) > _WIDTH else "")


def _ranks(row: RoleRow) -> str:
    return "/".join(map(str, row.ranks)) or "-"


def render_text(result: CheckResult) -> str:
    """The summary, the role x layer matrix (█ adapted, · not), the findings; plain text."""
    m = result.model
    lines = [f"{plain_safe(result.source)} ({result.flavour}) on {plain_safe(m['architecture'])}, "
             f"{m['parameters']:,} parameters: trains {result.trainable:,} "
             f"({result.adapter_params:,} in adapters, {result.saved_params:,} in full copies); "
             f"adapters on {100 * result.adapted_share:.1f} % of the block weights", ""]
    width = max([len(r.type) for r in result.roles] + [4])
    lines.append(f"  {'type':<{width}}  {'adapted':>9}  {'rank':>5}  {'trainable':>13}  layers")
    for r in result.roles:
        lines.append(f"  {plain_safe(r.type):<{width}}  {f'{r.adapted}/{r.total}':>9}  {_ranks(r):>5}  "
                     f"{r.trainable:>13,}  {_cells(r)}")
    if result.by_nfn:
        b = result.by_nfn
        lines += ["", f"by NFN: {100 * b['share_on_low_nfn_half']:.0f} % of the adapter parameters sit on the "
                      f"lower-NFN half of the types, {100 * b['share_on_recommended']:.0f} % on plop's recommended "
                      f"{', '.join(b['recommended_types'])}; at the same budget ({b['budget']:,}) plop would pick "
                      f"{', '.join(b['same_budget_types']) or 'nothing'}"]
    lines.append("")
    lines += [f"{f.severity}: {plain_safe(f.message)}" for f in result.findings] or ["no findings"]
    return "\n".join(lines)


def render_html(result: CheckResult) -> str:
    """One self-contained page (:func:`plop.utils.page.html_page`), as report pages are."""
    rows = [((r.type, f"{r.adapted}/{r.total}", _ranks(r), f"{r.trainable:,}", _cells(r)), r.adapted > 0)
            for r in result.roles]
    table = html_table("module types: █ adapted layer, · not", ["type", "adapted", "rank", "trainable", "layers"],
                       {1, 3}, rows)
    findings = "\n".join(f"<li><b>{escape(f.severity)}</b> {escape(f.message)}</li>" for f in result.findings)
    summary = escape(render_text(result).split("\n", 1)[0])
    return html_page(f"plop check · {result.source}", f"""<h1>plop check</h1>
<p>{summary}</p>
{table}
<h2>Findings</h2>
<ul>{findings or "<li>none</li>"}</ul>""")


def write_html(result: CheckResult, path: str | os.PathLike) -> Path:
    return atomic_write(path, render_html(result))
