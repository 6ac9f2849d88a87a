"""TRL CLI YAML (``trl sft --config FILE``). Keys: huggingface/trl trl/trainer/model_config.py
(ModelConfig: use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules,
lora_target_parameters, lora_task_type, use_dora) and trl/trainer/utils.py get_peft_config."""

from __future__ import annotations

from .lint import survive_trl_collapse
from .result import ExportResult, finish
from .target import Target


def export(t: Target) -> ExportResult:
    targets, warnings = survive_trl_collapse(t.target_modules)
    settings = {
        "use_peft": True,
        "lora_r": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "lora_target_modules": targets,
        "use_dora": t.settings.use_dora,
    }
    if t.report.task_type:
        settings["lora_task_type"] = t.report.task_type
    if t.target_parameters:
        settings["lora_target_parameters"] = t.target_parameters
    hint = "; in Python pass optimizers=(peft.optimizers.create_loraplus_optimizer(...), None)"
    gaps, exact = t.gaps("TRL's CLI", loraplus=False, patterns=False, parameters=True, loraplus_hint=hint)
    return finish(t, "trl", settings, "trl-sft.yaml", warnings + gaps, exact and t.is_exact(targets))
