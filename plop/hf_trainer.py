"""The parts of the bundled trainer that subclass ``transformers`` classes.

Kept apart from :mod:`plop.trainer` because importing ``transformers.Trainer`` takes seconds;
this module is imported only when a fine-tune starts.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import Trainer, TrainerCallback


class LoraPlusTrainer(Trainer):
    """``Trainer`` whose optimizer is LoRA+ (arXiv 2402.12354): the B matrices learn
    ``loraplus_ratio`` times faster than the A matrices; a ratio of 1 keeps the Trainer's own.

    The optimizer is built in ``create_optimizer`` rather than passed in, because DeepSpeed and
    FSDP need to build it after they have wrapped the model.
    """

    def __init__(self, *args, loraplus_ratio: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loraplus_ratio = loraplus_ratio

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.loraplus_ratio != 1:
            from peft.optimizers import create_loraplus_optimizer

            self.optimizer = create_loraplus_optimizer(
                self.model if model is None else model, torch.optim.AdamW, lr=self.args.learning_rate,
                loraplus_lr_ratio=self.loraplus_ratio, loraplus_weight_decay=self.args.weight_decay,
            )
        return super().create_optimizer(model)


class StopOnSignal(TrainerCallback):
    """Turns a caught SIGINT/SIGTERM into "save a checkpoint, then stop" at the end of the step,
    so an interrupted run can be resumed instead of losing everything since the last save."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def signals_stop(callback: StopOnSignal) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``callback`` while training; a second signal interrupts at once."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def handler(signum, frame) -> None:
        if callback.signal is not None:
            raise KeyboardInterrupt
        callback.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
