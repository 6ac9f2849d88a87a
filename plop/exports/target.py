"""The recommendation in stack-neutral terms, and what a stack's emitted targets really match.

Every exporter reads a :class:`Target` instead of the report, so the rules shared by all stacks
(layer-relative paths, what a stack cannot express) live here once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import default_alpha
from ..model.roles import peft_matches

# Architectures/model types whose suffix targets also reach a vision tower (checked in lint.py).
VLM_MODEL_TYPES = frozenset({
    "llava", "llava_next", "llava_onevision", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
    "idefics2", "idefics3", "paligemma", "pixtral", "smolvlm", "internvl", "mistral3", "llama4", "phi4_multimodal",
})


@dataclass(frozen=True)
class Options:
    """The LoRA hyper-parameters the user asks for; ``None`` rank/alpha fall back to the report."""

    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.05
    dora: bool = False
    loraplus_ratio: float | None = None  # lr_B / lr_A; None or 1 means plain LoRA


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
    """What the report recommends, resolved with :class:`Options`."""

    report: Any
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        rec = self.report.recommendation
        self.modules: list[str] = list(rec.modules)
        self.target_modules: list[str] | str = rec.target_modules
        self.rank: int = self.options.rank or rec.rank
        self.alpha: float = self.options.alpha or default_alpha(self.rank)
        # later strategies (--allocate, MoE experts) may add these; older reports lack them
        self.rank_pattern: dict[str, int] | None = getattr(rec, "rank_pattern", None)
        self.alpha_pattern: dict[str, int] | None = getattr(rec, "alpha_pattern", None)
        self.target_parameters: list[str] | None = getattr(rec, "target_parameters", None)

    @property
    def is_regex(self) -> bool:
        return isinstance(self.target_modules, str)

    @property
    def types(self) -> list[str]:
        """Module types of the recommended modules, in report order."""
        chosen = set(self.modules)
        return list(dict.fromkeys(m.type for m in self.report.modules if m.name in chosen))

    @property
    def loraplus(self) -> bool:
        return self.options.loraplus_ratio is not None and self.options.loraplus_ratio != 1

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

    def gaps(self, stack: str, *, loraplus: bool, patterns: bool, parameters: bool,
             loraplus_hint: str = "") -> tuple[list[str], bool]:
        """Warnings for what ``stack`` has no key for, and whether the placement survives that."""
        warnings, exact = [], True
        if self.loraplus and not loraplus:
            warnings.append(f"{stack} has no LoRA+ key: loraplus_ratio={self.options.loraplus_ratio} is not "
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
