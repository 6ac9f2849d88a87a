"""Export a plop recommendation to the config of each fine-tuning stack.

    from plop.exports import export, merge_into, FORMATS
    result = export(report, "axolotl", rank=16, alpha=32, dropout=0.05, loraplus_ratio=16.0)
    result.text, result.filename, result.warnings, result.exact
    merged = merge_into(existing_yaml_text, result)      # updates only the LoRA keys

Importing this package needs neither torch nor transformers; only the ``peft`` format loads PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from . import axolotl, llama_factory, mlx_lm, peft_adapter, spectrum, torchtune, trl_config, unsloth
from .lint import lint
from .result import ExportResult, merge_into
from .target import Options, Target

FORMATS: dict[str, Callable[[Target], ExportResult]] = {
    "peft": peft_adapter.export,
    "axolotl": axolotl.export,
    "llama-factory": llama_factory.export,
    "torchtune": torchtune.export,
    "trl": trl_config.export,
    "unsloth": unsloth.export,
    "mlx-lm": mlx_lm.export,
    "spectrum": spectrum.export,
}


def export(report: Any, fmt: str, *, rank: int | None = None, alpha: int | None = None, dropout: float = 0.05,
           dora: bool = False, loraplus_ratio: float | None = None) -> ExportResult:
    """``report``'s recommendation as ``fmt``'s config (one of :data:`FORMATS`).

    ``rank`` defaults to the report's, ``alpha`` to ``2 * rank``; ``loraplus_ratio`` None or 1 is plain LoRA.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[fmt](Target(report, Options(rank, alpha, dropout, dora, loraplus_ratio)))


__all__ = ["FORMATS", "ExportResult", "Options", "Target", "export", "lint", "merge_into"]
