"""Export a plop recommendation to the config of each fine-tuning stack.

    from plop.exports import export, merge_into, FORMATS
    result = export(report, "axolotl", rank=16, alpha=32, dropout=0.05, loraplus_ratio=16.0)
    result.text, result.filename, result.warnings, result.exact
    merged = merge_into(existing_yaml_text, result)      # updates only the LoRA keys

Importing this package needs neither torch nor transformers; only the ``peft`` format loads PEFT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils.fsio import atomic_write
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


def export(report: Any, fmt: str, *, rank: int | None = None, alpha: float | None = None, dropout: float = 0.05,
           dora: bool = False, loraplus_ratio: float | None = None) -> ExportResult:
    """``report``'s recommendation as ``fmt``'s config (one of :data:`FORMATS`).

    ``rank`` defaults to the report's, ``alpha`` to :func:`plop.config.default_alpha`; ``loraplus_ratio``
    None or 1 is plain LoRA.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[fmt](Target(report, Options(rank, alpha, dropout, dora, loraplus_ratio)))


def write_export(result: ExportResult, out: str | None, merge: str | None = None) -> tuple[str, Path | None]:
    """``(text, path)``: ``result`` merged into the config at ``merge`` (only the LoRA keys change),
    written to ``out`` (in place of ``merge`` when ``out`` is None), or ``path`` None: the text goes
    to stdout. A folder (existing, or ``out`` ending in a separator) gets the stack's own file name."""
    text = merge_into(Path(merge).read_text(encoding="utf-8"), result) if merge else result.text
    out = out or merge
    if out is None:
        return text, None
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):
        path = path / result.filename
    atomic_write(path, text)
    return text, path


def snippets(report: Any) -> dict[str, str]:
    """Every stack's config text for ``report`` at its defaults, keyed by format; PEFT's is the
    ``LoraConfig`` line, which needs no torch (``plop show --html`` gives each a copy button)."""
    from ..ranking.html_report import default_exports

    return {**default_exports(report), **{fmt: export(report, fmt).text for fmt in FORMATS if fmt != "peft"}}


__all__ = ["FORMATS", "ExportResult", "Options", "Target", "export", "lint", "merge_into", "snippets", "write_export"]
