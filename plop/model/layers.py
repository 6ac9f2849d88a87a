"""Which modules of a model are linear, and their weights as dense ``(d_out, d_in)`` matrices.

Covers ``nn.Linear`` and its subclasses (bitsandbytes ``Linear4bit``/``Linear8bitLt`` among them),
GPT-2's ``Conv1D`` (weight stored transposed) and PEFT-wrapped layers (reported under the name of
the module they wrap), also when accelerate offloaded the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight as (d_in, d_out); matched by name so that
    # plop does not need transformers to inspect a plain torch model.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes Linear4bit/8bitLt among them) and Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def module_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear-like module, read from its attributes: a quantized or
    offloaded weight's own shape says nothing about the matrix it stands for."""
    if _is_conv1d(module):
        return int(module.nf), int(module.nx)
    return int(module.out_features), int(module.in_features)


def parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>``, also when accelerate offloaded it (``device_map`` with "cpu"/"disk"):
    such a parameter sits on the meta device outside the module's own forward, and its values
    live in the accelerate hook's ``weights_map``."""
    value = getattr(module, name, None)
    if value is not None and value.device.type == "meta":
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return weights_map[name]
    return value


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps the module's weight off the module (CPU or disk offload)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.device.type == "meta"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a dense ``(d_out, d_in)`` tensor, dequantized when needed."""
    weight = parameter(module, "weight")
    if _is_conv1d(module):
        return weight.T
    if getattr(weight, "quant_state", None) is not None:
        return _dequantize_4bit(weight)
    scale = _int8_row_scale(module, weight)
    if weight.dtype == torch.int8 and scale is not None:  # bnb 8-bit: int8 rows times absmax/127
        return weight.data.float() * scale.float().unsqueeze(1) / 127.0
    return weight


def _dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as dense. On a CPU with AVX512-BF16, the layer's first forward
    repacks its codes for the CPU kernel (``packing_format_for_cpu``) with a bfloat16 ``(blocks,
    d_out)`` absmax. bitsandbytes' own inverse unpacks a copy of the codes (the layer keeps the
    layout its forward uses); the absmax is laid back flat here, as the kernel's bfloat16 values
    (the inverse re-quantizes it only for double quantization, and un-transposes it never)."""
    import bitsandbytes.functional as bnbf

    data, quant_state = weight.data, weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        quant_state = copy.deepcopy(quant_state)
        quant_state.original_nested = False
        data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), quant_state)
        quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
    return bnbf.dequantize_4bit(data, quant_state)


def _int8_row_scale(module: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """bitsandbytes 8-bit's per-row absmax (``SCB``): on the weight until the layer's first
    forward, which moves it to the layer's ``state`` (the int8 rows stay the weight's data)."""
    scale = getattr(weight, "SCB", None)
    return scale if scale is not None else getattr(getattr(module, "state", None), "SCB", None)


def find_linear_modules(model: nn.Module, include_head: bool = False) -> dict[str, nn.Module]:
    """Every linear-like module by full name, without the output head unless asked for.

    The head is ``model.get_output_embeddings()`` where the model has one (lm_head, or a tied
    output embedding). Adapter sub-layers of an already-wrapped PEFT model are skipped, and a
    PEFT ``base_layer`` is reported under its parent's name.
    """
    head = None
    if not include_head and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_linear_like(module) or module is head:
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if parts[-1] == "base_layer":
            name = ".".join(parts[:-1])
        found[name] = module
    return found


def body(model: nn.Module) -> nn.Module:
    """The model without its output head (``model.base_model`` where that holds the input
    embeddings), else the model itself: what a diagnosis without the head calls, so that no
    logits are computed."""
    inner = getattr(model, "base_model", None)
    if isinstance(inner, nn.Module) and inner is not model and hasattr(inner, "get_input_embeddings"):
        return inner
    return model


def linear_shapes(model: nn.Module, include_head: bool = True) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of every linear-like module: what placements are resolved on."""
    return {name: module_shape(m) for name, m in find_linear_modules(model, include_head=include_head).items()}
