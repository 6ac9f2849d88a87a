"""MoE experts stored as 3-D parameters (transformers 5): which modules hold them and their
weights as ``(E, d_out, d_in)``. How they are measured is :mod:`plop.measure.experts`.

Two kinds exist. Most families decorate their experts with ``use_experts_implementation``, which
sets ``is_transposed``/``has_gate``/``has_bias`` and calls them with each token's routing. Llama-4's
experts (:data:`DENSE_ROUTED`) predate it: stored ``(E, d_in, d_out)``, gated as ``up * act(gate)``
with ``gate, up = (x @ gate_up).chunk(2)``, and called densely on every (expert, token) pair, as
``(E * T, d_in)`` rows scaled by the router's score, which is 0 where a token is not routed.
"""

from __future__ import annotations

import torch
from torch import nn

DENSE_ROUTED = ("Llama4TextExperts",)
"""Experts classes called on every (expert, token) pair, unrouted pairs zeroed (Llama-4's ~97B of
Scout's 109B parameters: without this they are neither measured nor adapted)."""


def dense_routed(module: nn.Module) -> bool:
    """By the class or a base of it: PEFT's ParamWrapper parametrizes the module, which makes its
    class a ``ParametrizedLlama4TextExperts`` subclass while adapters are active."""
    return any(cls.__name__ in DENSE_ROUTED for cls in type(module).__mro__)


def is_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``down_proj`` and the ``use_experts_implementation``
    attributes that say how the weights are laid out, or a :data:`DENSE_ROUTED` class."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, torch.Tensor) and down.ndim == 3
            and ((hasattr(module, "is_transposed") and hasattr(module, "has_gate")) or dense_routed(module)))


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module by full name (PEFT-wrapped ones by their base layer)."""
    return {name: module for name, module in model.named_modules() if is_experts(module)}


def has_gate(module: nn.Module) -> bool:
    return getattr(module, "has_gate", True)


def input_weight_name(module: nn.Module) -> str:
    return "gate_up_proj" if has_gate(module) else "up_proj"


def input_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, f"{input_weight_name(module)}_bias", None) if getattr(module, "has_bias", False) else None


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's two stacked weights as ``(E, d_out, d_in)``, by parameter name."""
    names = (input_weight_name(module), "down_proj")
    weights = {n: getattr(module, n) for n in names}
    transposed = getattr(module, "is_transposed", dense_routed(module))
    return {n: w.transpose(1, 2) if transposed else w for n, w in weights.items()}


def activation(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The expert's intermediate activation from its input projection's output ``h``, as its own
    forward computes it."""
    if dense_routed(module):
        gate, up = h.chunk(2, dim=-1)
        return up * module.act_fn(gate)
    return module._apply_gate(h) if has_gate(module) else module.act_fn(h)
