"""TRL CLI YAML (``trl sft --config FILE``), both ways. Keys: huggingface/trl
trl/trainer/model_config.py (ModelConfig: use_peft, lora_r 16, lora_alpha 32, lora_dropout 0.05,
lora_target_modules, lora_target_parameters, lora_task_type, use_dora, use_rslora; __post_init__ turns a
one-element ``lora_target_modules`` list into its string, which PEFT then full-matches as a regex)
and trl/trainer/utils.py get_peft_config (bias "none"; ``lora_target_modules`` None leaves PEFT's
default for the model type)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..placement import LoraSettings, Placement
from .lint import survive_trl_collapse
from .reading import StackConfig, names, number, targets
from .result import ExportResult, finish
from .target import Target

NAME = "trl"


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and any(
        k in data for k in ("use_peft", "lora_target_modules", "lora_r", "lora_task_type"))


def write(t: Target) -> ExportResult:
    emitted, warnings = survive_trl_collapse(t.target_modules)
    dropout, zeroed = t.dropout("TRL")
    settings = {
        "use_peft": True,
        "lora_r": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": dropout,
        "lora_target_modules": emitted,
        "use_dora": t.settings.use_dora,
        "use_rslora": t.settings.use_rslora,
    }
    if t.report.task_type:
        settings["lora_task_type"] = t.report.task_type
    if t.target_parameters:
        settings["lora_target_parameters"] = t.target_parameters
    hint = "; in Python pass optimizers=(peft.optimizers.create_loraplus_optimizer(...), None)"
    gaps, exact = t.gaps("TRL's CLI", loraplus=False, patterns=False, parameters=True, loraplus_hint=hint)
    return finish(t, NAME, settings, "trl-sft.yaml", warnings + zeroed + gaps, exact and t.is_exact(emitted))


def read(data: Mapping, source: str) -> StackConfig:
    wanted = targets(data.get("lora_target_modules"), "lora_target_modules")
    notes = []
    if isinstance(wanted, list) and len(wanted) == 1:
        notes.append(f"TRL turns the one-element lora_target_modules {wanted} into the string "
                     f"{wanted[0]!r}, which PEFT full-matches as a regex against whole module names")
        wanted = wanted[0]
    placement = Placement(target_modules=wanted,
                          target_parameters=names(data.get("lora_target_parameters"), "lora_target_parameters"))
    settings = LoraSettings(number(data, "lora_r", 16), number(data, "lora_alpha", 32, float),
                            number(data, "lora_dropout", 0.05, float), use_dora=bool(data.get("use_dora")),
                            use_rslora=bool(data.get("use_rslora")))
    return StackConfig(NAME, source, placement, settings,
                       modules_to_save=names(data.get("lora_modules_to_save"), "lora_modules_to_save"),
                       base_model=data.get("model_name_or_path"), notes=notes)
