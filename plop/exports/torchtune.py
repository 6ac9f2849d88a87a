"""torchtune YAML (the ``model:`` block of a LoRA recipe). Keys: pytorch/torchtune
torchtune/models/llama3_2/_component_builders.py (lora_llama3_2: lora_attn_modules,
apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora) and
torchtune/modules/peft/_utils.py (LORA_ATTN_MODULES = q_proj, k_proj, v_proj, output_proj).

torchtune places LoRA on every layer, on a subset of attention projections and on the whole MLP
or none of it, so most PLoP placements become a superset."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target

ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
MLP = ("gate_proj", "up_proj", "down_proj")  # torchtune's w1, w3, w2: one switch for all three
OUTPUT = "lm_head"


def export(t: Target) -> ExportResult:
    types = t.types
    attention = [ATTENTION[x] for x in types if x in ATTENTION]
    mlp = any(x in MLP for x in types)
    output = OUTPUT in types
    covered = [x for x in types if x in ATTENTION] + (list(MLP) if mlp else []) + ([OUTPUT] if output else [])
    warnings, exact = t.gaps("torchtune", loraplus=False, patterns=False, parameters=False)
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
    return finish(t, "torchtune", settings, "torchtune-lora.yaml", warnings,
                  exact and not dropped and t.is_exact(covered), comment=comment)
