"""axolotl YAML, both ways. Keys: axolotl-ai-cloud/axolotl src/axolotl/utils/schemas/peft.py
(LoraConfig section) and src/axolotl/loaders/adapter.py (_build_peft_lora_config, main 2025):
``lora_target_modules`` (a list or a regex string) and ``lora_target_parameters`` go to
``peft.LoraConfig`` as they are; ``lora_target_linear: true`` adds every module whose class name
holds "Linear", or that is an ``nn.Linear``, by its last name component, minus the name
:data:`OUTPUT_EMBEDDING` (find_all_linear_names);
``peft_layers_to_transform``/``peft_layers_pattern``, ``lora_modules_to_save``,
``lora_exclude_modules``, ``lora_rank_pattern``/``lora_alpha_pattern``,
``peft_use_dora``/``peft_use_rslora``; bias is always "none"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, layers, names, number, pattern, targets
from .result import ExportResult, finish
from .target import Target

NAME = "axolotl"
OUTPUT_EMBEDDING = "lm_head"
"""The name find_all_linear_names leaves out of ``lora_target_linear``: loaders/utils.py
get_linear_embedding_layers(model_type)[1], "lm_head" for every model type in 0.21 (a name, not
the model's actual head); tests/test_axolotl_stack.py checks it against axolotl's table."""
# the keys that say where the adapters go (the axolotl plugin sets these, and leaves the run's
# own rank, alpha and dropout alone)
PLACEMENT_KEYS = ("lora_target_modules", "lora_target_linear", "lora_rank_pattern", "lora_alpha_pattern",
                  "lora_target_parameters")


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and any(
        k in data for k in ("adapter", "base_model", "lora_target_linear", "peft_layers_to_transform"))


def write(t: Target) -> ExportResult:
    dropout, warnings = t.dropout("axolotl")  # also schemas/peft.py validate_lora_target_parameters_dropout
    settings = {
        "adapter": "lora",
        "lora_r": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": dropout,
        "lora_target_modules": t.target_modules,  # a per-layer regex stays a regex: PEFT full-matches it
        "lora_target_linear": False,  # True would add every linear module to the targets
        "peft_use_dora": t.settings.use_dora,
        "peft_use_rslora": t.settings.use_rslora,
    }
    if t.settings.loraplus:
        settings["loraplus_lr_ratio"] = t.settings.loraplus_ratio
    if t.rank_pattern:
        settings["lora_rank_pattern"] = t.rank_pattern
    if t.alpha_pattern:
        settings["lora_alpha_pattern"] = t.alpha_pattern
    if t.target_parameters:
        settings["lora_target_parameters"] = t.target_parameters
    return finish(t, NAME, settings, "axolotl-lora.yaml", warnings, t.is_exact(t.target_modules))


def placement_keys(t: Target) -> dict[str, Any]:
    """The keys of :func:`write` that put the adapters where ``t`` recommends (with ``lora_dropout``
    0 when expert weights are adapted): what the axolotl plugin writes into a run's config."""
    written = write(t).settings
    keys = PLACEMENT_KEYS + (("lora_dropout",) if t.target_parameters else ())
    return {k: written[k] for k in keys if k in written}


def read(data: Mapping, source: str) -> StackConfig:
    if data.get("adapter") not in (None, "lora", "qlora"):
        raise ConfigError(f"{source}: adapter {data.get('adapter')!r} is not LoRA; plop check audits lora/qlora")
    placement = Placement(
        target_modules=targets(data.get("lora_target_modules"), "lora_target_modules") or [],
        target_parameters=names(data.get("lora_target_parameters"), "lora_target_parameters"),
        rank_pattern=pattern(data, "lora_rank_pattern"), alpha_pattern=pattern(data, "lora_alpha_pattern"),
        layers_to_transform=layers(data.get("peft_layers_to_transform"), "peft_layers_to_transform"),
        layers_pattern=data.get("peft_layers_pattern"),
        exclude_modules=targets(data.get("lora_exclude_modules"), "lora_exclude_modules") or None)
    missing = [k for k in ("lora_r", "lora_alpha") if data.get(k) is None]
    if missing:  # its schema defaults both to None, which load_lora hands to PEFT's LoraConfig as they are
        raise ConfigError(f"{source}: axolotl gives PEFT {' and '.join(f'{k}: None' for k in missing)} when "
                          f"the config leaves them out, and PEFT fails on it; set {' and '.join(missing)}")
    settings = LoraSettings(number(data, "lora_r", 8), number(data, "lora_alpha", 16, float),
                            number(data, "lora_dropout", 0.0, float), use_dora=bool(data.get("peft_use_dora")),
                            use_rslora=bool(data.get("peft_use_rslora")))
    if placement.target_parameters and settings.dropout:  # utils/schemas/peft.py, a model validator
        raise ConfigError(f"{source}: axolotl refuses lora_dropout {settings.dropout:g} with lora_target_parameters "
                          f"(its schema: PEFT's ParamWrapper has no dropout); set lora_dropout: 0")
    return StackConfig(NAME, source, placement, settings,
                       modules_to_save=names(data.get("lora_modules_to_save"), "lora_modules_to_save") or None,
                       base_model=data.get("base_model"), expand="axolotl-linear" if data.get("lora_target_linear") else None)
