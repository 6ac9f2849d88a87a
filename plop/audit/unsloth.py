"""unsloth's rewriting of get_peft_model's arguments that needs the model, before PEFT sees them.

unsloth runs only on a GPU, so these rules are not checked against its code in the suite; each
cites where it lives in unsloth 2026.10.9 / unsloth_zoo 2026.10.9 (PyPI). What a rule does not
cover (the Gemma-3n/4 and Voxtral audio and embedder branches, Mamba mixers, a MoE model's experts
under the generated regex) is refused in one line: plop does not guess.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..errors import ConfigError
from ..model.roles import peft_matches
from ..stacks.reading import StackConfig

# unsloth_zoo/peft_utils.py get_peft_regex: its default tags, and MOE_ROUTER_MODULES
VISION_TAGS, LANGUAGE_TAGS = ("vision", "image", "visual", "patch"), ("language", "text")
ATTENTION_TAGS, MLP_TAGS = ("self_attn", "attention", "attn", "mixer"), ("mlp", "feed_forward", "ffn", "dense", "mixer")
ROUTERS = {"router"}
# model families whose get_peft_regex takes branches plop does not model (peft_utils.py _is_gemma_mm,
# _is_voxtral, MAMBA_MODEL_TYPES)
UNMODELLED = ("gemma4", "gemma3n", "embedding_gemma2", "voxtral", "falcon_h1", "mamba", "nemotron_h")
# unsloth/models/_utils.py _MOE_BROAD_MLP_TARGETS
MOE_MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}


def _model_types(model: nn.Module) -> set[str]:
    config = model.config
    return {str(getattr(c, "model_type", "") or "").lower() for c in (config, getattr(config, "text_config", None)) if c}


def is_moe(model: nn.Module) -> bool:
    """unsloth/models/_utils.py is_moe_model: an expert count on the config or its text_config."""
    for config in (model.config, getattr(model.config, "text_config", None)):
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if config is not None and getattr(config, attr, None) is not None:
                return getattr(config, attr) > 0
    return False


def peft_regex(model: nn.Module, flags: dict[str, bool]) -> str:
    """unsloth_zoo/peft_utils.py get_peft_regex (lines 148-426) with no target list: the last names
    of the Linear layers that occur more than once or inside a numbered block, under a model-part
    tag and a component tag, plus the ``model.layers.N`` branch; routers and parameter-free
    leaves left out. FastBaseModel.get_peft_model (unsloth/models/vision.py 5098) calls it."""
    if any(t.startswith(UNMODELLED) for t in _model_types(model)) or flags.get("finetune_audio_layers"):
        raise ConfigError(f"unsloth's get_peft_regex takes audio, embedder or Mamba branches on "
                          f"{type(model).__name__} that plop does not model: give target_modules")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    counts = Counter(n.rsplit(".", 1)[-1] for n in linear)
    stacked = {n.rsplit(".", 1)[-1] for n in linear if re.search(r"\.\d+\.", n)}
    leaves = [p for p, c in counts.items() if p not in ROUTERS and (c != 1 or p in stacked)]
    parts = (VISION_TAGS if flags["finetune_vision_layers"] else ()) + (LANGUAGE_TAGS if flags["finetune_language_layers"] else ())
    components = (ATTENTION_TAGS if flags["finetune_attention_modules"] else ()) + (MLP_TAGS if flags["finetune_mlp_modules"] else ())
    if not parts or not components:
        raise ConfigError("unsloth refuses this: no layers or no modules to finetune (get_peft_regex)")
    part, component = "|".join(parts), "|".join(components)
    leaf = "(?:" + "|".join(map(re.escape, leaves)) + ")"
    matcher = rf".*?(?:{part}).*?(?:{component}).*?\.{leaf}"
    if flags["finetune_language_layers"]:
        matcher = rf"(?:{matcher})|(?:\bmodel\.layers\.[\d]{{1,}}(?!.*\.experts\.\d)\..*?(?:{component}).*?\.(?:{leaf}))"
    if not any(re.fullmatch(matcher, n, flags=re.DOTALL) for n in linear):
        matcher = rf"(?!(?:.*\.)?(?:codec_model|audio_tokenizer|acoustic_tokenizer|semantic_tokenizer)\.).*?(?:{component}).*?\.{leaf}"
    modules = dict(model.named_modules())
    excluded = [n for n, m in modules.items() if n and next(m.parameters(recurse=False), None) is None
                and next(m.children(), None) is None and re.fullmatch(matcher, n, flags=re.DOTALL)]
    excluded += [n for n, m in modules.items() if n.rpartition(".")[2] == "gate" and isinstance(m, nn.Linear)
                 and re.fullmatch(matcher, n, flags=re.DOTALL) and (hasattr(modules.get(n.rpartition(".")[0]), "experts")
                 or "router" in type(modules.get(n.rpartition(".")[0])).__name__.lower())]
    if excluded:
        matcher = r"(?!(?:" + "|".join(map(re.escape, excluded)) + r")$)(?:" + matcher + ")"
    return matcher


def _expert_path(parameters: list[str], leaf: str) -> str | None:
    """_utils.py _resolve_moe_parameter_name + _moe_parameter_exists: ``mlp.experts.<leaf>``, else
    ``experts.<leaf>`` (Gemma 4), as a parameter of the model has it."""
    for name in (f"mlp.experts.{leaf}", f"experts.{leaf}"):
        if any(peft_matches(p, [name]) for p in parameters):  # whole name or dotted suffix, as unsloth checks
            return name
    return None


def moe_target_parameters(model: nn.Module, target_modules: list[str]) -> list[str] | None:
    """unsloth/models/_utils.py get_moe_target_parameters (11023-11120), called by llama.py
    get_peft_model when target_parameters is None: gate_proj / up_proj / gate_up_proj in the list
    become the fused ``mlp.experts.gate_up_proj`` (or the unfused pair), down_proj
    ``mlp.experts.down_proj``."""
    wanted = {t for t in target_modules if "." not in t and t in MOE_MLP}
    if not is_moe(model) or not wanted:
        return None
    parameters = [n for n, _ in model.named_parameters()]
    found = []
    if wanted & {"gate_proj", "up_proj", "gate_up_proj"}:
        fused = _expert_path(parameters, "gate_up_proj")
        pair = [leaf for leaf in ("gate_proj", "up_proj") if wanted & {leaf, "gate_up_proj"}]
        found += [fused] if fused else [p for p in (_expert_path(parameters, leaf) for leaf in pair) if p]
    if "down_proj" in wanted:
        found += [p for p in [_expert_path(parameters, "down_proj")] if p]
    return found or None


def reaches_experts(entry: str, wrapped: set[str]) -> bool:
    """Whether a target_modules entry reached the experts through :func:`moe_target_parameters`,
    given the last names of the expert parameters that got adapters."""
    return entry in wrapped or (entry in ("gate_proj", "up_proj") and "gate_up_proj" in wrapped)


def tie_embeddings(model: nn.Module, saved: list[str], requested: bool | None) -> list[str]:
    """_utils.py _effective_weight_tying and _drop_tied_output_module: on a model whose head is
    tied to its embeddings, with both saved, the head leaves modules_to_save and PEFT ties it to
    the embedding's copy (ensure_weight_tying): one trained matrix, which is what plop counts
    (PEFT on the meta device would count the tied copy twice); ``requested`` False keeps two."""
    leaves = {s.rsplit(".", 1)[-1] for s in saved}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if requested is False or not tied or not {"embed_tokens", "lm_head"} <= leaves:
        return saved
    return [s for s in saved if s.rsplit(".", 1)[-1] != "lm_head"]


def apply(spec: StackConfig, model: nn.Module, kwargs: dict) -> None:
    """What llama.py / vision.py get_peft_model hand to PEFT for ``model``, in place."""
    if spec.rules.get("regex"):
        if is_moe(model):
            raise ConfigError("unsloth's generated regex on a MoE model also picks expert parameters by rules plop "
                              "does not model: give target_modules")
        kwargs["target_modules"] = peft_regex(model, spec.rules["flags"])
    if kwargs.get("modules_to_save"):
        kwargs["modules_to_save"] = tie_embeddings(model, kwargs["modules_to_save"], spec.rules.get("ensure_weight_tying"))
    if not kwargs.get("target_parameters") and isinstance(kwargs.get("target_modules"), list):
        kwargs["target_parameters"] = moe_target_parameters(model, kwargs["target_modules"])
