"""The parts of the bundled trainer that subclass ``transformers`` classes.

Kept apart from :mod:`plop.finetune.trainer` because importing ``transformers.Trainer`` takes seconds;
this module is imported only when a fine-tune starts.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import Trainer, TrainerCallback

from ..errors import ConfigError


class LoraPlus:
    """Makes a ``Trainer`` subclass's optimizer LoRA+ (arXiv 2402.12354): the B matrices learn
    ``loraplus_ratio`` times faster than the A matrices; a ratio of 1 keeps the Trainer's own.
    A mixin, so that supervised and GRPO training share one LoRA+.

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


class LoraPlusTrainer(LoraPlus, Trainer):
    """The supervised fine-tune's ``Trainer``, with LoRA+."""


class PairedSampling:
    """Completions drawn from a random stream of their own, from the policy without dropout.

    The generation at (step, micro-step) of a run seeded ``s`` on process ``p`` samples from a seed
    derived from ``(s, step, micro-step, p)`` and gives the global stream back as it found it; the
    model is in eval mode meanwhile, so no LoRA dropout mask is drawn between two tokens' samples
    (TRL generates in train mode, where each adapted module's dropout draws from the same global
    stream: a placement with more adapters shifted every later sample). Two placements at one seed
    then sample the same completions while their policies are equal (at the first step, where every
    B is zero), so a seed pairs runs by their samples, not only by their prompt order.

    A mixin over TRL's ``GRPOTrainer``, whose ``_generate`` samples with the model's ``generate``
    on the global torch generator (trl/trainer/grpo_trainer.py)."""

    def _generate(self, prompts: list):
        import numpy as np

        key = [self.args.seed, self.state.global_step, getattr(self, "_step", 0), self.accelerator.process_index]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        training = self.model.training
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self.model.eval()
            try:
                return super()._generate(prompts)
            finally:
                self.model.train(training)


@functools.cache
def grpo_trainer_class() -> type:
    """TRL's ``GRPOTrainer`` with LoRA+ and paired sampling, built on first use: importing TRL costs seconds."""
    from trl import GRPOTrainer

    return type("LoraPlusGRPOTrainer", (LoraPlus, PairedSampling, GRPOTrainer),
                {"__doc__": "TRL's GRPO, with LoRA+ and completions sampled from their own seeded stream."})


class EveryNSteps(TrainerCallback):
    """Calls ``action()`` after every ``n``-th optimizer step (the held-out reward curve)."""

    def __init__(self, n: int, action) -> None:
        self.n, self.action = n, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.n == 0:
            self.action()
        return control


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


class PlacementToTensorBoard(TrainerCallback):
    """Logs where the adapters went next to the loss curve, at step 0: the placement as text and,
    with a report, its NFN heatmap as an image, through the Trainer's own TensorBoard writer."""

    def __init__(self, tensorboard, placement_text: str, report=None) -> None:
        self.tensorboard, self.placement_text, self.report = tensorboard, placement_text, report

    def on_train_begin(self, args, state, control, **kwargs):
        writer = self.tensorboard.tb_writer  # opened by TensorBoardCallback.on_train_begin, which runs first
        if writer is None or not state.is_world_process_zero:
            return
        writer.add_text("plop/placement", self.placement_text, state.global_step)
        if self.report is not None:
            from ..ranking.render import plot_report

            writer.add_figure("plop/nfn", plot_report(self.report), state.global_step)  # closes the figure
        writer.flush()


def log_placement(trainer: Trainer, logging_dir: str, placement_text: str, report=None) -> None:
    """When the Trainer reports to TensorBoard: log into ``logging_dir`` (the Trainer would open
    its writer in the working directory when the eval before training logs first) and add
    :class:`PlacementToTensorBoard`."""
    from transformers.integrations import TensorBoardCallback

    tensorboard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if tensorboard is not None:
        tensorboard.logging_dir = logging_dir
        trainer.add_callback(PlacementToTensorBoard(tensorboard, placement_text, report))


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


def check_fsdp_honoured(trainer: Trainer) -> None:
    """Stop a run launched with an FSDP config that the Trainer does not shard.

    accelerate (1.15, ``AcceleratorState.__init__`` in accelerate/state.py) turns
    ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only when the processes' distributed type is
    a GPU-like one (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...); CPU-only processes are MULTI_CPU, so it drops
    the FSDP plugin without a word and the run is plain DDP, every process holding the whole model.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise ConfigError("accelerate launch was given an FSDP config, but accelerate enables FSDP only for GPU "
                          "processes (its AcceleratorState), and these are CPU ones: it would train plain DDP",
                          "launch without the FSDP config (--multi_gpu) to train data-parallel on CPUs")


def weights_partitioned(trainer: Trainer) -> bool:
    """Whether no process holds the whole model (FSDP, DeepSpeed ZeRO-3): the NFN re-measurement
    after training, which diagnoses a merged copy of the model, cannot run on such shards."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)
