"""LLaMA-Factory YAML. Keys: hiyouga/LLaMA-Factory src/llamafactory/hparams/finetuning_args.py
(LoraArguments; ``lora_target`` is split on commas into a list) and src/llamafactory/model/adapter.py
(the list goes to peft.LoraConfig as target_modules, so entries are suffixes, never regexes)."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target


def export(t: Target) -> ExportResult:
    targets = t.list_targets()  # a per-layer regex becomes the exact list of full module names
    settings = {
        "finetuning_type": "lora",
        "lora_rank": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "lora_target": ",".join(targets),
        "use_dora": t.settings.use_dora,
    }
    if t.settings.loraplus:
        settings["loraplus_lr_ratio"] = t.settings.loraplus_ratio
    warnings, exact = t.gaps("LLaMA-Factory", loraplus=True, patterns=False, parameters=False)
    return finish(t, "llama-factory", settings, "llamafactory-lora.yaml", warnings,
                  exact and t.is_exact(targets))
