"""Ranker: from per-module NFN to ranked module types and a placement.

PLoP's aggregation: a module type's score is the mean NFN of its modules over layers; types are
ranked ascending (least aligned with the task first) and LoRA goes on the lowest ones.

Selection strategies
    ``top_k``      the ``k`` lowest types (the paper: 3).
    ``budget``     greedy in ascending NFN: add each type whose LoRA parameters at rank ``r``
                   still fit in the budget.
    ``per_layer``  the lowest-NFN individual modules (``k`` per layer on average, or under a
                   budget), emitted as a regex that PEFT's ``target_modules`` full-matches.
    ``allocate``   a LoRA rank per type under a budget, growing as the type's NFN falls below
                   the others: ``r_t ~ s * (min_u NFN_u / NFN_t)^p`` rounded to the nearest of
                   :data:`ALLOCATION_RANKS` (types below the smallest get none), with the scale
                   ``s`` that spends the most of the budget without exceeding it.

Signals (:func:`signal_values`): the strategies rank any per-module value ascending; NFN is the
default, and ``grad-sign`` and ``nfn+grad-sign`` turn the LoRA-B gradient sign consistency
(:mod:`plop.measure.grad_sign`) into such a value.

Stability comes from a streaming Poisson bootstrap over samples (see :mod:`plop.measure.collector`):
the selection is recomputed under every replicate, giving each type the probability that it
lands in the recommended set.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from ..config import Strategy, check_positive
from ..errors import ConfigError
from .report import ModuleRecord, Recommendation, TypeRanking

STABLE_AGREEMENT = 0.9  # a selection is "stable" when >= 90 % of bootstrap replicates reproduce it
BYTES_PER_PARAM = 4  # PEFT keeps adapter weights in float32 by default
# steps of at most 1.5x above 4: with 2x steps (2, 4, 8) a half-budget allocation on SmolLM2 could
# spend only 85 % of its budget, the next scale up overshooting it
ALLOCATION_RANKS = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)

def signal_values(records: Sequence[ModuleRecord], signal: str = "nfn", weight: float = 0.5) -> np.ndarray:
    """Per-module values the strategies rank ascending (the lowest type mean is adapted first), by ``signal``:

    ``nfn``            NFN.
    ``grad-sign``      ``1 - c``, ``c`` the share of B-gradient entries whose sign holds over the k
                       batches: the most consistent types first, as the paper adapts the entries
                       whose gradient keeps its sign.
    ``nfn+grad-sign``  ``(1 - w) NFN / mean(NFN) + w (1 - c) / mean(1 - c)``, means over ``records``:
                       each signal scaled to mean 1, so neither wins by its units, and only scaled
                       (not shifted), so that allocate's rank ratios keep their meaning. At ``w = 0``
                       (``w = 1``) it is NFN's (grad-sign's) own values: scaled ones would rank the
                       same up to the last bit of near-ties between types, which rounding may flip.

    A record without a grad-sign score (a 3-D expert weight) gets NaN where grad-sign counts."""
    nfn = np.array([m.nfn for m in records], dtype=float)
    if signal == "nfn":
        return nfn
    inconsistency = np.array([np.nan if m.grad_sign is None else 1 - m.grad_sign for m in records])
    if signal == "grad-sign" or weight == 1:
        return inconsistency
    if weight == 0:
        return nfn
    scored = ~np.isnan(inconsistency)
    # a mean of 0 (every entry consistent everywhere) leaves the term 0: it then ranks nothing
    scale = max(float(inconsistency[scored].mean()) if scored.any() else 0.0, 1e-12)
    return (1 - weight) * nfn / nfn[scored].mean() + weight * inconsistency / scale


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


def rank_types(records: Sequence[ModuleRecord], values: np.ndarray | None = None) -> list[TypeRanking]:
    """Types sorted by ascending mean NFN, or mean ``values`` (:func:`signal_values`; types without
    values last), ties broken by name so that the order is reproducible."""
    groups: dict[str, list[ModuleRecord]] = defaultdict(list)
    for m in records:
        groups[m.type].append(m)
    means = type_means(records, values)
    rows = []
    for t, ms in groups.items():
        v = np.array([m.nfn for m in ms])
        rows.append(
            TypeRanking(
                type=t,
                position=0,
                nfn_mean=float(v.mean()),
                nfn_std=float(v.std()),
                nfn_min=float(v.min()),
                nfn_max=float(v.max()),
                n_modules=len(ms),
                lora_params_per_rank=sum(m.lora_params_per_rank for m in ms),
            )
        )
    rows.sort(key=lambda r: (math.isnan(means[r.type]), means[r.type], r.type))
    for i, r in enumerate(rows, 1):
        r.position = i
    return rows


def _select_top_k(means: Mapping[str, float], k: int) -> list[str]:
    return sorted(means, key=lambda t: (means[t], t))[:k]


def select_budget(means: Mapping[str, float], cost: Mapping[str, int], budget: int) -> list[str]:
    chosen, spent = [], 0
    for t in sorted(means, key=lambda t: (means[t], t)):
        if spent + cost[t] <= budget:
            chosen.append(t)
            spent += cost[t]
    return chosen


def _nearest_rank(x: float) -> int:
    """The allowed rank nearest to ``x`` in log scale; 0 below the smallest one's lower half-step."""
    if x < ALLOCATION_RANKS[0] / math.sqrt(2):
        return 0
    return min(ALLOCATION_RANKS, key=lambda r: abs(math.log(r / x)))


def allocate_ranks(means: Mapping[str, float], per_rank: Mapping[str, int], budget: int,
                   power: float) -> dict[str, int]:
    """A rank per type (types that get none are left out): ``r_t ~ s * (min NFN / NFN_t)^power``,
    each rounded to an allowed rank, with the scale ``s`` whose total ``sum_t r_t * per_rank[t]``
    comes closest to ``budget`` from below. Deterministic: ``s`` runs over a fixed grid."""
    lowest = min(means.values())
    weight = {t: (lowest / max(m, 1e-12)) ** power for t, m in means.items()}
    best: dict[str, int] = {}
    spent = 0
    for scale in np.geomspace(ALLOCATION_RANKS[0] / 2, ALLOCATION_RANKS[-1], 200):
        ranks = {t: r for t in sorted(means, key=lambda t: (means[t], t)) if (r := _nearest_rank(scale * weight[t]))}
        cost = sum(r * per_rank[t] for t, r in ranks.items())
        if spent < cost <= budget:
            best, spent = ranks, cost
    return best


def select_modules(
    records: Sequence[ModuleRecord], nfn: np.ndarray, rank: int, count: int, budget: int | None = None
) -> list[str]:
    """The per-layer rule: modules in ascending NFN (ties in record order), ``count`` of them, or
    as many as fit ``budget`` LoRA parameters at ``rank``."""
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


def data_free_choices(records: Sequence[ModuleRecord], k: int) -> dict[str, list[str]]:
    """The ``k`` types each score would pick, by its mean over layers: NFN (lowest first), KappaTune's
    condition number (lowest first) and Spectrum's SNR (highest first). Needs the records' scores."""
    def top(value) -> list[str]:
        groups: dict[str, list[float]] = defaultdict(list)
        for m in records:
            groups[m.type].append(value(m))
        means = {t: float(np.mean(vs)) for t, vs in groups.items()}
        return sorted(means, key=lambda t: (means[t], t))[:k]

    return {"nfn": top(lambda m: m.nfn),
            "kappatune": top(lambda m: math.inf if m.kappa is None else m.kappa),
            "spectrum": top(lambda m: -m.snr)}


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
    """A :class:`~plop.config.Strategy` on ``records``, its costs at ``rank``; callable on any vector
    of module NFNs, or of another signal's values (``values``: the point estimate, NFN by default)."""

    def __init__(self, records: Sequence[ModuleRecord], strategy: Strategy = Strategy(), *, rank: int = 16,
                 values: np.ndarray | None = None) -> None:
        check_positive("rank", rank)
        self.records = list(records)
        self.values = np.array([m.nfn for m in self.records]) if values is None else np.asarray(values, dtype=float)
        self.strategy, self.top_k, self.budget = strategy.kind, strategy.top_k, strategy.budget
        self.rank, self.power = rank, strategy.power
        self.per_rank: dict[str, int] = defaultdict(int)
        for m in self.records:
            self.per_rank[m.type] += m.lora_params_per_rank
        self.type_cost = {t: rank * c for t, c in self.per_rank.items()}
        if self.strategy == "allocate" and self.budget is None:  # what the paper's top-k placement costs here
            self.budget = sum(self.type_cost[t] for t in _select_top_k(type_means(self.records, self.values),
                                                                          self.top_k))
        layers = {m.layer for m in self.records if m.layer is not None}
        self.per_layer_count = self.top_k * max(len(layers), 1)

    def __call__(self, nfn: np.ndarray) -> frozenset[str]:
        """The selected types (or module names, for ``per_layer``)."""
        if self.strategy == "per_layer":
            return frozenset(select_modules(self.records, nfn, self.rank, self.per_layer_count, self.budget))
        means = type_means(self.records, nfn)
        if self.strategy == "top_k":
            return frozenset(_select_top_k(means, self.top_k))
        if self.strategy == "allocate":
            return frozenset(allocate_ranks(means, self.per_rank, self.budget, self.power))
        return frozenset(select_budget(means, self.type_cost, self.budget))

    def recommend(self, replicates: np.ndarray | None = None) -> tuple[Recommendation, dict[str, float] | None]:
        """The recommendation and, given bootstrap replicates ``(n_modules, R)``, per-type
        selection probabilities."""
        point = self(self.values)
        if not point:
            raise ConfigError(
                f"no module type fits a budget of {self.budget:,} parameters at rank {self.rank}; "
                f"the cheapest type needs {min(self.type_cost.values()):,}"
            )
        if self.strategy == "per_layer":
            names = sorted(point, key=[m.name for m in self.records].index)
            chosen = [m for m in self.records if m.name in point]
            types = sorted({m.type for m in chosen})
            target: list[str] | str = modules_regex(names)
        else:
            types = sorted(point, key=type_means(self.records, self.values).get)
            chosen = [m for m in self.records if m.type in point]
            names = [m.name for m in chosen]
            target = list(types)
        params, size = adapter_cost(chosen, self.rank)
        rec = Recommendation(strategy=self.strategy, types=types, target_modules=target, modules=names, rank=self.rank,
                             trainable_params=params, size_mb=size)
        if self.strategy == "allocate":
            self._allocated(rec)
        probabilities = None
        if replicates is not None:
            rec.agreement, probabilities = self.stability(point, replicates)
            rec.stable = rec.agreement >= STABLE_AGREEMENT
        return rec, probabilities

    def _allocated(self, rec: Recommendation) -> None:
        """Fill in an allocation's ranks and its cost (each type's alpha keeps alpha / rank as the
        settings' lora_alpha / r: :func:`plop.placement.lora_kwargs`)."""
        ranks = allocate_ranks(type_means(self.records, self.values), self.per_rank, self.budget, self.power)
        rec.rank_pattern = {t: ranks[t] for t in rec.types}
        rec.rank = max(ranks.values())
        rec.trainable_params = sum(r * self.per_rank[t] for t, r in ranks.items())
        rec.size_mb = rec.trainable_params * BYTES_PER_PARAM / 1e6
        rec.allocation = {"rule": "rank ~ s * (min value / value)^power (value: the signal's, NFN by default), "
                                  "nearest allowed rank, most of the budget",
                          "power": self.power, "ranks": list(ALLOCATION_RANKS), "budget": self.budget}

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
