"""Where adapters go: every named placement, their costs, and the resolution of a user's choice
(a report's recommendation, a named placement, or explicit ``target_modules``) into PEFT targets
on a model's :class:`~plop.model.layout.ModelLayout`. Torch-free."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from ..errors import ConfigError, PlopError
from ..model.layout import ModelLayout, modules_peft_adapts
from ..model.roles import placement_groups
from ..placement import Placement
from .ranker import adapter_cost, modules_regex
from .report import ModuleRecord, Recommendation, Report

PLACEMENTS = ("qv", "attention", "mlp", "all-linear")  # resolved from a model's own module roles
TRAIN_PLACEMENTS = ("recommended", *PLACEMENTS)
COMPARE_DEFAULT = (*TRAIN_PLACEMENTS, "inverse", "kappatune")
# module-level baselines at the recommendation's module count: the lowest-NFN modules (the
# per_layer strategy) and Spectrum's highest-SNR ones (one SVD per weight); and NFN-guided ranks
# per type (the allocate strategy) under the recommendation's budget
COMPARE_PLACEMENTS = (*COMPARE_DEFAULT, "per-layer", "spectrum", "allocate")



def placement_types(types: Sequence[ModuleRecord] | Mapping[str, str], placement: str,
                    refused: Collection[str] = ()) -> list[str]:
    """Module types of a named placement: diagnosed records, or ``{name: type}`` of a model's
    modules (a model trained without a report). Types PEFT refuses on the model are left out.

    ``qv``: query and value projections (a fused qkv counts); ``attention``: types inside an
    attention block; ``mlp``: the feed-forward's (experts included); ``all-linear``: every type
    (see :func:`plop.model.roles.placement_groups`).
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
    pairs = types if isinstance(types, Mapping) else {m.name: m.type for m in types}
    return [t for t in placement_groups(pairs)[placement] if t not in refused]


def placement_costs(records: Sequence[ModuleRecord], rank: int, recommended: Recommendation) -> dict[str, dict]:
    """Trainable parameters and adapter size of the recommendation and each named placement."""
    costs = {"recommended": {"types": recommended.types, "trainable_params": recommended.trainable_params,
                             "size_mb": recommended.size_mb}}
    for placement in PLACEMENTS:
        types = placement_types(records, placement, recommended.excluded or {})
        params, size = adapter_cost([m for m in records if m.type in types], rank)
        costs[placement] = {"types": types, "trainable_params": params, "size_mb": size}
    return costs


def recommendation_targets(rec: Recommendation, layout: ModelLayout) -> None:
    """Set the recommendation's PEFT targets: exact role-based targets for chosen types, or for a
    per-layer choice a regex over the chosen module names and the chosen expert weights by name."""
    if rec.strategy == "per_layer":
        names = [n for n in rec.modules if n not in layout.params]
        rec.target_modules = modules_regex(names) if names else []
        rec.target_parameters = [n for n in rec.modules if n in layout.params] or None
    else:
        rec.target_modules, rec.target_parameters = layout.peft_targets(rec.types)


def check_report_matches(report: Report, layout: ModelLayout) -> None:
    """Refuse a report diagnosed on another model: same architecture, and every diagnosed module
    is a linear module of this model with the same shape."""
    missing = [m.name for m in report.modules if layout.linear.get(m.name) != (m.d_out, m.d_in)]
    if report.model.get("architecture") != layout.architecture or missing:
        differ = ""
        if missing:
            differ = f"; {len(missing)} of its {len(report.modules)} modules differ here (e.g. {missing[0]})"
        raise PlopError(
            f"the report was made for another model: {report.model.get('id')} ({report.model.get('architecture')}), "
            f"not this {layout.architecture}{differ}",
            "diagnose this model first (plop diagnose MODEL)",
        )


def resolve_placement(
    layout: ModelLayout,
    *,
    report: Report | None = None,
    target_modules: Sequence[str] | str | None = None,
    placement: str | None = None,
) -> Placement:
    """Where the adapters go: explicit ``target_modules``, a named ``placement`` (resolved on the
    report's modules, else on the model's), or the report's recommendation."""
    if target_modules is not None and placement is not None:
        raise ConfigError("give target_modules or placement, not both")
    if report is not None:
        check_report_matches(report, layout)
    if target_modules is not None:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        return Placement(target_modules=targets, types=layout.types_of(modules_peft_adapts(layout, targets)))
    placement = placement or ("recommended" if report is not None else None)
    if placement is None:
        raise ConfigError("say where the adapters go: a report, target_modules or a placement")
    if placement not in TRAIN_PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose from {', '.join(TRAIN_PLACEMENTS)}")
    if placement == "recommended":
        if report is None:
            raise PlopError("placement 'recommended' needs a report", "run plop diagnose first, or pass --report")
        return report.recommendation
    names = [m.name for m in report.modules] if report is not None else layout.body
    types = placement_types({n: layout.role_map[n] for n in names}, placement, layout.refused)
    if not types:
        raise PlopError(f"placement {placement!r} matches no module of this model",
                        f"its module types: {', '.join(layout.types_of(layout.body))}")
    return layout.placement(placement, types)
