"""What an adapter config asks for, in one stack-neutral record (torch-free).

Each reader (:mod:`plop.audit.readers`) turns a stack's keys into an :class:`AdapterSpec`: the
``LoraConfig`` arguments the stack hands to PEFT, plus the stack rules that need the model to be
resolved (``lora_target_linear``, ``lora_target: all``, torchtune's ``apply_lora_to_mlp``,
mlx-lm's default keys and ``num_layers``), which :mod:`plop.audit.resolve` applies on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..utils.untrusted import check_regex

FLAVOURS = ("peft", "axolotl", "llama-factory", "trl", "torchtune", "mlx-lm", "unsloth", "inline")


@dataclass
class AdapterSpec:
    """A LoRA config read from one stack's file (or the command line)."""

    flavour: str
    source: str
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_dora: bool = False
    use_rslora: bool = False
    bias: str = "none"
    base_model: str | None = None
    # a stack rule resolved on the model: "axolotl-linear", "llama-factory-all", "torchtune", "mlx-lm"
    expand: str | None = None
    stack: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the stack did to the keys on the way to PEFT

    def lora_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` arguments, before any rule that needs the model."""
        return {
            "r": self.r, "lora_alpha": self.lora_alpha if self.lora_alpha is not None else 8,
            "lora_dropout": self.lora_dropout, "target_modules": self.target_modules,
            "target_parameters": self.target_parameters, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform, "layers_pattern": self.layers_pattern,
            "exclude_modules": self.exclude_modules, "use_dora": self.use_dora,
            "use_rslora": self.use_rslora, "bias": self.bias,
        }


def check_regexes(kwargs: dict) -> None:
    """Every regex PEFT will run on module names, through the ReDoS guard first."""
    for key in ("target_modules", "exclude_modules"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "all-linear":
            check_regex(kwargs[key])
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in kwargs.get(key) or {}:
            check_regex(pattern)
