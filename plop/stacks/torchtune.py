"""torchtune YAML (the ``model:`` block of a LoRA recipe), both ways. Keys: pytorch/torchtune
torchtune/models/llama3_2/_component_builders.py (lora_llama3_2: lora_attn_modules,
apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout 0, use_dora) and
torchtune/modules/peft/_utils.py (LORA_ATTN_MODULES = q_proj, k_proj, v_proj, output_proj).

torchtune places LoRA on every layer, on a subset of attention projections and on the whole MLP
or none of it, so most PLoP placements become a superset. It builds its own modules: the names
here are the Hugging Face ones its checkpoint converter maps them to (output_proj -> o_proj)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target

NAME = "torchtune"
ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}  # HF -> torchtune
HF_ATTENTION = {tt: hf for hf, tt in ATTENTION.items()}
MLP = ("gate_proj", "up_proj", "down_proj")  # torchtune's w1, w3, w2: one switch for all three
OUTPUT = "lm_head"


def claims(data: Any) -> bool:
    model = data.get("model") if isinstance(data, Mapping) else None
    return isinstance(model, Mapping) and ("lora_attn_modules" in model or "apply_lora_to_mlp" in model)


def write(t: Target) -> ExportResult:
    types = t.types
    attention = [ATTENTION[x] for x in types if x in ATTENTION]
    mlp = any(x in MLP for x in types)
    output = OUTPUT in types
    covered = [x for x in types if x in ATTENTION] + (list(MLP) if mlp else []) + ([OUTPUT] if output else [])
    warnings, exact = t.gaps("torchtune", loraplus=False, patterns=False, parameters=False, rslora=False)
    dropped = [x for x in types if x not in covered]
    if dropped:
        warnings.append(f"torchtune has no switch for {dropped}: they get no adapter")
    if t.is_regex:
        warnings.append("torchtune cannot pick layers: the per-layer placement becomes every layer")
    if mlp and not set(MLP) <= set(types):
        warnings.append(f"apply_lora_to_mlp covers all of {', '.join(MLP)}, not only {[x for x in types if x in MLP]}")
    settings = {"model": {
        "lora_attn_modules": attention,
        "apply_lora_to_mlp": mlp,
        "apply_lora_to_output": output,
        "lora_rank": t.rank,
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "use_dora": t.settings.use_dora,
    }}
    comment = ("set model._component_ to your model's LoRA builder, "
               "e.g. torchtune.models.llama3_2.lora_llama3_2_1b")
    return finish(t, NAME, settings, "torchtune-lora.yaml", warnings,
                  exact and not dropped and t.is_exact(covered), comment=comment)


def read(data: Mapping, source: str) -> StackConfig:
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{source}: a torchtune config needs a model: block with lora_attn_modules")
    attention = names(model.get("lora_attn_modules"), "model.lora_attn_modules") or []
    unknown = [a for a in attention if a not in HF_ATTENTION]
    if unknown:
        raise ConfigError(f"{source}: lora_attn_modules {unknown} are not torchtune's "
                          f"(expected some of {', '.join(HF_ATTENTION)})")
    checkpoint = data.get("checkpointer") if isinstance(data.get("checkpointer"), Mapping) else {}
    settings = LoraSettings(number(model, "lora_rank", 8), number(model, "lora_alpha", 16, float),
                            number(model, "lora_dropout", 0.0, float), use_dora=bool(model.get("use_dora")))
    return StackConfig(
        NAME, source, Placement(target_modules=[HF_ATTENTION[a] for a in attention]), settings,
        base_model=checkpoint.get("checkpoint_dir"), expand="torchtune",
        rules={"mlp": bool(model.get("apply_lora_to_mlp")), "output": bool(model.get("apply_lora_to_output")),
               "component": str(model.get("_component_", ""))})
