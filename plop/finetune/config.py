"""What a fine-tune can be asked for: :class:`TrainConfig`, and where a run's files go.

Torch-free, so the CLI reads its defaults from here without paying for torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

SUMMARY_FILE = "plop_train_summary.json"
REPORT_TO = ("none", "tensorboard", "wandb")  # passed to the Trainer; the package must be installed


@dataclass
class TrainConfig:
    """Settings of a fine-tune; all of them land in the summary JSON.

    ``alpha``: ``lora_alpha``; None (the default) means ``2 * rank`` whatever the rank, as
    :meth:`Report.to_peft_config` does, so ``replace(config, rank=8)`` keeps that rule.
    ``loraplus_ratio``: LoRA+ learning-rate ratio of the B matrices to the A matrices (1: plain
    LoRA). ``steps`` or ``epochs`` bound the run (neither: one epoch). ``logging_steps``
    and ``save_steps`` below 1 are fractions of the run (the Trainer's convention), so short and
    long runs both get a readable loss curve and a few checkpoints. ``eval_steps``: also
    evaluate during training (the eval loss is always measured before and after).
    ``adapter_name``: ``"default"`` writes into ``output_dir``; any other name into
    ``output_dir/<name>/``, PEFT's own layout for several adapters on one base model.
    ``report_to``: where the Trainer logs (``tensorboard``, ``wandb`` or ``none``); with
    TensorBoard, plop also logs the placement and the report's NFN heatmap at step 0.
    """

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.05
    lr: float = 2e-4
    loraplus_ratio: float = 16.0
    dora: bool = False
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    eval_fraction: float = 0.1
    seed: int = 0
    output_dir: str = "plop-adapter"
    resume: bool = False
    overwrite: bool = False
    adapter_name: str = "default"
    logging_steps: float = 0.02
    save_steps: float = 0.25
    save_total_limit: int = 2
    eval_steps: int | None = None
    report_to: str = "none"

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "grad_accum", "max_length", "save_total_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        checks = [
            (self.alpha is None or self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
            (0 < self.lr <= 1, f"lr must be in (0, 1], got {self.lr}"),
            (self.loraplus_ratio >= 1, f"loraplus_ratio must be >= 1 (1 is plain LoRA), got {self.loraplus_ratio}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.steps is None or self.epochs is None, "give steps or epochs, not both"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (not (self.resume and self.overwrite), "resume and overwrite exclude each other"),
            (self.logging_steps > 0 and self.save_steps > 0, "logging_steps and save_steps must be positive"),
            (self.eval_steps is None or self.eval_steps >= 1, f"eval_steps must be >= 1, got {self.eval_steps}"),
            (bool(self.adapter_name) and "/" not in self.adapter_name and self.adapter_name not in (".", ".."),
             f"adapter_name must be a plain name, got {self.adapter_name!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}, not {self.report_to!r}")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to={self.report_to} needs the {self.report_to} package",
                              f"pip install {self.report_to}")

    @property
    def lora_alpha(self) -> float:
        """The ``lora_alpha`` in force: ``alpha``, else ``2 * rank``."""
        return 2 * self.rank if self.alpha is None else self.alpha

    @property
    def run_dir(self) -> Path:
        return adapter_path(self.output_dir, self.adapter_name)


def adapter_path(directory: str | Path, name: str) -> Path:
    """Where adapter ``name`` lives under ``directory`` (the default at its root, as PEFT saves it)."""
    return Path(directory) if name == "default" else Path(directory) / name
