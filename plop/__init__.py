"""plop: where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629).

The top level is lazy (PEP 562): ``import plop`` costs nothing, and each name below imports its
module (and torch, where that module needs it) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "diagnose": "plop.diagnosis",
    "DiagnoseConfig": "plop.config",
    "Strategy": "plop.config",
    "Report": "plop.ranking.report",
    "load_model": "plop.model.loading",
    "load_examples": "plop.files.data",
    "lora_config": "plop.integrations.peft",
    "train": "plop.finetune.trainer",
    "TrainResult": "plop.finetune.trainer",
    "TrainingInterrupted": "plop.finetune.trainer",
    "TrainConfig": "plop.finetune.config",
    "LoraSettings": "plop.placement",
    "compare": "plop.finetune.compare",
    "Comparison": "plop.finetune.compare",
    "PlopError": "plop.errors",
    "ConfigError": "plop.errors",
    "DataError": "plop.errors",
    "ModelError": "plop.errors",
    "NonFiniteError": "plop.errors",
    "ReportError": "plop.errors",
    "FileError": "plop.errors",
    "UnsafeRegexError": "plop.errors",
    "FieldTypeError": "plop.errors",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ below resolves the same names
    from .config import DiagnoseConfig, Strategy
    from .diagnosis import diagnose
    from .errors import (
        ConfigError,
        DataError,
        FieldTypeError,
        FileError,
        ModelError,
        NonFiniteError,
        PlopError,
        ReportError,
        UnsafeRegexError,
    )
    from .files.data import load_examples
    from .finetune.compare import Comparison, compare
    from .finetune.config import TrainConfig
    from .finetune.trainer import TrainingInterrupted, TrainResult, train
    from .integrations.peft import lora_config
    from .model.loading import load_model
    from .placement import LoraSettings
    from .ranking.report import Report


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'plop' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
