"""How plop's results look: every rich table and every matplotlib figure.

The functions read the attributes of what they draw (a :class:`plop.ranking.report.Report`, a
:class:`plop.finetune.compare.Comparison`, rows of adapters) and import none of those modules:
rendering sits below them, and they call it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..utils.fsio import atomic_write
from ..utils.untrusted import plain_safe, terminal_safe

_BAR_WIDTH = 10


def _bar(value: float, lo: float, hi: float) -> Text:
    filled = 0 if hi <= lo else round(_BAR_WIDTH * (value - lo) / (hi - lo))
    return Text("█" * max(filled, 1), style="cyan")


def target_modules_line(report) -> str:
    """The ``target_modules=...`` line (and ``target_parameters=...`` for expert weights), ready
    to paste into a ``LoraConfig``."""
    rec = report.recommendation
    parameters = rec.target_parameters
    return f"target_modules={rec.target_modules!r}" + (f", target_parameters={parameters!r}" if parameters else "")


def coverage_line(report) -> str | None:
    """One line: the share of block weights the diagnosis saw and what it could not measure;
    None for a report made before coverage was recorded."""
    cov = report.coverage
    if not cov:
        return None
    missed = "; ".join(f"{u['role']} ({u['share']:.0%}, {u['reason']})" for u in cov["undiagnosed"])
    return f"coverage: {cov['share']:.0%} of the block weights diagnosed" + (f"; not: {missed}" if missed else "")


def _plain(value: Any) -> Text:
    """A table cell or text from a report, which is untrusted: shown literally, as text rather than
    markup, and with control characters (terminal escape sequences) made visible."""
    return Text(plain_safe(str(value)))


def _chosen(rec) -> str:
    if rec.rank_pattern:  # allocate: the rank each type gets
        return ", ".join(f"{t} (r={rec.rank_pattern[t]})" for t in rec.types)
    return ", ".join(rec.types)


def scored_tokens(settings: dict[str, Any]) -> str:
    """Which tokens the statistics took (``--tokens``): every one, or a prompt/response part."""
    scope = settings.get("tokens", "all")
    return "all scored" if scope == "all" else f"{scope} tokens scored"


def render_report(report) -> Group:
    """Ranked types (NFN mean +/- std and a bar), the recommendation and its cost, coverage, the
    types PEFT refuses on this model and, when scored, what data-free scores would pick."""
    data, model = report.data, report.model
    header = Text.assemble(
        ("plop diagnosis ", "bold"),
        (plain_safe(str(model["id"])), "bold magenta"),
        plain_safe(f"  ({model['architecture']}, {len(report.modules)} linear modules)") + "\n",
        plain_safe(f"data: {data['source']}  ·  {data['samples']} samples, {data['token_count']:,} tokens "
                   f"({scored_tokens(report.settings)})  ·  estimator: {report.settings.get('estimator', 'closed_form')}"),
    )
    line = coverage_line(report)
    if line is not None:
        header.append("\n" + plain_safe(line), style="yellow" if report.coverage["undiagnosed"] else None)
    parts = [header, _ranking_table(report), _costs_table(report), _recommendation_panel(report)]
    if report.data_free:
        picks, k = report.data_free, len(report.data_free["nfn"])
        shared = {name: len(set(picks[name]) & set(picks["nfn"])) for name in ("kappatune", "spectrum")}
        parts.append(_plain(f"data-free scores would pick: KappaTune {', '.join(picks['kappatune'])} "
                            f"({shared['kappatune']}/{k} shared with NFN); Spectrum {', '.join(picks['spectrum'])} "
                            f"({shared['spectrum']}/{k} shared)"))
    return Group(*parts)


def _type_grad_sign(report) -> dict[str, float | None]:
    """Each type's mean grad-sign consistency over its scored modules (None: none scored, as 3-D
    expert weights are not)."""
    scores: dict[str, list[float]] = {}
    for m in report.modules:
        scores.setdefault(m.type, [])
        if m.grad_sign is not None:
            scores[m.type].append(m.grad_sign)
    return {t: sum(v) / len(v) if v else None for t, v in scores.items()}


def _ranking_table(report) -> Table:
    rec = report.recommendation
    lo = min(t.nfn_min for t in report.types)
    hi = max(t.nfn_mean for t in report.types)
    signal = report.settings.get("signal", "nfn")
    consistency = _type_grad_sign(report) if signal != "nfn" else None
    title = ("Module types by mean NFN over layers (low NFN: put LoRA here)" if consistency is None else
             f"Module types ranked by {signal} (grad-sign: B-gradient signs that hold)")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    # the grad-sign column takes the NFN bar's place: the table still fits 80 columns
    columns = [("#", "right"), ("type", "left"), ("NFN ± std", "right"),
               *([("", "left")] if consistency is None else []), ("min–max", "right"),
               *([("grad-sign", "right")] if consistency is not None else []), ("n", "right"), ("P(sel)", "right"),
               (f"params@r{rec.rank}", "right")]
    for col, justify in columns:
        # every header whole: at 80 columns the bar gives up its width first, not "params@r16"
        table.add_column(col, justify=justify, no_wrap=True, min_width=len(col), overflow="crop" if not col else "fold")
    for t in report.types:
        prob = "–" if t.selection_probability is None else f"{t.selection_probability:.0%}"
        bar = [_bar(t.nfn_mean, lo, hi)] if consistency is None else []
        grad = [] if consistency is None else ["–" if consistency.get(t.type) is None else f"{consistency[t.type]:.3f}"]
        table.add_row(
            str(t.position), _plain(t.type), f"{t.nfn_mean:.3f}±{t.nfn_std:.3f}", *bar,
            f"{t.nfn_min:.2f}–{t.nfn_max:.2f}", *grad, str(t.n_modules), prob, f"{t.lora_params_per_rank * rec.rank:,}",
            style="bold green" if t.type in set(rec.types) else None,
        )
    return table


def _costs_table(report) -> Table:
    rank = report.recommendation.rank
    costs = Table(title="Cost of each placement", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("placement", "types", f"params @ r={rank}", "MB"):
        costs.add_column(col, justify="left" if col in ("placement", "types") else "right")
    for name, cost in report.costs.items():
        costs.add_row(_plain(name), _plain(", ".join(cost["types"])), f"{cost['trainable_params']:,}",
                      f"{cost['size_mb']:.2f}", style="bold green" if name == "recommended" else None)
    return costs


def _recommendation_panel(report) -> Panel:
    rec = report.recommendation
    if rec.stable is None:
        stability = ""
    else:
        verdict = "[green]stable[/]" if rec.stable else "[yellow]not yet stable: diagnose on more samples[/]"
        stability = f"\nbootstrap: {rec.agreement:.0%} of resamples pick the same set ({verdict})"
        if rec.samples_to_stable is not None:
            stability += f"; the set stopped changing after {rec.samples_to_stable} samples"
    for t, why in (rec.excluded or {}).items():
        stability += f"\nleft out: {terminal_safe(t)} ({terminal_safe(why)})"
    at = "the ranks above" if rec.rank_pattern else f"r={rec.rank}"
    return Panel(
        Text.from_markup(
            f"[bold]recommended ({terminal_safe(rec.strategy)}):[/] {terminal_safe(_chosen(rec))}\n"
            f"{len(rec.modules)} modules · {rec.trainable_params:,} trainable params at {at} "
            f"({rec.size_mb:.2f} MB)" + stability + "\n\n"
        ).append(plain_safe(target_modules_line(report)), style="bold yellow"),
        title="recommendation",
        border_style="green",
    )


def comparison_table(comparison) -> Table:
    """A rich table: one line per placement, mean ±std over seeds; the best in bold: the lowest eval
    loss, or under GRPO the highest held-out reward. Narrow enough for 80 columns: only the types wrap."""
    aggregate = comparison.aggregate()
    rl = any(e["eval_reward_after_mean"] is not None for e in aggregate)
    key, label, pick = ("eval_reward_after", "reward", max) if rl else ("eval_loss_after", "loss", min)

    def metric(entry: dict) -> str:
        mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
        if mean is None:
            return "-"
        return f"{mean:.3f}" + (f"±{std:.3f}" if entry["seeds"] > 1 else "")

    values = [e[f"{key}_mean"] for e in aggregate if e[f"{key}_mean"] is not None]
    seeds = aggregate[0]["seeds"] if aggregate else 0
    # every run starts from the same base on the same split: one value before training for all
    before = f"{aggregate[0][key.replace('after', 'before') + '_mean']:.3f}" if values else "-"
    what = "held-out greedy reward" if rl else "eval loss"
    table = Table(box=box.SIMPLE_HEAD, title=f"placements at {comparison.budget:,} LoRA parameters "
                  f"(the recommendation at rank {comparison.rank}), {seeds} seed(s)",
                  caption=f"budget: parameters over the budget (! when off by more than 10 %)\n"
                          f"{what} before training: {before}")
    for column in ("placement", "types", "r", "params", "budget", f"{label} after", "s/step"):
        table.add_column(column, justify="left" if column in ("placement", "types") else "right",
                         no_wrap=column != "types", min_width=10 if column == "types" else None)
    for e in aggregate:
        best = values and e[f"{key}_mean"] == pick(values)
        budget = f"{e['budget_ratio']:.0%}" + ("" if e["within_budget"] else " !")
        table.add_row(Text(plain_safe(e["placement"]), style="bold" if best else ""), _plain(", ".join(e["types"])),
                      str(e["rank"]), f"{e['trainable_params']:,}", budget, metric(e),
                      f"{e['seconds_per_step_mean']:.2f}")
    return table


def ranks_text(rank: int, rank_pattern: dict[str, int] | None) -> str:
    """``rank 16``, or an allocation's ``ranks v_proj 6, up_proj 2`` (its rank per type)."""
    if rank_pattern:
        return "ranks " + ", ".join(f"{t} {r}" for t, r in rank_pattern.items())
    return f"rank {rank}"


def train_summary_text(s: dict[str, Any], adapter_path: str) -> str:
    """What ``plop train`` says when it is done, from the run's summary (rich markup, escaped)."""
    method = "DoRA" if s["dora"] else "LoRA"
    method += f"+ (ratio {s['loraplus_ratio']:g})" if s["loraplus_ratio"] != 1 else ""
    before, after = s["eval_before"], s["eval_after"]
    evals = (f"; eval loss {before['loss']:.4f} -> {after['loss']:.4f} (ppl {before['ppl']:.2f} -> {after['ppl']:.2f})"
             if before and after and "loss" in before else "")
    if s.get("method") == "grpo":  # an RL run is judged by its held-out greedy reward, not a loss
        method = f"GRPO ({terminal_safe(str(s['reward']))}) with {method}"
        evals = f"; held-out greedy reward {before['reward']:.4f} -> {after['reward']:.4f}" if before and after else ""
    processes = f" on {s['world_size']} processes (global batch {s['global_batch']})" if s["world_size"] > 1 else ""
    return (f"trained {method} {ranks_text(s['rank'], s['rank_pattern'])} on "
            f"[bold]{terminal_safe(', '.join(s['types']))}[/] ({terminal_safe(s['placement'])}): "
            f"{s['trainable_params']:,} trainable parameters\n"
            f"{s['steps']} steps{processes}, {s['seconds_per_step'] or 0:.3f} s/step{evals}\n"
            f"adapter written to [bold]{terminal_safe(adapter_path)}[/] (PeftModel.from_pretrained(base, path) loads it)")


def nfn_change_table(change: dict[str, dict]) -> Table:
    """What a fine-tune changed (``summary["nfn_change"]``): mean NFN per type, frozen and adapted."""
    table = Table(title="NFN after training, on the diagnosis rows (adapted vs frozen)", box=box.SIMPLE_HEAD,
                  caption="●: the type carries an adapter; the others change only through their inputs")
    for column in ("type", "frozen", "adapted", "Δ", "LoRA"):
        table.add_column(column, justify="left" if column == "type" else "right", no_wrap=True)
    for t, c in sorted(change.items(), key=lambda item: item[1]["delta"]):
        table.add_row(_plain(t), f"{c['frozen']:.3f}", f"{c['adapted']:.3f}", f"{c['delta']:+.3f}",
                      "●" if c["has_adapter"] else "", style="bold green" if c["has_adapter"] else None)
    return table


def adapters_table(directory: str, rows: Sequence[dict[str, Any]]) -> Table:
    """One line per task adapter (:func:`plop.finetune.adapters.list_adapters` rows)."""
    table = Table(title=f"adapters in {directory}", caption="eval loss before and after training")
    for column in ("name", "placement", "targets", "rank", "steps", "before", "after"):
        # a narrow terminal wraps the long column only
        table.add_column(column, no_wrap=column != "targets", min_width=16 if column == "targets" else None)
    for r in rows:
        targets = r["target_modules"] if isinstance(r["target_modules"], str) else ", ".join(r["target_modules"] or [])
        table.add_row(_plain(r["name"]), _plain(r["placement"] or "-"), _plain(targets),
                      f"{r['rank']}" + (" DoRA" if r["dora"] else ""),
                      *(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k] or "-")
                        for k in ("steps", "eval_loss_before", "eval_loss_after")))
    return table


def _number(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def diff_table(d) -> Table:
    """A :class:`plop.ranking.diff.ReportDiff`: types in A's order with NFN and rank on both sides; the caption says what the
    recommendation does and any warning. Types recommended in B are bold green, as in ``plop show``."""
    table = Table(title=Text(plain_safe(f"A: {d.label_a}") + "\n" + plain_safe(f"B: {d.label_b}")),
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("type", "left"), ("NFN A", "right"), ("NFN B", "right"), ("Δ", "right"),
                         ("rank A→B", "right"), ("LoRA A", "center"), ("LoRA B", "center")):
        table.add_column(col, justify=justify, no_wrap=True)
    for t in d.types:
        moved = "" if not t.rank_change else f" ({'↑' if t.rank_change < 0 else '↓'}{abs(t.rank_change)})"
        table.add_row(
            _plain(t.type), _number(t.nfn_a, ".3f"), _number(t.nfn_b, ".3f"), _number(t.delta, "+.3f"),
            f"{_number(t.rank_a, 'd')}→{_number(t.rank_b, 'd')}{moved}",
            "●" if t.recommended_a else "", "●" if t.recommended_b else "",
            style="bold green" if t.recommended_b else None,
        )
    if d.recommendation_changed:
        caption = Text(plain_safe(f"recommendation changes: added {', '.join(d.added) or 'none'}, "
                                  f"removed {', '.join(d.removed) or 'none'}"), style="bold yellow")
    else:
        caption = Text(plain_safe(f"recommendation unchanged: {', '.join(d.recommended_a)}"), style="bold green")
    for line in (f"A: target_modules={d.target_modules_a!r}", f"B: target_modules={d.target_modules_b!r}"):
        caption.append("\n" + plain_safe(line))
    for warning in d.warnings:
        caption.append("\n" + plain_safe(f"warning: {warning}"), style="yellow")
    if d.precision is not None:
        style = "red" if d.precision.verdict == "beyond noise" else None
        caption.append("\n" + plain_safe(d.precision.summary()), style=style)
    table.caption = caption
    table.caption_justify = "left"
    return table


def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")  # writing a file needs no display
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """A figure as image bytes (and closed): for a file, or for an HTML page's data URI."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=fmt)
    plt.close(fig)
    return image.getvalue()


def _finish(fig, plt, path):
    fig.tight_layout()
    if path is not None:  # like every file plop writes: whole or not at all
        atomic_write(path, figure_bytes(fig, Path(path).suffix.lstrip(".").lower() or "png"))
    return fig


def plot_comparison(comparison, path: str | os.PathLike | None = None):
    """Left: eval loss (GRPO: held-out reward) after training per placement, best first (dot: mean
    over seeds, bar: min-max, dashed line: before training). Right: trainable parameters per placement."""
    import numpy as np

    plt = _pyplot(path)
    rl = any(r.eval_reward_after is not None for r in comparison.rows)
    key, what, sign = ("eval_reward", "held-out greedy reward", -1) if rl else ("eval_loss", "eval loss", 1)
    rows = sorted(comparison.aggregate(), key=lambda r: sign * r[f"{key}_after_mean"])
    names = [r["placement"] for r in rows]
    losses = {p: [getattr(r, f"{key}_after") for r in comparison.rows if r.placement == p] for p in names}
    means = np.array([np.mean(losses[p]) for p in names])
    low = means - np.array([min(losses[p]) for p in names])
    high = np.array([max(losses[p]) for p in names]) - means
    colors = ["tab:green" if p == "recommended" else "tab:gray" for p in names]
    fig, (ax_loss, ax_params) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2.5),
                                             gridspec_kw={"width_ratios": [1.4, 1]})
    y = np.arange(len(names))
    ax_loss.errorbar(means, y, xerr=[low, high], fmt="none", ecolor="black", capsize=4)
    ax_loss.scatter(means, y, c=colors, s=80, zorder=3)
    before = [r[f"{key}_before_mean"] for r in rows if r[f"{key}_before_mean"] is not None]
    before_text = f" (before training: {np.mean(before):.3f})" if before else ""
    labels = [f"{r['placement']} (r={r['rank']})" for r in rows]
    ax_loss.set_yticks(y, labels)
    ax_loss.invert_yaxis()
    seeds = max(r["seeds"] for r in rows)
    ax_loss.set_xlabel(f"{what} after training{before_text}\ndot: mean of {seeds} seed(s), bar: min–max")
    ax_loss.set_title(f"{'Higher' if rl else 'Lower'} is better; green = plop's recommendation")
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


def plot_report(report, path: str | os.PathLike | None = None):
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


def plot_diff(d, path: str | os.PathLike | None = None):
    """Dumbbell chart: each type's mean NFN in A (circle) and B (diamond), joined by a line, in A's
    ranking order; filled green where that report recommends the type. Saved to ``path`` when given."""
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(d.types) + 2))
    for y, t in enumerate(d.types):
        if t.delta is not None:
            ax.plot([t.nfn_a, t.nfn_b], [y, y], color="tab:blue" if t.delta < 0 else "tab:red", linewidth=2,
                    zorder=1)
            ax.annotate(f"{t.delta:+.3f}", (max(t.nfn_a, t.nfn_b), y), xytext=(8, 0), textcoords="offset points",
                        va="center", fontsize=8)
        for value, marker, chosen in ((t.nfn_a, "o", t.recommended_a), (t.nfn_b, "D", t.recommended_b)):
            if value is not None:
                ax.scatter(value, y, marker=marker, s=70, zorder=2, edgecolors="black",
                           color="tab:green" if chosen else "white")
    ax.set_yticks(range(len(d.types)), [t.type for t in d.types])
    ax.invert_yaxis()
    ax.margins(x=0.12)  # room for the delta labels right of each dumbbell
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.scatter([], [], marker="o", color="white", edgecolors="black", label=f"A: {d.label_a}")
    ax.scatter([], [], marker="D", color="white", edgecolors="black", label=f"B: {d.label_b}")
    ax.scatter([], [], marker="s", color="tab:green", edgecolors="black", label="recommended (LoRA)")
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("mean NFN over layers (line: blue = lower in B, red = higher); 1 = random alignment")
    verdict = "recommendation changes" if d.recommendation_changed else "recommendation unchanged"
    ax.set_title(f"plop diff · {verdict}")
    return _finish(fig, plt, path)
