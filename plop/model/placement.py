"""Where adapters go: every named placement, their costs, and the resolution of a user's choice
(a report's recommendation, a named placement, or explicit ``target_modules``) into PEFT targets.

Torch-free: it works on module names and shapes (a :class:`ModelLayout`), which
:func:`plop.model.loading.model_layout` reads off a loaded model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import ConfigError, PlopError
from ..placement import Placement
from ..ranking.ranker import adapter_cost, modules_regex
from ..ranking.report import ModuleRecord, Recommendation, Report
from .roles import peft_matches, peft_target_parameters, peft_targets, placement_groups, role_types

PLACEMENTS = ("qv", "attention", "mlp", "all-linear")  # resolved from a model's own module roles
TRAIN_PLACEMENTS = ("recommended", *PLACEMENTS)
COMPARE_DEFAULT = (*TRAIN_PLACEMENTS, "inverse", "kappatune")
# module-level baselines at the recommendation's module count: the lowest-NFN modules (the
# per_layer strategy) and Spectrum's highest-SNR ones (one SVD per weight); and NFN-guided ranks
# per type (the allocate strategy) under the recommendation's budget
COMPARE_PLACEMENTS = (*COMPARE_DEFAULT, "per-layer", "spectrum", "allocate")


@dataclass(frozen=True)
class ModelLayout:
    """What placing adapters needs to know of a model: its architecture, its linear modules
    (``name -> (d_out, d_in)``, the output head included), the head's name, its 3-D expert
    weights (``name -> (experts, d_out, d_in)``, PEFT ``target_parameters``), every module name
    (PEFT wraps convolutions too, so exact targets must miss them) and the types PEFT refuses on
    this model (type -> why, see :mod:`plop.model.peft_rules`)."""

    architecture: str
    linear: Mapping[str, tuple[int, int]]
    head: str | None = None
    params: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def body(self) -> list[str]:
        """Linear module names and expert weights without the output head: what placements choose from."""
        return [n for n in [*self.linear, *self.params] if n != self.head]

    @cached_property
    def role_map(self) -> dict[str, str]:
        """Every linear module's and expert weight's role-true type (:func:`plop.model.roles.role_types`)."""
        return role_types([*self.linear, *self.params], params=self.params)

    def types_of(self, names: Collection[str]) -> list[str]:
        return sorted({self.role_map[n] for n in names})

    def peft_targets(self, types: Collection[str]) -> tuple[list[str] | str, list[str] | None]:
        """``(target_modules, target_parameters)`` that PEFT matches to exactly the modules and
        expert weights of ``types``; ``target_modules`` is ``[]`` when only expert weights are chosen."""
        params = {n: t for n, t in self.role_map.items() if n in self.params}
        modules = {n: t for n, t in self.role_map.items() if n not in self.params}
        chosen_params = [t for t in types if t in set(params.values())]
        chosen_modules = [t for t in types if t not in chosen_params]
        target_modules = peft_targets(chosen_modules, modules, self.modules) if chosen_modules else []
        if isinstance(target_modules, list):  # the types themselves: keep their order (ascending NFN)
            target_modules = sorted(target_modules, key=chosen_modules.index)
        return target_modules, peft_target_parameters(chosen_params, params) if chosen_params else None

    def placement(self, name: str, types: list[str]) -> Placement:
        """The placement ``name`` of ``types``, with its exact PEFT targets."""
        target_modules, target_parameters = self.peft_targets(types)
        return Placement(name=name, target_modules=target_modules, types=types, target_parameters=target_parameters)


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


def modules_peft_adapts(layout: ModelLayout, target_modules: Sequence[str] | str) -> list[str]:
    """The linear modules PEFT would adapt (:func:`plop.model.roles.peft_matches`)."""
    matched = [n for n in layout.linear if peft_matches(n, target_modules)]
    if not matched:
        raise PlopError(f"target modules {target_modules!r} match no linear module of this model",
                        f"its module types: {', '.join(layout.types_of(layout.body))}")
    return matched
