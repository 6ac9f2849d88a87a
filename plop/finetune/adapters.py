"""Several task adapters on one base model: list them, load them side by side, merge one.

Layout (PEFT's own for several adapters): ``DIR/`` holds the adapter named ``default`` when
there is one, ``DIR/<name>/`` each other one; :func:`plop.train` writes there given
``TrainConfig(output_dir=DIR, adapter_name=name)``. Each adapter folder has PEFT's
``adapter_config.json`` and ``adapter_model.safetensors``, the tokenizer, and plop's
``plop_train_summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PlopError
from .config import SUMMARY_FILE, adapter_path
from .lora import quiet_peft

ADAPTER_CONFIG = "adapter_config.json"


def _adapter_names(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise PlopError(f"{directory} is not a directory")
    names = ["default"] if (directory / ADAPTER_CONFIG).is_file() else []
    # checkpoint-N folders hold adapters too, but they are a run's snapshots, not task adapters
    names += sorted(p.name for p in directory.iterdir()
                    if p.is_dir() and not p.name.startswith("checkpoint-") and (p / ADAPTER_CONFIG).is_file())
    return names


def list_adapters(directory: str | Path) -> list[dict[str, Any]]:
    """One row per adapter: name, path, placement, target modules, rank, DoRA, steps and the eval
    loss before/after training (from plop's summary; None for an adapter plop did not train)."""
    directory = Path(directory)
    rows = []
    for name in _adapter_names(directory):
        path = adapter_path(directory, name)
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        summary_file = path / SUMMARY_FILE
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        rows.append({
            "name": name,
            "path": str(path),
            "placement": summary.get("placement"),
            "target_modules": config.get("target_modules"),
            "rank": config.get("r"),
            "dora": bool(config.get("use_dora")),
            "base_model": config.get("base_model_name_or_path"),
            "steps": summary.get("steps"),
            "eval_loss_before": (summary.get("eval_before") or {}).get("loss"),
            "eval_loss_after": (summary.get("eval_after") or {}).get("loss"),
        })
    return rows


def _checked_names(directory: Path, names: Sequence[str] | None) -> list[str]:
    available = _adapter_names(directory)
    if not available:
        raise PlopError(f"{directory} holds no adapters", "train one with plop train --output-dir DIR")
    unknown = [n for n in (names or []) if n not in available]
    if unknown:
        raise PlopError(f"no adapter named {unknown[0]!r} in {directory}", f"available: {', '.join(available)}")
    return list(names or available)


def load_adapters(base: nn.Module, directory: str | Path, names: Sequence[str] | None = None):
    """A ``PeftModel`` on ``base`` (wrapped in place) with the named adapters (default: all)
    loaded under their names; the first is active, ``model.set_adapter(name)`` switches."""
    from peft import PeftModel

    directory = Path(directory)
    names = _checked_names(directory, names)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, adapter_path(directory, names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_path(directory, name), adapter_name=name)
    return model


def merge_adapter(base: nn.Module, directory: str | Path, name: str, out_dir: str | Path, tokenizer=None) -> Path:
    """Merge adapter ``name`` into ``base`` and save the merged model (a plain transformers model,
    no PEFT needed to load it) with its tokenizer: ``tokenizer``, else the one saved with the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    directory, out_dir = Path(directory), Path(out_dir)
    _checked_names(directory, [name])
    if (out_dir / "config.json").is_file():
        raise PlopError(f"{out_dir} already holds a model", "choose another --out")
    path = adapter_path(directory, name)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, path, adapter_name=name).merge_and_unload()
    merged.save_pretrained(out_dir)
    if tokenizer is None and (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
