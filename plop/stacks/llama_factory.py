"""LLaMA-Factory YAML, both ways. Keys: hiyouga/LLaMA-Factory src/llamafactory/hparams/finetuning_args.py
(LoraArguments: lora_rank 8, lora_alpha None = 2 x rank, lora_dropout 0, ``lora_target`` "all"
split on commas, additional_target = modules_to_save, freeze_vision_tower and
freeze_multi_modal_projector true) and src/llamafactory/model/adapter.py (the list goes to
peft.LoraConfig as target_modules, so entries are suffixes, never regexes; ``all`` becomes
find_all_linear_modules, and on a multimodal model every target goes through
patch_target_modules, model_utils/visual.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target

NAME = "llama-factory"


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in ("lora_target", "finetuning_type", "additional_target"))


def write(t: Target) -> ExportResult:
    listed = t.list_targets()  # a per-layer regex becomes the exact list of full module names
    settings = {
        "finetuning_type": "lora",
        "lora_rank": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "lora_target": ",".join(listed),
        "use_dora": t.settings.use_dora,
        "use_rslora": t.settings.use_rslora,
    }
    if t.settings.loraplus:
        settings["loraplus_lr_ratio"] = t.settings.loraplus_ratio
    warnings, exact = t.gaps("LLaMA-Factory", loraplus=True, patterns=False, parameters=False)
    return finish(t, NAME, settings, "llamafactory-lora.yaml", warnings, exact and t.is_exact(listed))


def read(data: Mapping, source: str) -> StackConfig:
    if data.get("finetuning_type", "lora") != "lora":
        raise ConfigError(f"{source}: finetuning_type {data.get('finetuning_type')!r}; plop check audits LoRA")
    rank = number(data, "lora_rank", 8)
    listed = names(data.get("lora_target", "all"), "lora_target") or ["all"]
    settings = LoraSettings(rank, number(data, "lora_alpha", rank * 2, float), number(data, "lora_dropout", 0.0, float),
                            use_dora=bool(data.get("use_dora")), use_rslora=bool(data.get("use_rslora")))
    return StackConfig(
        NAME, source, Placement(target_modules=listed), settings,
        modules_to_save=names(data.get("additional_target"), "additional_target"),
        base_model=data.get("model_name_or_path"), expand="llama-factory-all" if "all" in listed else "llama-factory",
        rules={"freeze_vision_tower": data.get("freeze_vision_tower", True) is not False,
               "freeze_multi_modal_projector": data.get("freeze_multi_modal_projector", True) is not False})
