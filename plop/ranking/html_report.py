"""One self-contained HTML page for a report: open it offline, mail it, attach it to a ticket.

The page is :func:`plop.utils.page.html_page` (inline figure, CSS and copy script, pinned by its
Content-Security-Policy). Every string read from the report is HTML-escaped: a report is untrusted input.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from html import escape
from pathlib import Path

from ..config import default_alpha
from ..utils.fsio import atomic_write
from ..utils.page import html_page, html_table
from .render import figure_bytes, plot_report, scored_tokens, target_modules_line

# navigator.clipboard is refused on some file:// pages; the textarea + execCommand path still copies there
_SCRIPT = """
function plopCopy(text) {
  var area = document.createElement("textarea");
  area.value = text; document.body.appendChild(area); area.select(); document.execCommand("copy"); area.remove();
}
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  button.addEventListener("click", function () {
    var text = document.getElementById(button.dataset.copy).textContent;
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard) {
      navigator.clipboard.writeText(text).then(done, function () { plopCopy(text); done(); });
    } else { plopCopy(text); done(); }
  });
});
"""


def default_exports(report) -> dict[str, str]:
    """The PEFT ``LoraConfig`` line (the default alpha, as :meth:`Report.to_peft_config`) and the
    bare ``target_modules=[...]`` line."""
    r = report.recommendation.rank
    line = target_modules_line(report)
    return {"peft": f"LoraConfig(r={r}, lora_alpha={default_alpha(r):g}, {line})", "target_modules": line}


def _figure_data_uri(report) -> str:
    """The heatmap and ranking figure of ``plop show --plot`` as a PNG data URI, never on disk."""
    png = figure_bytes(plot_report(report))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _header(report) -> str:
    model, data = report.model, report.data
    facts = {
        "model": f"{model['id']} ({model['architecture']}, {len(report.modules)} linear modules)",
        "data": data["source"],
        "samples": f"{data['samples']} samples, {data['token_count']:,} tokens ({scored_tokens(report.settings)})",
        "data SHA-256": data.get("sha256"),
        "estimator": report.settings.get("estimator", "closed_form"),
        "created": (f"{report.created} by " if report.created else "") + f"plop {report.plop_version}",
    }
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts.items() if v)
    return f"<h1>plop diagnosis · {escape(model['id'])}</h1>\n<dl>{items}</dl>"


def _recommendation(report, exports: Mapping[str, str], buttons: bool = True) -> str:
    rec = report.recommendation
    lines = [f"<p><strong>recommended ({escape(rec.strategy)}):</strong> {escape(', '.join(rec.types))}<br>",
             f"{len(rec.modules)} modules · {rec.trainable_params:,} trainable params at r={rec.rank} "
             f"({rec.size_mb:.2f} MB)"]
    if rec.stable is not None:
        verdict = "stable" if rec.stable else "not yet stable: diagnose on more samples"
        lines.append(f"<br>bootstrap: {rec.agreement:.0%} of resamples pick the same set ({verdict})")
    lines.append("</p>")
    for i, (name, snippet) in enumerate(exports.items()):
        if not buttons:  # inline in a notebook, which runs no page script: the snippets alone
            lines.append(f'<div class="export">{escape(name)}<pre><code>{escape(snippet)}</code></pre></div>')
            continue
        lines.append(f'<div class="export"><div class="export-head"><span>{escape(name)}</span>'
                     f'<button type="button" data-copy="export-{i}">Copy</button></div>'
                     f'<pre><code id="export-{i}">{escape(snippet)}</code></pre></div>')
    return "\n".join(lines)


def _tables(report) -> tuple[str, str]:
    """The ranking table and the placement-cost table."""
    rec = report.recommendation
    chosen = set(rec.types)
    ranking = html_table(
        "Module types by mean NFN over layers (low NFN: put LoRA here)",
        ["#", "type", "NFN ± std", "min–max", "n", "P(sel)", f"params@r{rec.rank}"], {0, 2, 3, 4, 5, 6},
        [([str(t.position), t.type, f"{t.nfn_mean:.3f} ± {t.nfn_std:.3f}", f"{t.nfn_min:.2f}–{t.nfn_max:.2f}",
           str(t.n_modules), "–" if t.selection_probability is None else f"{t.selection_probability:.0%}",
           f"{t.lora_params_per_rank * rec.rank:,}"], t.type in chosen) for t in report.types],
    )
    costs = html_table(
        "Cost of each placement", ["placement", "types", f"params @ r={rec.rank}", "MB"], {2, 3},
        [([name, ", ".join(cost["types"]), f"{cost['trainable_params']:,}", f"{cost['size_mb']:.2f}"],
          name == "recommended") for name, cost in report.costs.items()],
    )
    return ranking, costs


def render_html(report, exports: Mapping[str, str] | None = None) -> str:
    """The page as a string; ``exports`` maps a format name to the snippet its copy button copies
    (default: :func:`default_exports`)."""
    ranking, costs = _tables(report)
    body = f"""{_header(report)}
<h2>Ranking</h2>
{ranking}
<h2>NFN by layer × type</h2>
<img alt="NFN heatmap by layer and module type, and the per-type ranking" src="{_figure_data_uri(report)}">
<h2>Placement costs</h2>
{costs}
<h2>Recommendation</h2>
{_recommendation(report, default_exports(report) if exports is None else exports)}"""
    return html_page(f"plop · {report.model['id']}", body, script=_SCRIPT)


def write_html(report, path: str | os.PathLike, exports: Mapping[str, str] | None = None) -> Path:
    """Write :func:`render_html` to ``path`` atomically: a failure leaves any previous file intact."""
    return atomic_write(path, render_html(report, exports))


# Inline in a notebook the page's body rules would restyle the notebook: these apply inside the
# fragment's own element only.
_FRAGMENT_CSS = """
.plop-report table { border-collapse: collapse; margin: .5em 0; }
.plop-report caption { text-align: left; color: #5b6570; padding: .3em 0; }
.plop-report th, .plop-report td { padding: .2em .7em; border-bottom: 1px solid #dde1e5; white-space: nowrap; }
.plop-report .num { text-align: right; font-variant-numeric: tabular-nums; }
.plop-report tr.rec td { background: #e7f5e9; font-weight: 600; color: #14632a; }
.plop-report img { max-width: 100%; height: auto; }
.plop-report h1 { font-size: 1.3em; }
.plop-report dl { display: grid; grid-template-columns: max-content 1fr; gap: .1em 1em; }
.plop-report dd { margin: 0; }
"""


def render_fragment(report) -> str:
    """The page's header, tables, figure and snippets as one ``<div>`` for a notebook's output
    (``Report._repr_html_``): escaped like the page, the figure an inline PNG, no script."""
    ranking, costs = _tables(report)
    return f"""<div class="plop-report">
<style>{_FRAGMENT_CSS}</style>
{_header(report)}
{ranking}
<img alt="NFN heatmap by layer and module type, and the per-type ranking" src="{_figure_data_uri(report)}">
{costs}
{_recommendation(report, default_exports(report), buttons=False)}
</div>
"""
