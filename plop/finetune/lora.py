"""Wrapping a model with PEFT LoRA on resolved targets: the ``LoraConfig`` and the wrap itself."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import PlopError
from ..model.placement import ModelLayout, Targets, modules_peft_adapts
from ..ranking.peft_config import peft_lora_config, rank_patterns
from ..ranking.report import Report
from .config import TrainConfig


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; that
    FutureWarning is nothing a plop user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def lora_config(layout: ModelLayout, config: TrainConfig, targets: Targets, report: Report | None,
                task_type: str = "CAUSAL_LM"):
    """The ``peft.LoraConfig`` of a run: the report's own export for its recommendation, else the
    targets, checked first to match a linear module of this model."""
    options = {"lora_dropout": config.dropout, "use_dora": config.dora, "task_type": task_type}
    if targets.placement == "recommended" and report is not None:
        return report.to_peft_config(r=config.rank, lora_alpha=config.lora_alpha, **options)
    if targets.rank_pattern:  # an allocation: each type its rank, alpha / rank as for the run's rank
        options.update(rank_patterns(targets.rank_pattern, config.rank, config.lora_alpha))
    if targets.target_modules or not targets.target_parameters:
        modules_peft_adapts(layout, targets.target_modules)
    return peft_lora_config(r=config.rank, lora_alpha=config.lora_alpha, target_modules=targets.target_modules,
                            target_parameters=targets.target_parameters, **options)


def wrap(model: nn.Module, lora, seed: int):
    """``get_peft_model`` with the LoRA A matrices drawn from ``seed`` (before the Trainer seeds
    anything), so two runs of one seed start from the same adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    with quiet_peft():
        return get_peft_model(model, lora)


# placements chosen module by module (explicit targets, and compare's module-level baselines): their
# plan is the modules their targets name, not every module of the types they touch
MODULE_LEVEL = ("custom", "kappatune", "per-layer", "spectrum")


def planned(layout: ModelLayout, targets: Targets, report: Report | None) -> set[str]:
    """What the plan adapts: the recommendation's modules, explicit targets as PEFT's matcher
    reads them, else every module and expert weight of the placement's types."""
    if targets.placement == "recommended" and report is not None:
        return set(report.recommendation.modules)
    if targets.placement in MODULE_LEVEL:
        return set(modules_peft_adapts(layout, targets.target_modules))
    return {n for n, t in layout.role_map.items() if t in targets.types and n != layout.head}


def check_built(peft_model, plan: set[str]) -> None:
    """Stop before training when PEFT wrapped other modules than planned: a LoraConfig PEFT
    rewrote (its MoE conversion), a report edited by hand, a target that reaches more or less."""
    from ..audit.resolve import wrapped_targets

    built = {key for key, _ in wrapped_targets(peft_model.base_model.model).values()}
    if built != plan:
        missing, extra = sorted(plan - built), sorted(built - plan)
        parts = [f"{len(missing)} planned not wrapped (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} wrapped outside the plan (e.g. {extra[0]})"] if extra else []
        raise PlopError(f"PEFT built a different adapter than planned: {'; '.join(parts)}; nothing was trained",
                        "run plop check on the config to see what PEFT wraps")
