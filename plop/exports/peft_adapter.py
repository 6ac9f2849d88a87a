"""PEFT ``adapter_config.json``, written by PEFT itself (``LoraConfig.save_pretrained``), so every
key is PEFT's own; ``LoraConfig.from_pretrained(DIR)`` reads it back. Needs peft (and torch)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .result import ExportResult, finish
from .target import Target

# Module-name fragments of vision towers and projectors in transformers' VLMs, excluded when
# suffix targets would otherwise reach them (LoraConfig.exclude_modules full-matches a str).
VISION_EXCLUDE = r".*(vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|mm_projector).*"


def export(t: Target) -> ExportResult:
    kwargs = {"lora_dropout": t.options.dropout, "use_dora": t.options.dora}
    optional = {"rank_pattern": t.rank_pattern, "alpha_pattern": t.alpha_pattern,
                "target_parameters": t.target_parameters}
    kwargs.update({k: v for k, v in optional.items() if v})
    warnings = []
    if t.is_vlm and not t.is_regex:
        kwargs["exclude_modules"] = VISION_EXCLUDE
        warnings.append(f"excluded vision-tower modules with exclude_modules={VISION_EXCLUDE!r}")
    config = t.report.to_peft_config(r=t.rank, lora_alpha=t.alpha, **kwargs)
    config.base_model_name_or_path = t.report.model.get("id")
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        text = (Path(tmp) / "adapter_config.json").read_text()
    gaps, exact = t.gaps("adapter_config.json", loraplus=False, patterns=True, parameters=True,
                         loraplus_hint=": pass it to peft.optimizers.create_loraplus_optimizer")
    return finish(t, "peft", json.loads(text), "adapter_config.json", warnings + gaps,
                  exact and t.is_exact(t.target_modules), body=text)
