"""Every fine-tuning stack plop writes and reads, one module each (``write`` a placement into the
stack's keys, ``read`` its keys back into a placement), and :data:`STACKS`, the one list of them.

    from plop.placement import LoraSettings
    from plop.stacks import export, read_config, STACKS
    result = export(report, "axolotl", LoraSettings(16, alpha=32, loraplus_ratio=16.0))
    result.text, result.filename, result.warnings, result.exact
    config = read_config("lora.yml")                     # a StackConfig: placement, settings, rules

Importing this package needs neither torch nor transformers nor PEFT.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings
from ..utils.fsio import atomic_write
from . import axolotl, llama_factory, mlx_lm, peft, spectrum, torchtune, trl, unsloth
from .lint import lint
from .reading import StackConfig, load_text
from .result import ExportResult, merge_into
from .target import Target

# name -> module, in the order a config's keys are tried against each stack's ``claims`` (axolotl
# before TRL: both use lora_target_modules, only axolotl adapter/base_model); ``plop export --to``,
# ``plop check --flavour`` and the HTML page's snippets all list these
STACKS: dict[str, ModuleType] = {m.NAME: m for m in (peft, llama_factory, axolotl, mlx_lm, trl, torchtune,
                                                      unsloth, spectrum)}
FORMATS = tuple(STACKS)  # what plop export writes
READABLE = tuple(name for name, m in STACKS.items() if m.read is not None)  # what plop check reads


def export(report: Any, fmt: str, settings: LoraSettings | None = None) -> ExportResult:
    """``report``'s recommendation as ``fmt``'s config (one of :data:`FORMATS`) under ``settings``
    (default: the report's rank, every other setting at :class:`~plop.placement.LoraSettings`'s
    default)."""
    if fmt not in STACKS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return STACKS[fmt].write(Target(report, settings or LoraSettings(report.recommendation.rank)))


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


def detect(data: Any, source: str) -> str:
    """The stack that wrote ``data``, from the keys only it uses."""
    found = next((name for name, m in STACKS.items() if m.claims(data)), None)
    if found is not None:
        return found
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, not {type(data).__name__}")
    raise ConfigError(
        f"{source}: not a LoRA config plop knows: expected a PEFT adapter_config.json (peft_type, target_modules), "
        "or an axolotl (lora_target_modules / lora_target_linear), LLaMA-Factory (lora_target), TRL "
        "(lora_target_modules, use_peft), torchtune (model.lora_attn_modules) or mlx-lm (lora_parameters) YAML")


def read(data: Any, source: str, stack: str | None = None) -> StackConfig:
    """``data`` (a parsed config) as ``stack`` reads it (default: the stack its keys name)."""
    stack = stack or detect(data, source)
    if stack not in READABLE:
        raise ConfigError(f"unknown flavour {stack!r}; choose from {', '.join(READABLE)}")
    if stack != "unsloth" and not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, not {type(data).__name__}")
    return STACKS[stack].read(data, source)


def read_config(path: str | Path, stack: str | None = None) -> StackConfig:
    """The :class:`StackConfig` of a config file or PEFT adapter folder; ``stack`` forces the stack."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_config.json"
    return read(load_text(path), str(path), stack)


__all__ = ["FORMATS", "READABLE", "STACKS", "ExportResult", "StackConfig", "Target", "detect", "export", "lint",
           "merge_into", "read", "read_config", "snippets", "write_export"]
