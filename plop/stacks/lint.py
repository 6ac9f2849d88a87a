"""Cross-stack traps: configurations that load fine and then train or serve something else."""

from __future__ import annotations

from .target import Target, suffix_regex

# vLLM serves q/k/v as one qkv_proj and gate/up as one gate_up_proj, and loads an adapter on part of
# a group: MergedColumnParallelLinearWithLoRA.set_lora (vllm/lora/layers/column_parallel_linear.py,
# vllm-project/vllm@0163de2b) copies each slice's LoRA only where it is not None, so q/v-only or
# up-only adapters serve; no warning. What vLLM does refuse at load time is DoRA:
# LoRAModel.from_lora_tensors (vllm/lora/lora_model.py, vllm-project/vllm@0306474e) raises
# NotImplementedError when the adapter config has use_dora.
VLLM_DORA = ("vLLM refuses DoRA adapters at load time (NotImplementedError in "
             "vllm/lora/lora_model.py LoRAModel.from_lora_tensors); serve a plain LoRA there")
# unsloth patches its fused LoRA kernels per layer only when all of a group carries LoRA, with
# dropout 0, bias "none", no bias on the base layers and no DoRA magnitude (unslothai/unsloth
# 2026.8.19, unsloth/models/llama.py FastLlamaModel.patch_peft_model: the
# `lora_dropout == 0 and bias == "none"` branch, then hasattr(..., "lora_A") on gate/up/down and q/k/v).
UNSLOTH_FUSED = {"QKV": ("q_proj", "k_proj", "v_proj"), "MLP": ("gate_proj", "up_proj", "down_proj")}


def partial_groups(t: Target, groups: dict[str, tuple[str, ...]]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """``(group, targeted members, all members)`` for each group some layer targets only in part."""
    chosen = set(t.modules)
    per_layer: dict[int | None, set[str]] = {}
    present: dict[int | None, set[str]] = {}
    for m in t.report.modules:
        present.setdefault(m.layer, set()).add(m.type)
        if m.name in chosen:
            per_layer.setdefault(m.layer, set()).add(m.type)
    found = []
    for packed, members in groups.items():
        for layer, types in per_layer.items():
            have = [x for x in members if x in types]
            if have and set(members) <= present[layer] and len(have) < len(members):
                found.append((packed, have, members))
                break
    return found


def lint(t: Target, fmt: str) -> list[str]:
    """Warnings for ``fmt`` that do not depend on how the stack spells its keys."""
    out = []
    if fmt != "spectrum":
        if t.settings.use_dora:
            out.append(VLLM_DORA)
        if t.is_vlm and not t.is_regex:
            out.append(f"{t.report.model.get('architecture')} has a vision tower: the suffixes "
                       f"{t.list_targets()} also match its layers; exclude them (PEFT exclude_modules) "
                       "or target the language model's full module names")
    if fmt == "unsloth":
        for fused, have, members in partial_groups(t, UNSLOTH_FUSED):
            out.append(f"unsloth's fused {fused} kernel needs LoRA on all of {', '.join(members)}, not only "
                       f"{', '.join(have)}; these layers run on the slower PEFT path")
        if t.settings.dropout > 0 or t.settings.use_dora:
            out.append(f"unsloth's fused kernels need lora_dropout=0 and no DoRA (got dropout="
                       f"{t.settings.dropout}, dora={t.settings.use_dora}); training runs on the slower path")
    return out


def survive_trl_collapse(targets: list[str] | str) -> tuple[list[str] | str, list[str]]:
    """TRL's ``ModelConfig.__post_init__`` turns a one-element ``lora_target_modules`` list into a
    string (trl/trainer/model_config.py), which PEFT then full-matches as a regex: ``v_proj`` alone
    matches no module. Emit the equivalent regex instead."""
    if isinstance(targets, str) or len(targets) != 1:
        return targets, []
    regex = suffix_regex(targets)
    return regex, [f"TRL turns a one-element lora_target_modules into a regex; emitted {regex!r} "
                   f"so it still matches every {targets[0]}"]
