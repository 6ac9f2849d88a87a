"""How much of a model the diagnosis saw, and what it could not measure, said rather than hidden.

The unit is the model's *block weights*: every parameter of two or more dimensions inside a
repeated block (a name with a layer index), embeddings aside. A linear module counts as seen when
its hook saw a token, a 3-D expert weight when a token was routed to it. What is left gets a
reason, and every role (:func:`plop.model.roles.role`) holding more than ``threshold`` of the block
weights is listed: a vision tower on text data, a Mamba mixer's convolution, an experts module
whose forward a hub kernel replaced (its hook never ran), routers and state-space parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

from torch import nn

from .layers import is_linear_like
from .roles import INDEX, role

THRESHOLD = 0.05
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _reason(module: nn.Module, full: str, experts: Collection[str]) -> str:
    if is_linear_like(module):
        return "not called by the forward on this data"
    if full in experts:
        return "no token reached the experts' hook (a kernel that bypasses the module's forward?)"
    if isinstance(module, _CONV):
        return "a convolution: NFN is defined for linear maps"
    return "not a linear projection (router, state-space or other parameter)"


def block_units(model: nn.Module, experts: Collection[str]) -> dict[str, tuple[int, str]]:
    """Every block weight by unit (a linear module's name, else the parameter's full name):
    ``(numel, why it would go unmeasured)``."""
    units: dict[str, tuple[int, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if param.ndim < 2 or INDEX not in role(full):
                continue
            unit = name if is_linear_like(module) and pname == "weight" else full
            units[unit] = (param.numel(), _reason(module, full, experts))
    return units


def coverage(model: nn.Module, seen: Collection[str], experts: Collection[str],
             threshold: float = THRESHOLD) -> dict[str, Any]:
    """``{"share", "block_weights", "undiagnosed": [{"role", "share", "reason"}]}``.

    ``seen``: names of the diagnosed linear modules and expert weights; ``experts``: every 3-D
    expert weight's name, whether seen or not.
    """
    seen = set(seen)
    total = covered = 0
    missed: dict[tuple[str, str], int] = defaultdict(int)
    for unit, (numel, reason) in block_units(model, experts).items():
        total += numel
        if unit in seen:
            covered += numel
        else:
            missed[(role(unit), reason)] += numel
    undiagnosed = [{"role": r, "share": round(n / total, 4), "reason": why}
                   for (r, why), n in sorted(missed.items(), key=lambda kv: -kv[1]) if n > threshold * total]
    return {"share": round(covered / total, 4) if total else 1.0, "block_weights": total, "undiagnosed": undiagnosed}
