"""What PEFT refuses or rewrites on a given model, asked of PEFT itself, so that plop never
recommends a ``LoraConfig`` that ``get_peft_model`` rejects or silently turns into another one.

Two rules of PEFT 0.18+ depend on the model type rather than on the module:

* state-space models (``mamba``, ``mamba2``, ``falcon_mamba``, ``falcon_h1``, ``nemotron_h``):
  LoRA on ``out_proj`` or ``conv1d`` raises (``tuners_utils._check_lora_target_modules_mamba``);
* MoE models whose experts transformers 5 fused into 3-D weights (mixtral-like, qwen2_moe-like:
  deepseek_v3, qwen3_moe, olmoe, ...): ``convert_peft_config_for_transformers`` rewrites any
  target ending in ``gate_proj``/``up_proj``/``down_proj`` (mixtral: ``w1``/``w2``/``w3``/``gate``)
  into the experts' ``target_parameters``, and resolves a regex to bare leaf names first, so a
  shared expert or a dense layer's MLP cannot be targeted alone.

A type is refused when PEFT would raise on it or would change its config; private PEFT helpers
that a PEFT version lacks are skipped (that version has no such rule).

Both rules need a structure most models lack: 3-D expert weights, or a state-space mixer's
``nn.Conv1d``. PEFT (and bitsandbytes, which it imports when installed: about 2 s) is only
imported for a model that has one, so a plain transformer's diagnosis starts without it.
"""

from __future__ import annotations

import copy
import re

from torch import nn

from .layout import ModelLayout


def _mamba_refusal(model: nn.Module, config, names: list[str]) -> str | None:
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return None
    for name in names:
        try:
            _check_lora_target_modules_mamba(config, model, name.rsplit(".", 1)[-1])
        except ValueError as error:
            return re.sub(r"^\[PEFT:[^]]*\] ", "PEFT refuses it: ", str(error).split(". ")[0])
    return None


def _converted(model: nn.Module, config):
    """A copy of the ``LoraConfig`` as PEFT's transformers-5 MoE conversion rewrites it for
    ``model`` (raising its ValueError), or None when this PEFT has no such conversion."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return None
    converted = copy.deepcopy(config)
    convert_peft_config_for_transformers(converted, model, None)
    return converted


def converted_parameters(model: nn.Module, config) -> list[str]:
    """The expert ``target_parameters`` that conversion turns ``config``'s target_modules into."""
    try:
        converted = _converted(model, config)
    except ValueError:  # a refusal: the wrap itself reports it
        return []
    return list(getattr(converted, "target_parameters", None) or ())


def _conversion_refusal(model: nn.Module, config) -> str | None:
    before = config.target_modules
    try:
        converted = _converted(model, config)
    except ValueError as error:
        return f"PEFT refuses it on this MoE model: {error}"
    if converted is None:
        return None
    same = converted.target_modules == before if isinstance(before, str) else \
        set(converted.target_modules or ()) == set(before)
    if same and not converted.target_parameters:
        return None
    into = sorted(converted.target_parameters or ()) or sorted(converted.target_modules)
    return (f"PEFT rewrites this target on {model.config.model_type} models into {into} "
            "(its transformers-5 MoE conversion), so it cannot be adapted alone")


def _peft_rules_may_apply(model: nn.Module, layout: ModelLayout) -> bool:
    return bool(layout.params) or any(isinstance(m, nn.Conv1d) for m in model.modules())


def refused_types(model: nn.Module, layout: ModelLayout) -> dict[str, str]:
    """Module types of ``layout`` that PEFT refuses or rewrites on ``model``: type -> why."""
    if getattr(getattr(model, "config", None), "model_type", None) is None or not _peft_rules_may_apply(model, layout):
        return {}
    from peft import LoraConfig

    by_type: dict[str, list[str]] = {}
    for name, t in layout.role_map.items():
        if name not in layout.params:
            by_type.setdefault(t, []).append(name)
    refused = {}
    for t, names in sorted(by_type.items()):
        config = LoraConfig(r=1, target_modules=layout.peft_targets([t])[0])
        reason = _mamba_refusal(model, config, names) or _conversion_refusal(model, config)
        if reason:
            refused[t] = reason
    return refused
