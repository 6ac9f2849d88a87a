"""Wrapping a model with PEFT LoRA on resolved targets: the ``LoraConfig`` and the wrap itself."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import PlopError
from ..model.layout import ModelLayout, modules_peft_adapts
from ..placement import Placement, lora_config
from ..ranking.report import Recommendation
from .config import TrainConfig


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; that
    FutureWarning is nothing a plop user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def run_lora_config(layout: ModelLayout, config: TrainConfig, placement: Placement, task_type: str = "CAUSAL_LM"):
    """The ``peft.LoraConfig`` of a run (:func:`plop.placement.lora_config`), its targets checked
    first to match a linear module of this model (a recommendation was checked against the model
    it was diagnosed on)."""
    if placement.target_modules or not placement.target_parameters:
        modules_peft_adapts(layout, placement.target_modules)
    return lora_config(placement, config.lora, task_type=task_type)


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


def planned(layout: ModelLayout, placement: Placement) -> set[str]:
    """What the plan adapts: the recommendation's modules, explicit targets as PEFT's matcher
    reads them, else every module and expert weight of the placement's types."""
    if isinstance(placement, Recommendation):
        return set(placement.modules)
    if placement.name in MODULE_LEVEL:
        return set(modules_peft_adapts(layout, placement.target_modules))
    return {n for n, t in layout.role_map.items() if t in placement.types and n != layout.head}


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
