"""axolotl YAML. Keys: axolotl-ai-cloud/axolotl src/axolotl/utils/schemas/peft.py (LoraConfig
section) and src/axolotl/loaders/adapter.py (_build_peft_lora_config passes lora_target_modules,
a list or a regex string, straight to peft.LoraConfig)."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target


def export(t: Target) -> ExportResult:
    settings = {
        "adapter": "lora",
        "lora_r": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "lora_target_modules": t.target_modules,  # a per-layer regex stays a regex: PEFT full-matches it
        "lora_target_linear": False,  # True would add every linear module to the targets
        "peft_use_dora": t.settings.use_dora,
    }
    warnings: list[str] = []
    if t.settings.loraplus:
        settings["loraplus_lr_ratio"] = t.settings.loraplus_ratio
    if t.rank_pattern:
        settings["lora_rank_pattern"] = t.rank_pattern
    if t.alpha_pattern:
        settings["lora_alpha_pattern"] = t.alpha_pattern
    if t.target_parameters:
        settings["lora_target_parameters"] = t.target_parameters
        if t.settings.dropout:  # schemas/peft.py validate_lora_target_parameters_dropout refuses it
            settings["lora_dropout"] = 0.0
            warnings.append("axolotl requires lora_dropout 0 with lora_target_parameters; set it to 0")
    return finish(t, "axolotl", settings, "axolotl-lora.yaml", warnings, t.is_exact(t.target_modules))
