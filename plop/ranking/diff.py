"""Diff two reports: how much does placement move between two tasks, or two checkpoints?

PLoP's recommendation is task-dependent by design; :func:`diff_reports` says by how much, type by
type (mean NFN, rank) and for the recommendation itself. :func:`plop.ranking.render.diff_table` renders it
in a terminal, :func:`plop.ranking.render.plot_diff` as a dumbbell chart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import PlopError
from .precision import PrecisionCheck, compare_precision, quantization_pair
from .report import Report


@dataclass
class TypeDiff:
    """One module type in both reports; ``None`` on the side that lacks it."""

    type: str
    nfn_a: float | None
    nfn_b: float | None
    delta: float | None  # nfn_b - nfn_a
    rank_a: int | None
    rank_b: int | None
    rank_change: int | None  # rank_b - rank_a: negative moves the type up, towards LoRA
    recommended_a: bool
    recommended_b: bool


@dataclass
class ReportDiff:
    """What changed from report A to report B."""

    label_a: str
    label_b: str
    types: list[TypeDiff]  # A's ranking order, then the types only B has in B's order
    only_in_a: list[str]
    only_in_b: list[str]
    recommended_a: list[str]
    recommended_b: list[str]
    added: list[str]  # recommended in B, not in A
    removed: list[str]  # recommended in A, not in B
    target_modules_a: list[str] | str
    target_modules_b: list[str] | str
    warnings: list[str]
    precision: PrecisionCheck | None = None  # when A and B differ only in that one is quantized

    @property
    def recommendation_changed(self) -> bool:
        return bool(self.added or self.removed) or _targets(self.target_modules_a) != _targets(self.target_modules_b)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "recommendation_changed": self.recommendation_changed}


def _targets(target_modules: list[str] | str) -> frozenset[str] | str:
    """PEFT reads a list as a set of names (order is the ranking's, not a change) and a string as a regex."""
    return target_modules if isinstance(target_modules, str) else frozenset(target_modules)


def _describe(report: Report) -> str:
    return f"{report.model['id']} on {report.data['source']}"


def _warnings(a: Report, b: Report) -> list[str]:
    """What makes the two reports less comparable than two tasks on one model."""
    warnings = []
    arch_a, arch_b = a.model["architecture"], b.model["architecture"]
    if arch_a != arch_b:
        warnings.append(f"different architectures ({arch_a} vs {arch_b}): only the shared module types are "
                        "compared, and their NFNs come from different weights")
    elif {m.name: (m.d_out, m.d_in) for m in a.modules} != {m.name: (m.d_out, m.d_in) for m in b.modules}:
        warnings.append(f"same architecture ({arch_a}) but different modules or shapes: models of different sizes?")
    rec_a, rec_b = a.recommendation, b.recommendation
    if (rec_a.strategy, rec_a.rank) != (rec_b.strategy, rec_b.rank):
        warnings.append(f"different settings ({rec_a.strategy} at r={rec_a.rank} vs {rec_b.strategy} at "
                        f"r={rec_b.rank}): a changed recommendation may come from them, not from the data")
    return warnings


def diff_reports(a: Report, b: Report, label_a: str | None = None, label_b: str | None = None) -> ReportDiff:
    """Per-type NFN and rank in A and B, and how the recommendation changes.

    Labels default to "model on data source". Reports of different models are still diffed on the
    types they share, with a warning; reports that share no module type raise :class:`PlopError`.
    """
    types_a = {t.type: t for t in a.types}
    types_b = {t.type: t for t in b.types}
    if not types_a.keys() & types_b.keys():
        raise PlopError(f"the reports share no module type ({', '.join(types_a)} vs {', '.join(types_b)}): "
                        "nothing to compare")
    rec_a, rec_b = a.recommendation.types, b.recommendation.types
    pair = quantization_pair(a, b)
    rows = []
    for name in [*types_a, *(t for t in types_b if t not in types_a)]:
        ta, tb = types_a.get(name), types_b.get(name)
        both = ta is not None and tb is not None
        rows.append(TypeDiff(
            type=name,
            nfn_a=getattr(ta, "nfn_mean", None), nfn_b=getattr(tb, "nfn_mean", None),
            delta=tb.nfn_mean - ta.nfn_mean if both else None,
            rank_a=getattr(ta, "position", None), rank_b=getattr(tb, "position", None),
            rank_change=tb.position - ta.position if both else None,
            recommended_a=name in rec_a, recommended_b=name in rec_b,
        ))
    return ReportDiff(
        label_a=label_a or _describe(a), label_b=label_b or _describe(b), types=rows,
        only_in_a=[t for t in types_a if t not in types_b], only_in_b=[t for t in types_b if t not in types_a],
        recommended_a=list(rec_a), recommended_b=list(rec_b),
        added=[t for t in rec_b if t not in rec_a], removed=[t for t in rec_a if t not in rec_b],
        target_modules_a=a.recommendation.target_modules, target_modules_b=b.recommendation.target_modules,
        warnings=_warnings(a, b), precision=compare_precision(*pair) if pair else None,
    )
