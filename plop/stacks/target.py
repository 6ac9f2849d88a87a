"""The recommendation in stack-neutral terms, and what a stack's emitted targets really match.

Every exporter reads a :class:`Target` instead of the report, so the rules shared by all stacks
(layer-relative paths, what a stack cannot express) live here once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..model.roles import peft_matches
from ..placement import LoraSettings, Placement, adapter_dropout, lora_kwargs

# Architectures/model types whose suffix targets also reach a vision tower (checked in lint.py).
VLM_MODEL_TYPES = frozenset({
    "llava", "llava_next", "llava_onevision", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
    "idefics2", "idefics3", "paligemma", "pixtral", "smolvlm", "internvl", "mistral3", "llama4", "phi4_multimodal",
})


def suffix_regex(suffixes: Iterable[str]) -> str:
    """A regex PEFT full-matches against exactly what the suffix list would match."""
    alternatives = "|".join(re.escape(s) for s in suffixes)
    return rf"(?:.*\.)?(?:{alternatives})"


def layer_path(name: str, layer: int | None) -> tuple[str, int | None]:
    """``model.layers.3.mlp.up_proj`` (layer 3) -> ``("mlp.up_proj", 3)``; a module outside the
    blocks keeps its full name and no layer."""
    found = re.search(rf"\.{layer}\.(.+)$", name) if layer is not None else None
    return (found.group(1), layer) if found else (name, None)


@dataclass
class Target:
    """A report's recommendation to write for one stack under :class:`LoraSettings`, with the
    report's modules it chose from (what an emitted target is matched against)."""

    report: Any
    settings: LoraSettings

    @property
    def placement(self) -> Placement:
        return self.report.recommendation

    @property
    def modules(self) -> list[str]:
        return list(self.placement.modules)

    @property
    def target_modules(self) -> list[str] | str:
        return self.placement.target_modules

    @property
    def target_parameters(self) -> list[str] | None:
        return self.placement.target_parameters

    @property
    def rank(self) -> int:
        return self.settings.r

    @property
    def alpha(self) -> float:
        return self.settings.lora_alpha

    @property
    def rank_pattern(self) -> dict[str, int] | None:
        return self.placement.rank_pattern

    @property
    def alpha_pattern(self) -> dict[str, float] | None:
        """Each ``rank_pattern`` key's alpha, keeping alpha / rank at the settings' (integers stay integers)."""
        pattern = lora_kwargs(self.placement, self.settings).get("alpha_pattern")
        return {k: int(a) if float(a).is_integer() else a for k, a in pattern.items()} if pattern else None

    def dropout(self, stack: str) -> tuple[float, list[str]]:
        """The dropout a stack that writes ``target_parameters`` must set, and why: PEFT's adapters on
        3-D expert weights refuse any other than 0 (ParamWrapper, peft/tuners/lora/layer.py)."""
        dropout = adapter_dropout(self.placement, self.settings)
        if dropout != self.settings.dropout:
            return dropout, [f"{stack} passes lora_target_parameters to PEFT, which refuses lora_dropout "
                             f"{self.settings.dropout} on expert weights; set it to 0"]
        return dropout, []

    @property
    def is_regex(self) -> bool:
        return isinstance(self.target_modules, str)

    @property
    def types(self) -> list[str]:
        """Module types of the recommended modules, in report order."""
        chosen = set(self.modules)
        return list(dict.fromkeys(m.type for m in self.report.modules if m.name in chosen))

    def matched(self, target: str | Iterable[str]) -> set[str]:
        """The report's modules an emitted ``target_modules`` would wrap (PEFT semantics), and the
        expert weights the recommendation's ``target_parameters`` reach (a list, matched alike)."""
        parameters = self.target_parameters or []
        return {m.name for m in self.report.modules
                if peft_matches(m.name, parameters if m.experts else target)}

    def is_exact(self, target: str | Iterable[str]) -> bool:
        return self.matched(target) == set(self.modules)

    def list_targets(self) -> list[str]:
        """The recommendation as a suffix list: the types, or the full module names when a regex
        (per-layer) picks only some layers, since a full name suffix-matches only itself."""
        return list(self.modules) if self.is_regex else list(self.target_modules)

    def by_layer_path(self) -> dict[str, set[int]]:
        """Layer-relative path (``self_attn.q_proj``) -> layers selected, for stacks that name
        modules inside a block; modules outside the blocks keep their full name with no layer."""
        chosen = set(self.modules)
        out: dict[str, set[int]] = {}
        for m in self.report.modules:
            if m.name in chosen:
                path, layer = layer_path(m.name, m.layer)
                out.setdefault(path, set()).update([] if layer is None else [layer])
        return out

    def gaps(self, stack: str, *, loraplus: bool, patterns: bool, parameters: bool, rslora: bool = True,
             loraplus_hint: str = "") -> tuple[list[str], bool]:
        """Warnings for what ``stack`` has no key for, and whether the placement survives that."""
        warnings, exact = [], True
        if self.settings.use_rslora and not rslora:
            warnings.append(f"{stack} has no rsLoRA key: its adapters are scaled by alpha / r, "
                            "not alpha / sqrt(r)")
        if self.settings.loraplus and not loraplus:
            warnings.append(f"{stack} has no LoRA+ key: loraplus_ratio={self.settings.loraplus_ratio} is not "
                            f"applied{loraplus_hint}")
        if (self.rank_pattern or self.alpha_pattern) and not patterns:
            warnings.append(f"{stack} has no per-module rank/alpha: every module gets r={self.rank}, "
                            f"alpha={self.alpha} instead of the rank/alpha patterns")
            exact = False
        if self.target_parameters and not parameters:
            warnings.append(f"{stack} cannot target parameters {self.target_parameters} (MoE experts): "
                            "they get no adapter")
            exact = False
        return warnings, exact

    @property
    def n_layers(self) -> int:
        return 1 + max((m.layer for m in self.report.modules if m.layer is not None), default=-1)

    @property
    def is_vlm(self) -> bool:
        model = self.report.model
        return model.get("model_type") in VLM_MODEL_TYPES or (
            model.get("architecture", "").endswith("ForConditionalGeneration")
            and any(k in model.get("architecture", "") for k in ("VL", "Vision", "Llava", "Image", "Pali", "Mllama"))
        )
