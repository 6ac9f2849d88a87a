"""What a fine-tuning method gives a run: :class:`Method`, the protocol SFT and GRPO implement.

:func:`plop.finetune.trainer.train_on_placement` owns everything the methods share (placement,
adapter, output directory, checkpoints, summary) and asks a method only for what differs: its
data, its Trainer and how a run is judged. A method is a class of static methods
(:class:`plop.finetune.sft.SFT`, :class:`plop.finetune.grpo.GRPO`), passed as the class itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..files.data import Example
from .config import TrainConfig


class Method(Protocol):
    """The parts of a run that differ between fine-tuning methods."""

    def datasets(self, examples: Sequence[Example], tokenizer, config: TrainConfig,
                 eval_examples: Sequence[Example] | None = None, seq2seq: bool = False) -> tuple[list, list]:
        """Train and held-out rows as the method's trainer takes them (one seeded split for all methods)."""

    def arguments(self, config: TrainConfig, model) -> dict[str, Any]:
        """What the method sets on top of the run's ``TrainingArguments``: ``args_class`` (a
        subclass of them) and its values."""

    def trainer(self, peft_model, tokenizer, args, datasets: tuple[list, list], callbacks: list,
                config: TrainConfig):
        """The ``transformers.Trainer`` that trains the adapters, with LoRA+ at ``config.lora.loraplus_ratio``."""

    def evaluate(self, trainer, eval_set: list, config: TrainConfig) -> dict[str, Any]:
        """How the held-out set scores now (eval loss, or reward), with each row's own score in ``items``."""

    def step_size(self, trainer, eval_set: list, config: TrainConfig) -> dict[str, float]:
        """How far the model moved from its base, measured on the held-out set."""

    def summary(self, trainer) -> dict[str, Any]:
        """The method's own entries of the run's summary."""
