"""PEFT ``adapter_config.json``: the ``LoraConfig`` keyword arguments plop sets, under PEFT's own
key names, as ``LoraConfig.from_pretrained(DIR)`` reads them (PEFT fills every other field with its
default). Written without importing PEFT or torch, so ``plop export`` starts in a fraction of a second;
a test loads it through PEFT and compares it with the ``LoraConfig`` plop builds."""

from __future__ import annotations

import json

from ..placement import fitted, lora_kwargs
from .result import ExportResult, finish
from .target import Target

# Module-name fragments of vision towers and projectors in transformers' VLMs, excluded when
# suffix targets would otherwise reach them (LoraConfig.exclude_modules full-matches a str).
VISION_EXCLUDE = r".*(vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|mm_projector).*"


def export(t: Target) -> ExportResult:
    warnings = []
    settings = {"peft_type": "LORA", "base_model_name_or_path": t.report.model.get("id"),
                **lora_kwargs(t.placement, fitted(t.placement, t.settings), task_type=t.report.task_type)}
    if t.is_vlm and not t.is_regex:
        settings["exclude_modules"] = VISION_EXCLUDE
        warnings.append(f"excluded vision-tower modules with exclude_modules={VISION_EXCLUDE!r}")
    text = json.dumps({k: v for k, v in settings.items() if v is not None}, indent=2) + "\n"
    gaps, exact = t.gaps("adapter_config.json", loraplus=False, patterns=True, parameters=True,
                         loraplus_hint=": pass it to peft.optimizers.create_loraplus_optimizer")
    return finish(t, "peft", json.loads(text), "adapter_config.json", warnings + gaps,
                  exact and t.is_exact(t.target_modules), body=text)
