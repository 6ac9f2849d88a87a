"""mlx-lm LoRA YAML (``mlx_lm.lora --config FILE``). Keys: ml-explore/mlx-lm mlx_lm/lora.py
(CONFIG_DEFAULTS: fine_tune_type lora|dora, num_layers, lora_parameters {rank, scale, dropout})
and mlx_lm/tuner/utils.py linear_to_lora_layers (``keys`` are paths inside a block, applied to the
last ``num_layers`` blocks; scale multiplies B·A directly, so it is alpha / rank)."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target, layer_path


def export(t: Target) -> ExportResult:
    paths = t.by_layer_path()
    layers = set().union(*paths.values())
    lowest = min(layers, default=t.n_layers)
    keys = sorted(paths)  # modules outside the blocks keep their full name, matched at model level
    emitted = {m.name for m in t.report.modules
               if layer_path(m.name, m.layer)[0] in paths and (m.layer is None or m.layer >= lowest)}
    warnings, exact = t.gaps("mlx-lm", loraplus=False, patterns=False, parameters=False)
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
    return finish(t, "mlx-lm", settings, "mlx-lora.yaml", warnings, exact and emitted == set(t.modules),
                  comment="keys follow the Hugging Face module names, as mlx-lm's LLaMA-style models do")
