"""mlx-lm LoRA YAML (``mlx_lm.lora --config FILE``), both ways. Keys: ml-explore/mlx-lm
mlx_lm/lora.py (CONFIG_DEFAULTS: fine_tune_type lora|dora, num_layers 16, lora_parameters
{rank 8, scale 20.0, dropout 0.0}) and mlx_lm/tuner/utils.py linear_to_lora_layers: LoRA goes on
the last ``num_layers`` blocks (-1: all), on the block-relative paths in ``keys``, or without keys
on every linear layer of those blocks; scale multiplies B·A directly, so it is alpha / rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target, layer_path

NAME = "mlx-lm"
DEFAULT_LAYERS = 16


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in ("lora_parameters", "fine_tune_type"))


def write(t: Target) -> ExportResult:
    paths = t.by_layer_path()
    chosen_layers = set().union(*paths.values())
    lowest = min(chosen_layers, default=t.n_layers)
    keys = sorted(paths)  # modules outside the blocks keep their full name, matched at model level
    emitted = {m.name for m in t.report.modules
               if layer_path(m.name, m.layer)[0] in paths and (m.layer is None or m.layer >= lowest)}
    warnings, exact = t.gaps("mlx-lm", loraplus=False, patterns=False, parameters=False, rslora=False)
    if emitted != set(t.modules):
        warnings.append(f"mlx-lm takes one set of keys for the last num_layers={t.n_layers - lowest} blocks: "
                        f"{len(emitted) - len(t.modules)} modules beyond the recommendation get adapters too")
    settings = {
        "fine_tune_type": "dora" if t.settings.use_dora else "lora",
        "num_layers": t.n_layers - lowest,
        "lora_parameters": {
            "keys": keys,
            "rank": t.rank,
            "scale": t.alpha / t.rank,
            "dropout": t.settings.dropout,
        },
    }
    return finish(t, NAME, settings, "mlx-lora.yaml", warnings, exact and emitted == set(t.modules),
                  comment="keys follow the Hugging Face module names, as mlx-lm's LLaMA-style models do")


def read(data: Mapping, source: str) -> StackConfig:
    if data.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise ConfigError(f"{source}: fine_tune_type {data.get('fine_tune_type')!r}; plop check audits lora/dora")
    params = data.get("lora_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    rank = number(params, "rank", 8)
    settings = LoraSettings(rank, number(params, "scale", 20.0, float) * rank, number(params, "dropout", 0.0, float),
                            use_dora=data.get("fine_tune_type") == "dora")
    return StackConfig(NAME, source, Placement(target_modules=names(params.get("keys"), "lora_parameters.keys")),
                       settings, base_model=data.get("model"), expand="mlx-lm",
                       rules={"num_layers": number(data, "num_layers", DEFAULT_LAYERS)})
