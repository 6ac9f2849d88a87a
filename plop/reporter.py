"""Reporter: how a :class:`~plop.report.Report` looks in a terminal and in a picture."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .compare import Comparison
    from .report import Report

_BAR_WIDTH = 10


def _bar(value: float, lo: float, hi: float) -> Text:
    filled = 0 if hi <= lo else round(_BAR_WIDTH * (value - lo) / (hi - lo))
    return Text("█" * max(filled, 1), style="cyan")


def target_modules_line(report: Report) -> str:
    """The ``target_modules=...`` line, ready to paste into a ``LoraConfig``."""
    return f"target_modules={report.recommendation.target_modules!r}"


def render(report: Report) -> Group:
    """Ranked types (NFN mean +/- std and a bar), the recommendation and its cost."""
    rec = report.recommendation
    chosen = set(rec.types)
    data, model = report.data, report.model
    header = Text.assemble(
        ("plop diagnosis ", "bold"),
        (f"{model['id']}", "bold magenta"),
        f"  ({model['architecture']}, {len(report.modules)} linear modules)\n",
        f"data: {data['source']}  ·  {data['samples']} samples, {data['tokens']:,} tokens  ·  "
        f"estimator: {report.settings.get('estimator', 'closed_form')}",
    )
    lo = min(t.nfn_min for t in report.types)
    hi = max(t.nfn_mean for t in report.types)
    table = Table(title="Module types by mean NFN over layers (low NFN: put LoRA here)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("#", "right"), ("type", "left"), ("NFN ± std", "right"), ("", "left"),
                         ("min–max", "right"), ("n", "right"), ("P(sel)", "right"), (f"params@r{rec.rank}", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for t in report.types:
        prob = "–" if t.selection_probability is None else f"{t.selection_probability:.0%}"
        table.add_row(
            str(t.rank), t.type, f"{t.nfn_mean:.3f}±{t.nfn_std:.3f}", _bar(t.nfn_mean, lo, hi),
            f"{t.nfn_min:.2f}–{t.nfn_max:.2f}", str(t.n_modules), prob, f"{t.lora_params_per_rank * rec.rank:,}",
            style="bold green" if t.type in chosen else None,
        )
    if rec.stable is None:
        stability = ""
    else:
        verdict = "[green]stable[/]" if rec.stable else "[yellow]not yet stable: diagnose on more samples[/]"
        stability = f"\nbootstrap: {rec.agreement:.0%} of resamples pick the same set ({verdict})"
        if rec.samples_to_stable is not None:
            stability += f"; the set stopped changing after {rec.samples_to_stable} samples"
    summary = Panel(
        Text.from_markup(
            f"[bold]recommended ({rec.strategy}):[/] {', '.join(rec.types)}\n"
            f"{len(rec.modules)} modules · {rec.trainable_params:,} trainable params at r={rec.rank} "
            f"({rec.size_mb:.2f} MB)" + stability + "\n\n"
        ).append(target_modules_line(report), style="bold yellow"),
        title="recommendation",
        border_style="green",
    )
    costs = Table(title="Cost of each placement", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("placement", "types", f"params @ r={rec.rank}", "MB"):
        costs.add_column(col, justify="left" if col in ("placement", "types") else "right")
    for name, cost in report.costs.items():
        costs.add_row(name, ", ".join(cost["types"]), f"{cost['trainable_params']:,}", f"{cost['size_mb']:.2f}",
                      style="bold green" if name == "recommended" else None)
    return Group(header, table, costs, summary)


def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")  # writing a file needs no display
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, plt, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_comparison(comparison: Comparison, path: str | os.PathLike | None = None):
    """Left: eval loss after training per placement, best first (dot: mean over seeds, bar:
    min-max, dashed line: before training). Right: trainable parameters per placement."""
    import numpy as np

    plt = _pyplot(path)
    rows = sorted(comparison.aggregate(), key=lambda r: r["eval_loss_after_mean"])
    names = [r["placement"] for r in rows]
    losses = {p: [r.eval_loss_after for r in comparison.rows if r.placement == p] for p in names}
    means = np.array([np.mean(losses[p]) for p in names])
    low = means - np.array([min(losses[p]) for p in names])
    high = np.array([max(losses[p]) for p in names]) - means
    colors = ["tab:green" if p == "recommended" else "tab:gray" for p in names]
    fig, (ax_loss, ax_params) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2.5),
                                             gridspec_kw={"width_ratios": [1.4, 1]})
    y = np.arange(len(names))
    ax_loss.errorbar(means, y, xerr=[low, high], fmt="none", ecolor="black", capsize=4)
    ax_loss.scatter(means, y, c=colors, s=80, zorder=3)
    before = [r["eval_loss_before_mean"] for r in rows if r["eval_loss_before_mean"] is not None]
    before_text = f" (before training: {np.mean(before):.3f})" if before else ""
    labels = [f"{r['placement']} (r={r['rank']})" for r in rows]
    ax_loss.set_yticks(y, labels)
    ax_loss.invert_yaxis()
    seeds = max(r["seeds"] for r in rows)
    ax_loss.set_xlabel(f"eval loss after training{before_text}\ndot: mean of {seeds} seed(s), bar: min–max")
    ax_loss.set_title("Lower is better; green = plop's recommendation")
    ax_params.barh(y, [r["trainable_params"] for r in rows], color=colors)
    ax_params.axvline(comparison.budget, color="black", linestyle=":", linewidth=1)
    ax_params.set_yticks(y, [])
    ax_params.invert_yaxis()
    ax_params.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:.1f}M")
    ax_params.set_xlabel("trainable LoRA parameters (dotted: the matched budget)")
    ax_params.set_title("Budget matched within 10 %")
    fig.suptitle(f"plop compare · {comparison.settings.get('model', '')} · "
                 f"{comparison.settings.get('steps') or ''} steps")
    return _finish(fig, plt, path)


def plot_report(report: Report, path: str | os.PathLike | None = None):
    """Left: NFN heatmap, layers x types (types in rank order). Right: per-type mean NFN with its
    spread over layers, recommended types in green. Saved to ``path`` when given."""
    import numpy as np

    plt = _pyplot(path)
    types = report.module_types
    layers = sorted({m.layer for m in report.modules if m.layer is not None})
    grid = np.full((max(len(layers), 1), len(types)), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    col = {t: j for j, t in enumerate(types)}
    for m in report.modules:
        grid[row.get(m.layer, 0), col[m.type]] = m.nfn

    chosen = set(report.recommendation.types)
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(12, max(4.0, 0.22 * len(layers) + 2)), gridspec_kw={"width_ratios": [1.2, 1]}
    )
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_map.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax_map.set_ylabel("layer")
    if layers:
        step = max(1, len(layers) // 10)
        ax_map.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    for j, t in enumerate(types):
        if t in chosen:
            ax_map.get_xticklabels()[j].set_color("green")
            ax_map.get_xticklabels()[j].set_fontweight("bold")
    ax_map.set_title("NFN by layer × type (darker = lower NFN)")
    fig.colorbar(image, ax=ax_map, label="NFN")

    means = [t.nfn_mean for t in report.types]
    lows = [t.nfn_mean - t.nfn_min for t in report.types]
    highs = [t.nfn_max - t.nfn_mean for t in report.types]
    colors = ["tab:green" if t in chosen else "tab:gray" for t in types]
    ax_bar.barh(range(len(types)), means, xerr=[lows, highs], color=colors, capsize=3)
    ax_bar.set_yticks(range(len(types)), [f"{t} (LoRA)" if t in chosen else t for t in types])
    ax_bar.invert_yaxis()
    ax_bar.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax_bar.set_xlabel("mean NFN over layers (bars: min–max); 1 = random alignment")
    ax_bar.set_title(f"Ranking: green = recommended ({report.recommendation.strategy})")
    fig.suptitle(f"plop · {report.model['id']} · {report.data['samples']} samples")
    return _finish(fig, plt, path)
