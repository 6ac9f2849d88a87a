"""The outcome of ``plop check``: what the config trains on the model, and what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXIT_CLEAN = 0
EXIT_ERRORS = 3  # error-level findings: the run would train something other than the config says


@dataclass(frozen=True)
class Finding:
    severity: str  # error: the run would silently train something else; warning: a known trap
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"severity": self.severity, "code": self.code, "message": self.message}


@dataclass
class RoleRow:
    """One role-true module type: how many of its modules (or expert weights) are adapted, at which
    rank(s), and the trainable parameters that go there."""

    type: str
    adapted: int
    total: int
    trainable: int
    ranks: list[int]
    layers: dict[int | None, bool]


@dataclass
class CheckResult:
    flavour: str
    source: str
    model: dict[str, Any]
    lora_config: dict[str, Any]
    trainable: int
    adapter_params: int  # LoRA matrices (and DoRA magnitudes) only
    saved_params: int  # full copies (modules_to_save)
    roles: list[RoleRow]
    findings: list[Finding]
    adapted_share: float  # share of the block weights that carry an adapter
    by_nfn: dict[str, Any] | None = None
    seconds: float = 0.0
    modules: list[str] = field(default_factory=list)  # every adapted module / expert weight
    stack_modules: list[str] = field(default_factory=list)  # the same in the stack's own model (mlx-lm), if it builds one

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def exit_code(self) -> int:
        return EXIT_ERRORS if self.errors else EXIT_CLEAN

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "plop.check", "schema_version": 1, "flavour": self.flavour, "source": self.source,
            "model": self.model, "lora_config": self.lora_config, "trainable_params": self.trainable,
            "adapter_params": self.adapter_params, "modules_to_save_params": self.saved_params,
            "adapted_share_of_block_weights": self.adapted_share,
            "roles": [{"type": r.type, "adapted": r.adapted, "total": r.total, "trainable_params": r.trainable,
                       "ranks": r.ranks, "layers": {str(k): v for k, v in r.layers.items()}} for r in self.roles],
            "findings": [f.to_dict() for f in self.findings], "by_nfn": self.by_nfn,
            "modules": self.modules, "stack_modules": self.stack_modules, "seconds": round(self.seconds, 3), "exit_code": self.exit_code,
        }
