"""Ranker: from per-module NFN to ranked module types and a placement.

PLoP's aggregation: a module type's score is the mean NFN of its modules over layers; types are
ranked ascending (least aligned with the task first) and LoRA goes on the lowest ones.

Selection strategies
    ``top_k``      the ``k`` lowest types (the paper: 3).
    ``budget``     greedy in ascending NFN: add each type whose LoRA parameters at rank ``r``
                   still fit in the budget.
    ``per_layer``  the lowest-NFN individual modules (``k`` per layer on average, or under a
                   budget), emitted as a regex that PEFT's ``target_modules`` full-matches.

Stability comes from a streaming Poisson bootstrap over samples (see :mod:`plop.collector`):
the selection is recomputed under every replicate, giving each type the probability that it
lands in the recommended set.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("top_k", "budget", "per_layer")
STABLE_AGREEMENT = 0.9  # a selection is "stable" when >= 90 % of bootstrap replicates reproduce it
BYTES_PER_PARAM = 4  # PEFT keeps adapter weights in float32 by default

# Names PEFT users know these families by; a placement keeps the types a model actually has.
_QV = {"q_proj", "v_proj", "query", "value", "q", "v", "c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv"}
_ATTENTION_PARENTS = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class ModuleRecord:
    """One linear module's diagnosis."""

    name: str
    type: str
    layer: int | None
    d_out: int
    d_in: int
    nfn: float
    nfn_std: float
    tokens: int
    calls: int
    baseline: float
    input_norm_mean: float
    input_norm_max: float
    output_norm_mean: float

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA adds ``r * (d_in + d_out)`` parameters (A is r x d_in, B is d_out x r)."""
        return self.d_in + self.d_out


@dataclass
class TypeRanking:
    """One module type, aggregated over layers."""

    type: str
    rank: int
    nfn_mean: float
    nfn_std: float
    nfn_min: float
    nfn_max: float
    n_modules: int
    lora_params_per_rank: int
    selection_probability: float | None = None


@dataclass
class Recommendation:
    strategy: str
    types: list[str]
    target_modules: list[str] | str
    modules: list[str]
    rank: int
    trainable_params: int
    size_mb: float
    stable: bool | None = None
    agreement: float | None = None
    samples_to_stable: int | None = None


def adapter_cost(records: Sequence[ModuleRecord], rank: int) -> tuple[int, float]:
    """Trainable LoRA parameters at ``rank`` over ``records`` and the adapter size in MB."""
    params = rank * sum(m.lora_params_per_rank for m in records)
    return params, params * BYTES_PER_PARAM / 1e6


def type_means(records: Sequence[ModuleRecord], nfn: np.ndarray | None = None) -> dict[str, float]:
    """Mean NFN per type over layers; ``nfn`` overrides the records' values (bootstrap)."""
    values = nfn if nfn is not None else np.array([m.nfn for m in records])
    groups: dict[str, list[float]] = defaultdict(list)
    for m, v in zip(records, values):
        groups[m.type].append(v)
    return {t: float(np.mean(vs)) for t, vs in groups.items()}


def rank_types(records: Sequence[ModuleRecord]) -> list[TypeRanking]:
    """Types sorted by ascending mean NFN (ties broken by name, so the order is reproducible)."""
    groups: dict[str, list[ModuleRecord]] = defaultdict(list)
    for m in records:
        groups[m.type].append(m)
    rows = []
    for t, ms in groups.items():
        v = np.array([m.nfn for m in ms])
        rows.append(
            TypeRanking(
                type=t,
                rank=0,
                nfn_mean=float(v.mean()),
                nfn_std=float(v.std()),
                nfn_min=float(v.min()),
                nfn_max=float(v.max()),
                n_modules=len(ms),
                lora_params_per_rank=sum(m.lora_params_per_rank for m in ms),
            )
        )
    rows.sort(key=lambda r: (r.nfn_mean, r.type))
    for i, r in enumerate(rows, 1):
        r.rank = i
    return rows


def _select_top_k(means: Mapping[str, float], k: int) -> list[str]:
    return sorted(means, key=lambda t: (means[t], t))[:k]


def _select_budget(means: Mapping[str, float], cost: Mapping[str, int], budget: int) -> list[str]:
    chosen, spent = [], 0
    for t in sorted(means, key=lambda t: (means[t], t)):
        if spent + cost[t] <= budget:
            chosen.append(t)
            spent += cost[t]
    return chosen


def _select_modules(
    records: Sequence[ModuleRecord], nfn: np.ndarray, rank: int, count: int, budget: int | None
) -> list[str]:
    chosen, spent = [], 0
    for i in np.lexsort((np.arange(len(records)), nfn)):
        m = records[i]
        cost = rank * m.lora_params_per_rank
        if budget is not None:
            if spent + cost > budget:
                continue
        elif len(chosen) == count:
            break
        chosen.append(m.name)
        spent += cost
    return chosen


def modules_regex(names: Sequence[str]) -> str:
    """A regex that PEFT full-matches against exactly ``names``, grouped by layer template.

    ``model.layers.0.mlp.up_proj`` and ``model.layers.7.mlp.up_proj`` become
    ``model\\.layers\\.(?:0|7)\\.mlp\\.up_proj``.
    """
    templates: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = re.search(r"(?<=\.)\d+(?=\.)", name)
        if match is None:
            templates[re.escape(name)].append("")
            continue
        key = re.escape(name[: match.start()]) + "{}" + re.escape(name[match.end() :])
        templates[key].append(match.group(0))
    parts = []
    for key, layers in sorted(templates.items()):
        if layers == [""]:
            parts.append(key)
        else:
            ordered = sorted(set(layers), key=int)
            parts.append(key.replace("{}", ordered[0] if len(ordered) == 1 else "(?:" + "|".join(ordered) + ")"))
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


class Selector:
    """A placement strategy with its parameters; callable on any vector of module NFNs."""

    def __init__(
        self,
        records: Sequence[ModuleRecord],
        strategy: str = "top_k",
        *,
        top_k: int = 3,
        budget: int | None = None,
        rank: int = 16,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if strategy == "budget" and (budget is None or budget <= 0):
            raise ValueError("the budget strategy needs a positive parameter budget")
        self.records = list(records)
        self.strategy, self.top_k, self.budget, self.rank = strategy, top_k, budget, rank
        self.type_cost: dict[str, int] = defaultdict(int)
        for m in self.records:
            self.type_cost[m.type] += rank * m.lora_params_per_rank
        layers = {m.layer for m in self.records if m.layer is not None}
        self.per_layer_count = top_k * max(len(layers), 1)

    def __call__(self, nfn: np.ndarray) -> frozenset[str]:
        """The selected types (or module names, for ``per_layer``)."""
        if self.strategy == "per_layer":
            return frozenset(_select_modules(self.records, nfn, self.rank, self.per_layer_count, self.budget))
        means = type_means(self.records, nfn)
        if self.strategy == "top_k":
            return frozenset(_select_top_k(means, self.top_k))
        return frozenset(_select_budget(means, self.type_cost, self.budget))

    def recommend(self, replicates: np.ndarray | None = None) -> tuple[Recommendation, dict[str, float] | None]:
        """The recommendation and, given bootstrap replicates ``(n_modules, R)``, per-type
        selection probabilities."""
        point = self(np.array([m.nfn for m in self.records]))
        if not point:
            raise ValueError(
                f"no module type fits a budget of {self.budget:,} parameters at rank {self.rank}; "
                f"the cheapest type needs {min(self.type_cost.values()):,}"
            )
        if self.strategy == "per_layer":
            names = sorted(point, key=[m.name for m in self.records].index)
            chosen = [m for m in self.records if m.name in point]
            types = sorted({m.type for m in chosen})
            target: list[str] | str = modules_regex(names)
        else:
            types = sorted(point, key=type_means(self.records).get)
            chosen = [m for m in self.records if m.type in point]
            names = [m.name for m in chosen]
            target = list(types)
        params, size = adapter_cost(chosen, self.rank)
        rec = Recommendation(self.strategy, types, target, names, self.rank, params, size)
        probabilities = None
        if replicates is not None:
            rec.agreement, probabilities = self.stability(point, replicates)
            rec.stable = rec.agreement >= STABLE_AGREEMENT
        return rec, probabilities

    def stability(self, point: frozenset[str], replicates: np.ndarray) -> tuple[float, dict[str, float] | None]:
        """Share of replicates that reproduce ``point``, and per-type selection probability."""
        ok = np.isfinite(replicates).all(axis=0)
        selections = [self(replicates[:, j]) for j in np.flatnonzero(ok)]
        if not selections:
            return 0.0, None
        agreement = float(np.mean([s == point for s in selections]))
        if self.strategy == "per_layer":
            return agreement, None
        types = {m.type for m in self.records}
        return agreement, {t: float(np.mean([t in s for s in selections])) for t in sorted(types)}


def placement_types(records: Sequence[ModuleRecord], placement: str) -> list[str]:
    """Module types of a named placement, for this model's names.

    ``qv``: query and value projections (a fused qkv counts); ``attention``: types under an
    attention block; ``mlp``: the other types; ``all-linear``: every type.
    """
    return _placement_types([(m.name, m.type) for m in records], placement)


def placement_types_for_names(names: Sequence[str], placement: str) -> list[str]:
    """:func:`placement_types` for a model without a report: from its linear module names
    (:func:`plop.collector.find_linear_modules`), so training can place adapters undiagnosed."""
    from .collector import module_type  # lazily: the ranker itself needs no torch

    return _placement_types([(n, module_type(n)) for n in names], placement)


def _placement_types(modules: Sequence[tuple[str, str]], placement: str) -> list[str]:
    attention = {t for name, t in modules if _ATTENTION_PARENTS.search(name.rsplit(".", 1)[0])}
    every = sorted({t for _, t in modules})
    if placement == "all-linear":
        return every
    if placement == "attention":
        return [t for t in every if t in attention]
    if placement == "mlp":
        return [t for t in every if t not in attention]
    if placement == "qv":
        return [t for t in every if t in _QV]
    raise ValueError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")


PLACEMENTS = ("qv", "attention", "mlp", "all-linear")


def placement_costs(records: Sequence[ModuleRecord], rank: int, recommended: Recommendation) -> dict[str, dict]:
    """Trainable parameters and adapter size of the recommendation and each named placement."""
    costs = {"recommended": {"types": recommended.types, "trainable_params": recommended.trainable_params,
                             "size_mb": recommended.size_mb}}
    for placement in PLACEMENTS:
        types = placement_types(records, placement)
        params, size = adapter_cost([m for m in records if m.type in types], rank)
        costs[placement] = {"types": types, "trainable_params": params, "size_mb": size}
    return costs
