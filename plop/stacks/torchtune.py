"""torchtune YAML (the ``model:`` block of a LoRA recipe), both ways, and what torchtune's builders
build from it. Keys: pytorch/torchtune torchtune/models/*/_model_builders.py (lora_attn_modules,
apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora; Llama-3.2
Vision's decoder_trainable / encoder_trainable / fusion_trainable) and torchtune/modules/peft/_utils.py
(LORA_ATTN_MODULES = q_proj, k_proj, v_proj, output_proj).

torchtune builds its own models: the recipe's ``model._component_`` names the builder, which fixes
every dimension, and its module tree is not transformers' (Phi-3 keeps q/k/v and w1/w3 apart where
transformers fuses qkv_proj and gate_up_proj). So ``plop check`` resolves a recipe on the builder's
own tree, from ``plop/resources/torchtune_builders.json``: every linear layer of every LoRA builder
of the pinned torchtune and the switch that wraps it, derived by benchmarks/torchtune_builders.py
from torchtune itself. A builder missing there is refused in one line, never guessed.

Writing goes the other way, from a report of the Hugging Face model: torchtune places LoRA on every
layer, on a subset of attention projections and on the whole MLP or none of it, so most PLoP
placements become a superset (:func:`hf_targets` is what a recipe reaches in Hugging Face names).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target

NAME = "torchtune"
ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}  # HF -> torchtune
HF_ATTENTION = {tt: hf for hf, tt in ATTENTION.items()}
# torchtune's w1, w3, w2: one switch for all three (gate_up_proj: Phi-3's w1 and w3, fused by transformers)
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
# transformers' fused Phi-3 attention, which torchtune's checkpoint converter splits for its builder
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
OUTPUT = "lm_head"
TABLE = Path(__file__).parent.parent / "resources" / "torchtune_builders.json"
PARTS = ("decoder", "encoder", "fusion")  # Llama-3.2 Vision's *_trainable flags
TRAINABLE = ("lora", "frozen")  # torchtune 0.6.1 asserts "full" away in its LoRA builders


def claims(data: Any) -> bool:
    model = data.get("model") if isinstance(data, Mapping) else None
    return isinstance(model, Mapping) and ("lora_attn_modules" in model or "apply_lora_to_mlp" in model)


def write(t: Target) -> ExportResult:
    types = t.types
    present = {m.type for m in t.report.modules}
    chosen = {ATTENTION[x] for x in types if x in ATTENTION} | {a for x in types for a in FUSED.get(x, ())}
    attention = [a for a in HF_ATTENTION if a in chosen]
    mlp_types = [x for x in MLP if x in present]  # this model's MLP projections, fused or not
    mlp = any(x in MLP for x in types)
    output = OUTPUT in types
    covered = [x for x in types if x in ATTENTION or x in FUSED] + (mlp_types if mlp else []) + ([OUTPUT] if output else [])
    warnings, exact = t.gaps("torchtune", loraplus=False, patterns=False, parameters=False, rslora=False)
    dropped = [x for x in types if x not in covered]
    if dropped:
        warnings.append(f"torchtune has no switch for {dropped}: they get no adapter")
    split = [x for x in types if x in FUSED]
    for x in split:
        warnings.append(f"torchtune's builder keeps {', '.join(FUSED[x])} apart where this model fuses {x}: "
                        "an adapter on each, not one on the fused projection")
    if t.is_regex:
        warnings.append("torchtune cannot pick layers: the per-layer placement becomes every layer")
    if mlp and not set(mlp_types) <= set(types):
        warnings.append(f"apply_lora_to_mlp covers all of {', '.join(mlp_types)}, not only {[x for x in types if x in MLP]}")
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
                  exact and not dropped and not split and t.is_exact(covered), comment=comment)


def read(data: Mapping, source: str) -> StackConfig:
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{source}: a torchtune config needs a model: block with lora_attn_modules")
    attention = names(model.get("lora_attn_modules"), "model.lora_attn_modules") or []
    unknown = [a for a in attention if a not in HF_ATTENTION]
    if unknown:
        raise ConfigError(f"{source}: lora_attn_modules {unknown} are not torchtune's "
                          f"(expected some of {', '.join(HF_ATTENTION)})")
    settings = LoraSettings(number(model, "lora_rank", 8), number(model, "lora_alpha", 16, float),
                            number(model, "lora_dropout", 0.0, float), use_dora=bool(model.get("use_dora")))
    trainable = {p: str(model[f"{p}_trainable"]).lower() for p in PARTS if f"{p}_trainable" in model}
    return StackConfig(
        NAME, source, Placement(target_modules=list(attention)), settings, expand="torchtune",
        rules={"mlp": bool(model.get("apply_lora_to_mlp")), "output": bool(model.get("apply_lora_to_output")),
               "component": str(model.get("_component_") or ""), "trainable": trainable})


# -- what the builder builds ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """``{"torchtune": version, "builders": {component path: entry}}``, as derived from torchtune."""
    return json.loads(TABLE.read_text(encoding="utf-8"))


def builder(spec: StackConfig) -> tuple[str, dict[str, Any]]:
    """The builder ``model._component_`` names and its table entry; one line when plop has none."""
    component = spec.rules.get("component") or ""
    known = table()["builders"]
    if component in known:
        return component, known[component]
    version = table()["torchtune"]
    if not component:
        raise ConfigError(f"{spec.source}: model._component_ names no builder, and torchtune's builder "
                          "defines the model: plop cannot know what it builds")
    raise ConfigError(f"{spec.source}: model._component_ {component!r} is not a LoRA builder of torchtune "
                      f"{version}, the only module trees plop has: it cannot know what that builds")


def _indices(at: str) -> list[list[str]]:
    """``0-2,5`` -> [[0], [1], [2], [5]]; ``1.3`` -> [[1, 3]]; empty -> [[]] (a name without indices)."""
    if not at:
        return [[]]
    out: list[list[str]] = []
    for item in at.split(","):
        first, sep, last = item.partition("-")
        out += [[str(i)] for i in range(int(first), int(last) + 1)] if sep else [item.split(".")]
    return out


def modules(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every linear layer of a builder's model by full name: ``shape`` [in, out], ``bias``, and
    for an adaptable one the ``switch`` that wraps it (and its Llama-3.2 Vision ``part``)."""
    out = {}
    for pattern, row in entry["modules"].items():
        for index in _indices(row["at"]):
            out[pattern.format(*index)] = row
    return out


def _trainable(spec: StackConfig, component: str) -> dict[str, str]:
    """Each part's *_trainable value, with the builder's defaults (decoder frozen, encoder and fusion lora)."""
    values = {"decoder": "frozen", "encoder": "lora", "fusion": "lora", **spec.rules.get("trainable", {})}
    for part, value in values.items():
        if value not in TRAINABLE:
            raise ConfigError(f"{spec.source}: {part}_trainable {value!r}: torchtune's {component.rsplit('.', 1)[-1]} "
                              f"takes {' or '.join(TRAINABLE)} (it refuses 'full': mixed LoRA and full fine-tuning)")
    return values


def wrapped(spec: StackConfig) -> list[str]:
    """The full names of the modules torchtune's builder wraps in LoRA for this recipe: the
    attention projections named, w1/w2/w3 with apply_lora_to_mlp, the output projection with
    apply_lora_to_output, in the parts whose *_trainable is "lora"; torchtune's refusals in one line."""
    component, entry = builder(spec)
    refuses = entry.get("refuses", {})
    if not spec.placement.target_modules and "no_attention" in refuses:
        raise ConfigError(f"{spec.source}: torchtune refuses an empty lora_attn_modules: {refuses['no_attention']}")
    if spec.rules.get("output") and "output" in refuses:
        raise ConfigError(f"{spec.source}: torchtune refuses apply_lora_to_output here: {refuses['output']}")
    switches = set(spec.placement.target_modules or []) | {s for s in ("mlp", "output") if spec.rules.get(s)}
    parts = _trainable(spec, component)
    return sorted(name for name, row in modules(entry).items()
                  if row.get("switch") in switches and parts.get(row.get("part"), "lora") == "lora")


def hf_targets(spec: StackConfig) -> list[str]:
    """The Hugging Face module names a recipe's switches reach (what ``plop export`` reads back on
    a report of the Hugging Face model): output_proj is o_proj, q/k/v together a fused qkv_proj,
    the MLP gate/up/down (or gate_up_proj), the output lm_head."""
    attention = spec.placement.target_modules or []
    fused = [hf for hf, parts in FUSED.items() if set(parts) <= set(attention)]
    return [HF_ATTENTION[a] for a in attention] + fused + \
        (list(MLP) if spec.rules.get("mlp") else []) + ([OUTPUT] if spec.rules.get("output") else [])


def builder_name(component: str) -> str:
    """``torchtune.models.phi3.lora_phi3_mini`` -> ``lora_phi3_mini``."""
    return re.sub(r"^.*\.", "", component)
