"""``plop.compare``: fine-tune several placements at one trainable-parameter budget.

A placement only wins fairly if it gets no more parameters than the others. The budget is the
recommended placement's LoRA parameters at rank ``r`` (an ``allocate`` report's: those of its own
ranks); every other placement gets the rank that brings its parameters closest to that budget
(``round(budget / params_per_rank)``, at least 1), or for ``allocate`` the ranks per type that
spend most of it, and the achieved ratio is recorded and flagged when it misses by more than
10 %. Everything else (data, split, steps, learning rate, seed, alpha/rank) is the same, and every
run starts from the same base weights.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..config import DiagnoseConfig
from ..errors import PlopError
from ..files.data import Example
from ..model.layers import dense_weight
from ..measure.weight_scores import weight_scores
from ..model.loading import ModelLayout, model_layout
from ..ranking.placements import COMPARE_DEFAULT, COMPARE_PLACEMENTS, check_report_matches, placement_types
from ..placement import Placement
from ..ranking.ranker import Selector, adapter_cost, modules_regex, select_modules
from ..ranking.report import ModuleRecord, Report
from ..utils.distributed import shared_tempdir
from ..utils.fsio import atomic_write
from .config import CompareConfig, TrainConfig
from .sft import split_examples
from .trainer import train_on_placement

BUDGET_TOLERANCE = 0.10
@dataclass
class Candidate:
    """A placement before training, and the LoRA parameters it costs per unit of rank."""

    placement: Placement
    params_per_rank: int
    params: int | None = None  # an allocation's parameters, fixed by its ranks per type

    def rank_for(self, budget: int) -> int:
        if self.placement.rank_pattern:
            return max(self.placement.rank_pattern.values())
        return max(1, round(budget / self.params_per_rank))

    def params_at(self, rank: int) -> int:
        return self.params if self.params is not None else rank * self.params_per_rank


@dataclass
class CompareRow:
    """One fine-tune. ``budget_ratio``: its LoRA parameters over the budget; ``loss_curve``: the
    training loss as the trainer logged it (``step``, ``loss``, ``lr``), to see whether the run
    had converged."""

    placement: str
    types: list[str]
    rank: int
    trainable_params: int
    budget_ratio: float
    within_budget: bool
    eval_loss_before: float | None
    eval_loss_after: float | None
    eval_ppl_after: float | None
    seconds_per_step: float | None
    seed: int
    loss_curve: list[dict[str, float | None]] = field(default_factory=list)
    rank_pattern: dict[str, int] | None = None  # an allocation's rank per type; ``rank`` is its largest
    # --method grpo: the held-out greedy reward before and after, and its curve every eval_steps
    eval_reward_before: float | None = None
    eval_reward_after: float | None = None
    eval_reward_curve: list[dict[str, float]] = field(default_factory=list)
    reward_curve: list[dict[str, float]] = field(default_factory=list)  # the sampled completions' mean reward per step
    step_size: dict[str, float] | None = None  # how far the first steps moved the model (plop.finetune.step_size)
    lr: float | None = None  # the run's learning rate (its placement's choice under an lr_grid)
    # each held-out item's loss (GRPO: reward) after training, in the held-out set's order: the
    # paired statistics of plop.finetune.evidence resample these
    eval_items_after: list[float] | None = None


@dataclass
class Comparison:
    """All runs of a comparison, with the budget they were matched to."""

    budget: int
    rank: int
    rows: list[CompareRow]
    settings: dict[str, Any]

    def aggregate(self) -> list[dict[str, Any]]:
        """Per placement, in run order: mean and standard deviation (ddof=1) over seeds."""
        out = []
        for placement in dict.fromkeys(r.placement for r in self.rows):
            rows = [r for r in self.rows if r.placement == placement]
            entry = {"placement": placement, "types": rows[0].types, "rank": rows[0].rank,
                     "trainable_params": rows[0].trainable_params, "budget_ratio": rows[0].budget_ratio,
                     "within_budget": rows[0].within_budget, "seeds": len(rows)}
            for key in ("eval_loss_before", "eval_loss_after", "eval_ppl_after", "eval_reward_before",
                        "eval_reward_after", "seconds_per_step"):
                values = np.array([getattr(r, key) for r in rows if getattr(r, key) is not None], dtype=float)
                entry[f"{key}_mean"] = float(values.mean()) if values.size else None
                entry[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0 if values.size else None
            out.append(entry)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "rank": self.rank, "tolerance": BUDGET_TOLERANCE, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], "aggregate": self.aggregate()}

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def __rich_console__(self, console, options):
        from ..ranking.render import comparison_table

        yield comparison_table(self)

    def plot(self, path: str | Path | None = None):
        """Eval loss after training per placement (mean, min-max over seeds) and its parameters."""
        from ..ranking.render import plot_comparison

        return plot_comparison(self, path)


def candidates(report: Report, model: nn.Module, placements: Sequence[str],
               budget: int | None = None, layout: ModelLayout | None = None) -> list[Candidate]:
    """Each placement, on the report's modules. ``inverse``: as many types as the
    recommendation, but the highest-NFN ones; ``kappatune``, ``per-layer`` and ``spectrum``: as
    many modules as the recommendation, the best-conditioned ones by PEFT's KappaTune, the
    lowest-NFN ones, or the highest-SNR ones (Spectrum); ``allocate``: a rank per type growing as
    its NFN falls (:func:`plop.ranking.ranker.allocate_ranks`), under ``budget`` parameters. A placement
    this model has no module for is skipped with a warning. ``layout``: the model's, when the
    caller already has it."""
    unknown = [p for p in placements if p not in COMPARE_PLACEMENTS and "=" not in p]
    if unknown:
        raise PlopError(f"unknown placement {unknown[0]!r}",
                        f"choose from {', '.join(COMPARE_PLACEMENTS)}, or name a set of types: NAME=TYPE+TYPE")
    rec = report.recommendation
    by_name = {m.name: m for m in report.modules}
    layout = model_layout(model) if layout is None else layout
    out = []
    for placement in placements:
        if placement == "recommended":  # an allocate report's own ranks, or one rank for all
            chosen: Placement = rec
            modules = rec.modules
            if rec.rank_pattern:
                out.append(Candidate(chosen, _params_per_rank([by_name[n] for n in modules]), rec.trainable_params))
                continue
        elif placement == "allocate":
            out.append(_allocation(report, layout, budget))
            continue
        elif "=" in placement:  # a named set of module types, e.g. "vod=v_proj+o_proj+down_proj"
            chosen = _named_types(placement, report, layout)
            modules = [m.name for m in report.modules if m.type in chosen.types]
        elif placement in ("kappatune", "per-layer", "spectrum"):
            modules = _chosen_modules(placement, model, report, layout, len(rec.modules))
            target = modules if placement == "kappatune" else modules_regex(modules)
            chosen = Placement(name=placement, target_modules=target, types=sorted({by_name[n].type for n in modules}))
        else:
            allowed = [t.type for t in report.types if t.type not in layout.refused]
            types = (allowed[-len(rec.types):] if placement == "inverse"
                     else placement_types(report.modules, placement, layout.refused))
            chosen = layout.placement(placement, types)
            modules = [m.name for m in report.modules if m.type in types]
        if not modules:
            warnings.warn(f"placement {placement!r}: no module of this model fits it; skipped", stacklevel=2)
            continue
        out.append(Candidate(chosen, _params_per_rank([by_name[n] for n in modules])))
    return out


def _named_types(spec: str, report: Report, layout: ModelLayout) -> Placement:
    """``NAME=TYPE+TYPE``: those module types of the report, as one placement called NAME."""
    name, _, listed = spec.partition("=")
    types = [t for t in listed.split("+") if t]
    missing = [t for t in types if t not in report.module_types]
    if not name or not types or missing:
        raise PlopError(f"placement {spec!r}: {'no such type ' + repr(missing[0]) if missing else 'give NAME=TYPE+TYPE'}",
                        f"this model's types: {', '.join(report.module_types)}")
    return layout.placement(name, types)


def _params_per_rank(records: Sequence[ModuleRecord]) -> int:
    return adapter_cost(records, 1)[0]


def _allocation(report: Report, layout, budget: int | None) -> Candidate:
    """The allocate strategy's ranks per type under ``budget``, with the report's power."""
    if budget is None:
        raise PlopError("placement 'allocate' needs the parameter budget to allocate")
    eligible = [m for m in report.modules if m.type not in layout.refused]
    own = DiagnoseConfig.from_settings(report.settings).strategy
    rec, _ = Selector(eligible, replace(own, kind="allocate", budget=budget)).recommend()
    placement = replace(layout.placement("allocate", list(rec.types)), rank_pattern=dict(rec.rank_pattern))
    return Candidate(placement, _params_per_rank([m for m in eligible if m.type in rec.types]), rec.trainable_params)


def _chosen_modules(placement: str, model: nn.Module, report: Report, layout, count: int) -> list[str]:
    """The ``count`` linear modules a module-level placement picks among those diagnosed."""
    linear = [m for m in report.modules if m.name in layout.linear and m.type not in layout.refused]
    if placement == "kappatune":
        return _kappatune_modules(model, {m.name: m for m in linear}, count)
    if placement == "per-layer":
        return select_modules(linear, np.array([m.nfn for m in linear]), rank=1, count=count)
    return [m.name for m in sorted(linear, key=lambda m: -_snr(m, model))[:count]]


def _snr(record: ModuleRecord, model: nn.Module) -> float:
    """Spectrum's SNR: the report's, else computed from the weight (one SVD)."""
    if record.snr is not None:
        return record.snr
    return weight_scores(dense_weight(model.get_submodule(record.name)))[1]


def _kappatune_modules(model: nn.Module, diagnosed: dict[str, ModuleRecord], count: int) -> list[str]:
    try:
        from peft.helpers import KappaTuneSelector
    except ImportError:
        raise PlopError("placement 'kappatune' needs a peft with KappaTune (peft.helpers.KappaTuneSelector)",
                        "upgrade peft, or leave kappatune out") from None
    ranked = KappaTuneSelector(model, show_progress=False).get_best_targets()  # lowest condition number first
    return [n for n in ranked if n in diagnosed][:count]


def compare(
    model: nn.Module | Callable[[], nn.Module],
    tokenizer,
    examples: Sequence[Example],
    report: Report,
    *,
    placements: Sequence[str] | None = CompareConfig.placements,
    seeds: Sequence[int] = CompareConfig.seeds,
    rank: int = 16,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    eval_examples: Sequence[Example] | None = None,
    lr_grid: Sequence[float] | None = CompareConfig.lr_grid,
    select_seeds: Sequence[int] = CompareConfig.select_seeds,
    validation_fraction: float = CompareConfig.validation_fraction,
    progress: bool = False,
    **overrides,
) -> Comparison:
    """Fine-tune each placement once per seed at the recommendation's budget at ``rank``; the
    protocol's arguments are :class:`plop.finetune.config.CompareConfig`'s fields.

    ``model``: the base (deep-copied for every run) or a factory of fresh ones. ``config``: the
    shared settings (default: LoRA dropout 0, so nothing an adapter draws shifts a seed's data or
    samples); ``overrides`` replace its fields (``steps=``, ``lr=``, ``step_size_steps=``...).
    Every placement gets one ``lora_alpha`` whatever its rank: with the scale ``alpha / r`` an Adam
    step moves a module's output by about as much at any rank, so step sizes and best learning
    rates do not follow the ranks (LoRA Without Regret, Thinking Machines 2025; muA, arXiv
    2602.06204); with ``alpha = 2 x rank`` more rank directions simply moved further per step.

    ``lr_grid``: each placement is trained at every multiplier of ``config.lr`` and each of
    ``select_seeds`` on the training rows less a ``validation_fraction`` split, judged there (eval
    loss; GRPO: reward), and reported at its best rate. The reported held-out set never takes part
    in that choice: ``eval_examples``, or one ``eval_fraction`` split of ``examples`` for every seed
    (default without ``lr_grid``: each seed's own split). ``output_dir`` keeps each run's adapter
    (default: a temporary directory); under ``torchrun`` every run is data-parallel.
    """
    config = replace(config or TrainConfig(lora=replace(TrainConfig().lora, dropout=0.0)), **overrides)
    if placements is None:
        placements = [p for p in COMPARE_DEFAULT if p != "kappatune" or _has_kappatune()]
    base = model if isinstance(model, nn.Module) else model()
    layout = model_layout(base)
    check_report_matches(report, layout)
    budget = candidates(report, base, ["recommended"], layout=layout)[0].params_at(rank)
    found = candidates(report, base, placements, budget, layout)
    if lr_grid and eval_examples is None:  # one held-out set, kept out of the choice of learning rate
        examples, eval_examples = split_examples(examples, config.eval_fraction, seeds[0])

    keep = nullcontext(output_dir) if output_dir is not None else shared_tempdir("plop-compare-")
    with keep as where:
        runs = _Runs(base, model, tokenizer, report, Path(where), budget, replace(config, lora=replace(config.lora, alpha=config.lora.lora_alpha)),
                     progress)
        lrs, selection = ({c.placement.name: config.lr for c in found}, []) if not lr_grid else \
            runs.choose_lrs(found, examples, lr_grid, select_seeds, validation_fraction)
        rows = [runs.run(candidate, seed, lrs[candidate.placement.name], examples, eval_examples)
                for seed in seeds for candidate in found]
    protocol = {"placements": list(placements), "seeds": list(seeds), "lr_chosen": lrs, "lr_selection": selection}
    if lr_grid:
        protocol.update(lr_grid=list(lr_grid), select_seeds=list(select_seeds), validation_fraction=validation_fraction)
    return Comparison(budget, rank, rows, _settings(config, report, protocol))


def _settings(config: TrainConfig, report: Report, protocol: dict[str, Any]) -> dict[str, Any]:
    """What every run shared, and how the comparison was run."""
    settings = {k: v for k, v in config.record().items() if k not in ("r", "seed", "adapter_name", "resume",
                                                                     "output_dir")}
    return {**settings, "alpha": config.lora.lora_alpha, "model": report.model.get("id"),
            "scaling": "one lora_alpha for every rank: the LoRA scale alpha / r falls as the rank grows", **protocol}


@dataclass
class _Runs:
    """The runs of one comparison: each from a fresh copy of the base, one at a time."""

    base: nn.Module
    model: nn.Module | Callable[[], nn.Module]
    tokenizer: Any
    report: Report
    root: Path
    budget: int
    config: TrainConfig
    progress: bool

    def run(self, candidate: Candidate, seed: int, lr: float, examples, eval_examples, tag: str = "") -> CompareRow:
        r = candidate.rank_for(self.budget)
        config = replace(self.config, lora=replace(self.config.lora, r=r), lr=lr, seed=seed, adapter_name="default", resume=False,
                         output_dir=str(self.root / f"{candidate.placement.name}{tag}-seed{seed}"))
        fresh = copy.deepcopy(self.base) if isinstance(self.model, nn.Module) else self.model()
        result = train_on_placement(fresh, self.tokenizer, examples, config, candidate.placement, report=self.report,
                                    eval_examples=eval_examples, progress=self.progress)
        row = _row(result.summary, candidate, r, self.budget, seed, lr)
        del fresh, result
        gc.collect()  # one model copy at a time, however many runs
        return row

    def choose_lrs(self, found: list[Candidate], examples, grid: Sequence[float], seeds: Sequence[int],
                   fraction: float) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Each placement's best learning rate of ``grid`` (multipliers of the config's) on a
        validation split of ``examples``, over ``seeds``: the lowest mean validation loss, or under
        GRPO the highest mean validation reward."""
        train, validation = split_examples(examples, fraction, seeds[0])
        if not validation:
            raise PlopError("choosing a learning rate needs a validation split", "raise validation_fraction above 0")
        grpo = self.config.method == "grpo"
        chosen, selection = {}, []
        for candidate in found:
            scores = {}
            for m in grid:
                lr = self.config.lr * m
                runs = [self.run(candidate, s, lr, train, validation, tag=f"-lr{m:g}") for s in seeds]
                scores[m] = [r.eval_reward_after if grpo else r.eval_loss_after for r in runs]
                selection += [{"placement": candidate.placement.name, "multiplier": m, "lr": lr, "seed": r.seed,
                               "validation": v} for r, v in zip(runs, scores[m])]
            chosen[candidate.placement.name] = self.config.lr * best_multiplier(scores, higher_is_better=grpo)
        return chosen, selection


def best_multiplier(scores: Mapping[float, Sequence[float]], *, higher_is_better: bool) -> float:
    """The learning-rate multiplier whose runs have the best mean validation score (the highest
    reward, or the lowest loss); on a tie the first in grid order. ``plop compare --lr-grid`` and the
    placement studies (benchmarks/placement_study*.py), which run the grid resumably, choose by it."""
    sign = 1 if higher_is_better else -1
    means = {m: sign * float(np.mean(values)) for m, values in scores.items()}
    return max(means, key=means.get)


def _row(summary: dict, candidate: Candidate, rank: int, budget: int, seed: int, lr: float) -> CompareRow:
    ratio = candidate.params_at(rank) / budget
    before, after = summary["eval_before"] or {}, summary["eval_after"] or {}
    return CompareRow(
        placement=candidate.placement.name, types=candidate.placement.types, rank=rank,
        trainable_params=summary["trainable_params"], budget_ratio=round(ratio, 4),
        within_budget=abs(ratio - 1) <= BUDGET_TOLERANCE, eval_loss_before=before.get("loss"),
        eval_loss_after=after.get("loss"), eval_ppl_after=after.get("ppl"),
        seconds_per_step=summary["seconds_per_step"], seed=seed,
        loss_curve=summary["loss_curve"], rank_pattern=candidate.placement.rank_pattern,
        eval_reward_before=before.get("reward"), eval_reward_after=after.get("reward"),
        eval_reward_curve=summary.get("eval_reward_curve", []), reward_curve=summary.get("reward_curve", []),
        step_size=summary.get("step_size"), lr=lr, eval_items_after=after.get("items"),
    )


def _has_kappatune() -> bool:
    try:
        from peft.helpers import KappaTuneSelector  # noqa: F401
    except ImportError:
        return False
    return True
