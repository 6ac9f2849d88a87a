"""MoE experts stored as 3-D parameters (transformers 5): which modules hold them and their
weights as ``(E, d_out, d_in)``. How they are measured is :mod:`plop.measure.experts`."""

from __future__ import annotations

import torch
from torch import nn


def is_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``down_proj`` and the ``use_experts_implementation``
    attributes that say how the weights are laid out."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, torch.Tensor) and down.ndim == 3 and hasattr(module, "is_transposed")
            and hasattr(module, "has_gate"))


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module by full name (PEFT-wrapped ones by their base layer)."""
    return {name: module for name, module in model.named_modules() if is_experts(module)}


def input_weight_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's two stacked weights as ``(E, d_out, d_in)``, by parameter name."""
    names = (input_weight_name(module), "down_proj")
    weights = {n: getattr(module, n) for n in names}
    return {n: w.transpose(1, 2) if module.is_transposed else w for n, w in weights.items()}
