"""PEFT ``adapter_config.json``, both ways.

Written: the ``LoraConfig`` keyword arguments plop sets, under PEFT's own key names, as
``LoraConfig.from_pretrained(DIR)`` reads them (PEFT fills every other field with its default),
without importing PEFT or torch, so ``plop export`` starts in a fraction of a second; a test loads
it through PEFT and compares it with the ``LoraConfig`` plop builds.

Read: the file as ``LoraConfig.save_pretrained`` writes it; keys the installed ``LoraConfig`` does
not have are refused (PEFT would drop them with a warning and train something else).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement, fitted, lora_kwargs
from .reading import StackConfig, layers, names, number, pattern, targets
from .result import ExportResult, finish
from .target import Target

NAME = "peft"
# Module-name fragments of vision towers and projectors in transformers' VLMs, excluded when
# suffix targets would otherwise reach them (LoraConfig.exclude_modules full-matches a str).
VISION_EXCLUDE = r".*(vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|mm_projector).*"


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and (
        any(k in data for k in ("peft_type", "base_model_name_or_path")) or ("target_modules" in data and "r" in data))


def write(t: Target) -> ExportResult:
    warnings = []
    settings = {"peft_type": "LORA", "base_model_name_or_path": t.report.model.get("id"),
                **lora_kwargs(t.placement, fitted(t.placement, t.settings), task_type=t.report.task_type)}
    if t.is_vlm and not t.is_regex:
        settings["exclude_modules"] = VISION_EXCLUDE
        warnings.append(f"excluded vision-tower modules with exclude_modules={VISION_EXCLUDE!r}")
    settings = {k: v for k, v in settings.items() if v is not None}  # a model without an id, or a task type
    gaps, exact = t.gaps("adapter_config.json", loraplus=False, patterns=True, parameters=True,
                         loraplus_hint=": pass it to peft.optimizers.create_loraplus_optimizer")
    return finish(t, NAME, settings, "adapter_config.json", warnings + gaps,
                  exact and t.is_exact(t.target_modules), body=json.dumps(settings, indent=2) + "\n")


def read(data: Mapping, source: str) -> StackConfig:
    if data.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{source} is a {data.get('peft_type')} adapter; plop check audits LoRA adapters")
    unknown = sorted(set(data) - lora_config_keys())
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)} is not a key of peft.LoraConfig "
                          f"(expected keys such as r, lora_alpha, target_modules, target_parameters, rank_pattern)")
    placement = Placement(
        target_modules=targets(data.get("target_modules"), "target_modules"),
        target_parameters=names(data.get("target_parameters"), "target_parameters"),
        rank_pattern=pattern(data, "rank_pattern"), alpha_pattern=pattern(data, "alpha_pattern"),
        layers_to_transform=layers(data.get("layers_to_transform"), "layers_to_transform"),
        layers_pattern=data.get("layers_pattern"), exclude_modules=targets(data.get("exclude_modules"), "exclude_modules"))
    settings = LoraSettings(number(data, "r", 8), number(data, "lora_alpha", 8, float),
                            number(data, "lora_dropout", 0.0, float), use_dora=bool(data.get("use_dora")),
                            use_rslora=bool(data.get("use_rslora")))
    return StackConfig(NAME, source, placement, settings, modules_to_save=names(data.get("modules_to_save"), "modules_to_save"),
                       bias=data.get("bias") or "none", base_model=data.get("base_model_name_or_path"))


@functools.cache
def lora_config_keys() -> frozenset[str]:
    """The field names of the installed PEFT's ``LoraConfig`` dataclass, read from its source
    (``LoraConfig`` and the ``PeftConfig``/``PeftConfigMixin`` it extends) rather than imported:
    importing PEFT costs seconds and pulls in torch and bitsandbytes, which ``plop export``'s
    read-back must not. A test holds this equal to ``dataclasses.fields(LoraConfig)``."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("reading a PEFT adapter_config.json needs peft", "pip install peft")
    root = Path(spec.submodule_search_locations[0])
    keys: set[str] = set()
    for path, classes in ((root / "config.py", {"PeftConfigMixin", "PeftConfig"}),
                          (root / "tuners" / "lora" / "config.py", {"LoraConfig"})):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name in classes:
                keys.update(st.target.id for st in node.body if isinstance(st, ast.AnnAssign)
                            and isinstance(st.target, ast.Name) and "ClassVar" not in ast.unparse(st.annotation))
    return frozenset(keys)
