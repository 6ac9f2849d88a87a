"""LLaMA-Factory YAML, both ways, as llamafactory 0.9.5 (PyPI) reads it. Two forms:

* the classic keys, src/llamafactory/hparams/finetuning_args.py (LoraArguments: lora_rank 8,
  lora_alpha None or 0 = 2 x rank, lora_dropout 0, ``lora_target`` "all" split on commas,
  additional_target = modules_to_save; freeze_vision_tower and freeze_multi_modal_projector true,
  freeze_language_model false), resolved by src/llamafactory/model/adapter.py _setup_lora_tuning:
  ``all`` alone becomes model_utils/misc.py find_all_linear_modules, and on a composite (VLM)
  model every target goes through model_utils/visual.py patch_target_modules;
* the v1 plugin form, ``peft_config: {name: lora, r, lora_alpha, ...}`` (llamafactory/v1/plugins/
  model_plugins/peft.py get_lora_model: r 8, lora_alpha 16, lora_dropout 0.05, target_modules
  ``all`` = its own _find_all_linear_modules; no VLM patching), with the base model in ``model``.

Either way the list goes to peft.LoraConfig as target_modules: entries are suffixes, never regexes.
What needs the model (the suffix walks) is :func:`plop.audit.resolve.lora_kwargs`; the keys and the
freeze table, which :data:`COMPOSITE` copies from the pinned release, are here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target

NAME = "llama-factory"
VERSION = "0.9.5"  # the release COMPOSITE and the rules below are read from (tests/test_llama_factory.py checks it)


class Composite(NamedTuple):
    """One ``_register_composite_model(...)`` of model_utils/visual.py, its defaults filled in:
    substrings of module names, as LLaMA-Factory matches them."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    conflict: tuple[str, ...]  # lora_conflict_keys: never LoRA targets, whatever is frozen


_TOWER, _MERGER, _LM = ("vision_tower",), ("multi_modal_projector",), ("language_model", "lm_head")
_QWEN_VL = ("visual.patch_embed", "visual.blocks")
_QWEN3_VL = ("visual.pos_embed", *_QWEN_VL, "visual.deepstack_merger_list")
# model_utils/visual.py COMPOSITE_MODELS at llamafactory 0.9.5, every model type it registers
COMPOSITE: dict[str, Composite] = {
    "dots_ocr": Composite(_TOWER, ("vision_tower.merger",), ("model", "lm_head"), ("merger",)),
    "gemma3": Composite(_TOWER, _MERGER, _LM, ()),
    "gemma3n": Composite(("vision_tower", "audio_tower"), _MERGER, _LM, ("timm_model", "subsample_conv_projection")),
    "gemma4": Composite(("vision_tower", "audio_tower"), ("model.embed_vision", "model.embed_audio"), _LM,
                        ("per_layer_projection_norm",)),
    "glm4v": Composite(_QWEN_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "glm4v_moe": Composite(_QWEN_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "glm_ocr": Composite(_QWEN_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "internvl": Composite(_TOWER, _MERGER, _LM, ()),
    "interns1": Composite(_TOWER, _MERGER, _LM, ()),
    "Keye": Composite(("visual.vision_model.patch_embedding", "visual.vision_model.encoder"), ("mlp_AR",),
                      ("model", "lm_head"), ("patch_embedding",)),
    "kimi_vl": Composite(_TOWER, _MERGER, _LM, ()),
    "llama4": Composite(("vision_model",), _MERGER, _LM, ()),
    "llava": Composite(_TOWER, _MERGER, _LM, ()),
    "llava_next": Composite(_TOWER, _MERGER, _LM, ()),
    "llava_next_video": Composite(_TOWER, _MERGER, _LM, ()),
    "minicpmv": Composite(("vpm",), ("resampler",), ("llm",), ()),
    "minicpmv4_6": Composite(("model.vision_tower",), ("model.merger",), ("model.language_model", "lm_head"), ()),
    "minicpmo": Composite(("vpm", "apm", "audio_avg_pooler", "audio_projection_layer", "tts"), ("resampler",),
                          ("llm",), ("audio_projection_layer",)),
    "mistral3": Composite(_TOWER, ("model.multi_modal_projector",), _LM, ()),
    "mllama": Composite(("vision_model",), _MERGER, _LM, ()),
    "paligemma": Composite(_TOWER, _MERGER, _LM, ()),
    "qwen2_audio": Composite(("audio_tower",), _MERGER, _LM, ()),
    "qwen2_5_omni_thinker": Composite((*_QWEN_VL, "audio_tower"), ("visual.merger", "audio_tower.proj"),
                                      ("model", "lm_head"), ("patch_embed",)),
    "qwen2_vl": Composite(_QWEN_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "qwen2_5_vl": Composite(_QWEN_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "qwen3_vl": Composite(_QWEN3_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "qwen3_vl_moe": Composite(_QWEN3_VL, ("visual.merger",), _LM, ("patch_embed",)),
    "qwen3_omni_moe_thinker": Composite((*_QWEN3_VL, "audio_tower"), ("visual.merger", "audio_tower.proj"), _LM,
                                        ("patch_embed",)),
    "qwen3_5": Composite(("visual.pos_embed", *_QWEN_VL), ("model.visual.merger",), _LM, ("patch_embed",)),
    "qwen3_5_moe": Composite(("visual.pos_embed", *_QWEN_VL), ("model.visual.merger",), _LM, ("patch_embed",)),
    "video_llava": Composite(_TOWER, _MERGER, _LM, ()),
}
# find_all_linear_modules never adapts these (misc.py: the head, and chatglm's / internlm2's heads)
_HEADS = {"chatglm": ("lm_head", "output_layer"), "internlm2": ("lm_head", "output")}
# v1/plugins/model_plugins/peft.py _find_all_linear_modules, on every model
PLUGIN_FORBIDDEN = ("lm_head", "output_layer", "output")


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and (any(k in data for k in ("lora_target", "finetuning_type", "additional_target"))
                                          or isinstance(data.get("peft_config"), Mapping))


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


def _not_new_lora(data: Mapping, source: str, method: Any) -> None:
    if method != "lora":
        raise ConfigError(f"{source}: LLaMA-Factory method {method!r}; plop check audits LoRA")
    if data.get("adapter_name_or_path"):  # adapter.py / peft.py load_adapter: training resumes that adapter
        raise ConfigError(f"{source}: resumes the adapter at {data['adapter_name_or_path']!r}, whose own "
                          "adapter_config.json decides what trains: check that folder instead")
    if data.get("use_kt"):  # model/loader.py: KTransformers builds the model, with its own module tree
        raise ConfigError(f"{source}: use_kt trains on KTransformers' own model, whose modules plop cannot know")
    if data.get("use_llama_pro"):
        raise ConfigError(f"{source}: use_llama_pro adapts LLaMA Pro's expanded blocks, which plop check does not model")


def read(data: Mapping, source: str) -> StackConfig:
    if isinstance(data.get("peft_config"), Mapping):
        return _read_plugin(data, source)
    _not_new_lora(data, source, data.get("finetuning_type", "lora"))
    rank = number(data, "lora_rank", 8)
    listed = names(data.get("lora_target", "all"), "lora_target") or ["all"]
    settings = LoraSettings(rank, number(data, "lora_alpha", None, float) or rank * 2,
                            number(data, "lora_dropout", 0.0, float),
                            use_dora=bool(data.get("use_dora")), use_rslora=bool(data.get("use_rslora")))
    rules = {key: bool(data.get(key, default)) for key, default in (
        ("freeze_vision_tower", True), ("freeze_multi_modal_projector", True), ("freeze_language_model", False),
        ("resize_vocab", False))}
    return StackConfig(
        NAME, source, Placement(target_modules=listed), settings,
        modules_to_save=names(data.get("additional_target"), "additional_target"),
        base_model=data.get("model_name_or_path"), expand="llama-factory", rules=rules)


def _read_plugin(data: Mapping, source: str) -> StackConfig:
    """The v1 ``peft_config`` block (LoraParams in v1/plugins/model_plugins/peft.py)."""
    config = data["peft_config"]
    _not_new_lora(config, source, config.get("name"))
    target = config.get("target_modules", "all")
    listed = [target] if isinstance(target, str) else names(target, "peft_config.target_modules")
    settings = LoraSettings(number(config, "r", 8), number(config, "lora_alpha", 16, float),
                            number(config, "lora_dropout", 0.05, float), use_dora=bool(config.get("use_dora")),
                            use_rslora=bool(config.get("use_rslora")))
    return StackConfig(NAME, source, Placement(target_modules=listed), settings,
                       modules_to_save=names(config.get("modules_to_save"), "peft_config.modules_to_save"),
                       base_model=data.get("model"), expand="llama-factory-v1")


def all_linear_forbidden(spec: StackConfig, model_type: str | None) -> tuple[str, ...]:
    """The substrings ``all`` keeps out: misc.py find_all_linear_modules (classic form: the head,
    the projector always, the vision tower while frozen), or the v1 plugin's fixed list."""
    if spec.expand == "llama-factory-v1":
        return PLUGIN_FORBIDDEN
    rules = spec.rules
    composite = COMPOSITE.get(model_type or "")
    forbidden = _HEADS.get(model_type or "", ("lm_head",))
    if composite:
        forbidden += composite.projector + (composite.vision if rules.get("freeze_vision_tower") else ())
    return forbidden


def patch_forbidden(spec: StackConfig, model_type: str | None) -> tuple[str, ...] | None:
    """visual.py patch_target_modules: on a composite model, the substrings no target may reach
    (get_forbidden_modules and the conflict keys); None elsewhere and in the v1 plugin form, which
    hands its targets to PEFT as they are."""
    composite = COMPOSITE.get(model_type or "")
    if composite is None or spec.expand == "llama-factory-v1":
        return None
    rules = spec.rules
    return ((composite.vision if rules.get("freeze_vision_tower") else ()) +
            (composite.projector if rules.get("freeze_multi_modal_projector") else ()) +
            (composite.language if rules.get("freeze_language_model") else ()) + composite.conflict)
