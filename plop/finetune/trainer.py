"""``plop.train``: LoRA, LoRA+ and DoRA fine-tuning on a placement, built on ``transformers.Trainer``.

The loop is the Trainer's, not one of plop's own, so that ``torchrun`` and ``accelerate launch``
(several GPUs or CPU processes, DeepSpeed; FSDP is refused on CPU processes, where accelerate drops
it, and untried on GPUs), mixed precision, checkpoints and resumption all work as they do elsewhere: each process trains on its shard (the Trainer's distributed
sampler), gradients are averaged (DDP), and rank 0 alone writes the adapter and the summary.
plop adds what the diagnosis knows: where the adapters go, a response-only SFT loss, an eval
loss before and after, and a summary JSON next to the adapter.

``transformers`` is imported only when a fine-tune starts: importing its trainer takes seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FileError, ModelError, PlopError
from ..files.data import Example
from ..measure.seq2seq import is_encoder_decoder
from ..model.loading import is_causal_lm, model_info, model_layout
from ..ranking.placements import resolve_placement
from ..placement import Placement
from ..ranking.render import ranks_text
from ..ranking.report import Report
from ..utils.distributed import barrier, launched, timeout
from ..utils.fsio import atomic_write
from ..version import __version__
from .config import LR_SCHEDULES, SUMMARY_FILE, TrainConfig, reward_name
from .lora import check_built, run_lora_config, planned, wrap
from .method import Method
from .remeasure import nfn_change
from .run_report import run_report
from .sft import SFT


@dataclass
class TrainResult:
    """What a fine-tune produced. ``adapter_path``: the folder with the adapter, its checkpoints and
    summary (``output_dir`` itself, or ``output_dir/<adapter_name>``). ``trainer``: the
    ``transformers.Trainer`` (its ``model`` the trained ``PeftModel``), for further evaluation.
    ``report``: the report the run was placed by, given or diagnosed (None: placed without one)."""

    summary: dict[str, Any]
    output_dir: Path
    adapter_path: Path
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    trainer: Any = field(repr=False)
    report: Report | None = field(default=None, repr=False)

    @property
    def model(self):
        return self.trainer.model


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was written; ``resume`` continues it."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"training interrupted at step {step}; {where} (continue with resume / --resume)")
        self.step, self.checkpoint = step, checkpoint


# -- the output directory --------------------------------------------------------------------------
def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def check_output_dir(config: TrainConfig) -> Path:
    """The run directory, once it is known not to hold another run (unless resuming or
    overwriting). Cheap: the CLI calls it before loading anything."""
    run = config.run_dir
    if run.exists() and not run.is_dir():
        raise PlopError(f"output directory {run} is a file")
    if (run / SUMMARY_FILE).is_symlink():  # fail now, not after the whole run when the summary is written
        raise FileError(f"{run / SUMMARY_FILE} is a symbolic link; plop does not write through links")
    occupied = (run / SUMMARY_FILE).is_file() or any(run.glob("checkpoint-*"))
    if config.resume and last_checkpoint(run) is None:
        raise PlopError(f"{run} has no checkpoint to resume from", "train without --resume")
    if occupied and not (config.resume or config.overwrite):
        raise PlopError(f"{run} already holds a training run",
                        "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir")
    return run


def _clear_previous_run(run: Path) -> None:
    # only what a run writes: the directory may hold other named adapters or the user's files
    for checkpoint in run.glob("checkpoint-*"):
        if checkpoint.is_symlink():  # the link goes, never what it points to
            checkpoint.unlink()
        else:
            shutil.rmtree(checkpoint)
    (run / SUMMARY_FILE).unlink(missing_ok=True)


# -- training -------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig | None = None,
    *,
    report: Report | None = None,
    target_modules: Sequence[str] | str | None = None,
    placement: str | None = None,
    model_id: str | None = None,
    data_info: Mapping[str, Any] | None = None,
    eval_examples: Sequence[Example] | None = None,
    remeasure: Sequence[str] | None = None,
    progress: bool = True,
    **overrides,
) -> TrainResult:
    """Fine-tune LoRA adapters on ``examples`` and save them in PEFT's format.

    ``config``: the training settings (default :class:`TrainConfig`); ``overrides`` replace its
    fields, as in :func:`plop.compare`: ``train(model, tokenizer, prompts, method="grpo",
    reward=my_reward, steps=200)``.

    The eval loss is measured on ``eval_examples`` when given (all of ``examples`` then train),
    else on a seeded ``config.eval_fraction`` split of ``examples``.

    Where they go: ``target_modules``, else ``placement`` (``recommended``, ``qv``,
    ``attention``, ``mlp``, ``all-linear``), else the ``report``'s recommendation; with none of
    them, ``examples`` are diagnosed first, as ``plop train`` does, and that report is saved in the
    run directory and reused on ``resume`` (:mod:`plop.finetune.run_report`). ``model`` is
    wrapped in place (``get_peft_model``); the trained ``PeftModel`` is ``result.model``.
    SIGINT/SIGTERM finish the current step, write a checkpoint and raise
    :class:`TrainingInterrupted`. ``remeasure``: texts (best, the rows the placement was diagnosed
    on) whose NFN is measured again after training, adapted against frozen, into
    ``summary["nfn_change"]`` (see :mod:`plop.finetune.remeasure`).
    """
    config = replace(config or TrainConfig(), **overrides)
    check_output_dir(config)  # before a diagnosis writes its report there
    report, _ = run_report(model, tokenizer, examples, config, report=report, target_modules=target_modules,
                           placement=placement, model_id=model_id, data_info=data_info, progress=progress)
    where = resolve_placement(model_layout(model), report=report, target_modules=target_modules, placement=placement)
    return train_on_placement(model, tokenizer, examples, config, where, report=report, model_id=model_id,
                              data_info=data_info, eval_examples=eval_examples, remeasure=remeasure,
                              progress=progress)


def train_on_placement(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig,
    placement: Placement,
    *,
    report: Report | None = None,
    model_id: str | None = None,
    data_info: Mapping[str, Any] | None = None,
    eval_examples: Sequence[Example] | None = None,
    remeasure: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """:func:`train` once the placement is known (:mod:`plop.finetune.compare` builds its own)."""
    run = check_output_dir(config)
    info = model_info(model, model_id)
    seq2seq = is_encoder_decoder(model)
    if not (seq2seq or is_causal_lm(model)):
        raise ModelError(f"training needs a causal language model (...ForCausalLM) or an encoder-decoder "
                         f"(T5, BART, ...), not {info['architecture']}")
    method = method_of(config)
    train_set, eval_set = method.datasets(examples, tokenizer, config, eval_examples, seq2seq)
    task_type = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    layout = model_layout(model)
    peft_model = wrap(model, run_lora_config(layout, config, placement, task_type), config.seed)
    check_built(peft_model, planned(layout, placement))  # before the Trainer spends a step
    trainer, stop = _trainer(peft_model, tokenizer, config, run, (train_set, eval_set), progress, method)
    _measure_step_size(trainer, method, eval_set, config)
    if config.overwrite:
        if trainer.is_world_process_zero():
            _clear_previous_run(run)
        barrier()  # no process may find the old checkpoints once training starts
    from .hf_trainer import log_placement, signals_stop, weights_partitioned  # transformers.Trainer: seconds to import

    log_placement(trainer, str(run / "runs"), _placement_text(placement, config), report)
    resume_from = last_checkpoint(run) if config.resume else None

    eval_before = method.evaluate(trainer, eval_set, config) if eval_set else None
    started = time.perf_counter()
    with signals_stop(stop):
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    if stop.signal is not None:
        raise TrainingInterrupted(trainer.state.global_step, last_checkpoint(run))
    eval_after = method.evaluate(trainer, eval_set, config) if eval_set else None
    trainer.save_model(str(run))

    remeasure = None if weights_partitioned(trainer) else remeasure  # no process holds a whole copy to merge
    change = nfn_change(peft_model, remeasure, tokenizer, max_length=config.max_length,
                        batch_size=config.batch_size, adapted_types=placement.types) if remeasure else None
    summary = {**_summary(trainer, placement, config, seconds, resume_from, (train_set, eval_set)),
               **method.summary(trainer),
               "eval_before": eval_before, "eval_after": eval_after, "model": info, "data": dict(data_info or {}),
               "config": config.record(), "versions": _versions(), "nfn_change": change,
               "step_size": trainer.plop_step_size}
    if trainer.is_world_process_zero():
        atomic_write(run / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    barrier()  # the summary is whole before any process returns
    return TrainResult(summary, Path(config.output_dir), run, eval_before, eval_after, trainer, report)


def _measure_step_size(trainer, method: Method, eval_set: list, config: TrainConfig) -> None:
    """After ``config.step_size_steps`` steps, how far the model moved from its base on the held-out
    set (:mod:`plop.finetune.step_size`), into ``trainer.plop_step_size`` (None when not asked)."""
    trainer.plop_step_size = None
    if not (config.step_size_steps and eval_set):
        return
    from .hf_trainer import EveryNSteps

    def measure() -> None:
        if trainer.state.global_step == config.step_size_steps:
            trainer.plop_step_size = {"steps": config.step_size_steps, **method.step_size(trainer, eval_set, config)}

    trainer.add_callback(EveryNSteps(config.step_size_steps, measure))


def _summary(trainer, placement: Placement, config: TrainConfig, seconds: float, resume_from: str | None,
             datasets: tuple[list, list]) -> dict[str, Any]:
    """What was trained where, how long it took and how the loss went (the evals are added by the caller)."""
    steps = trainer.state.global_step - (int(resume_from.rsplit("-", 1)[1]) if resume_from else 0)
    return {
        "method": config.method, "reward": reward_name(config.reward),
        "placement": placement.name, "types": placement.types, "target_modules": placement.target_modules,
        "target_parameters": placement.target_parameters,
        "adapter_name": config.adapter_name, "rank": config.lora.r, "rank_pattern": placement.rank_pattern,
        "alpha": config.lora.lora_alpha,
        "loraplus_ratio": config.lora.loraplus_ratio or 1.0, "dora": config.lora.use_dora,
        "rslora": config.lora.use_rslora,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / steps, 4) if steps else None,  # of this session, when resumed
        "resumed_from": resume_from, "train_examples": len(datasets[0]), "eval_examples": len(datasets[1]),
        "world_size": trainer.args.world_size,
        "global_batch": config.batch_size * trainer.args.world_size * config.grad_accum,
        "loss_curve": [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
                       for h in trainer.state.log_history if "loss" in h],
    }


def _placement_text(placement: Placement, config: TrainConfig) -> str:
    """The placement in TensorBoard's markdown: where the adapters went and at which rank."""
    lora = config.lora
    method = "DoRA" if lora.use_dora else "LoRA"
    return (f"**{placement.name}**: {method} {ranks_text(lora.r, placement.rank_pattern)}, "
            f"alpha/rank {lora.lora_alpha / lora.r:g}, "
            f"LoRA+ ratio {lora.loraplus_ratio or 1:g}  \ntypes: {', '.join(placement.types)}  \n"
            f"target_modules: `{placement.target_modules!r}`")


def _trainer(peft_model, tokenizer, config: TrainConfig, run: Path, datasets: tuple[list, list], progress: bool,
             method: Method):
    """The method's LoRA+ ``Trainer`` and the callback that turns SIGINT/SIGTERM into a checkpoint."""
    from transformers import PrinterCallback

    from .hf_trainer import StopOnSignal, check_fsdp_honoured

    stop = StopOnSignal()
    args = _training_arguments(config, run, bool(datasets[1]), progress, **method.arguments(config, peft_model))
    trainer = method.trainer(peft_model, tokenizer, args, datasets, [stop], config)
    check_fsdp_honoured(trainer)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # without a bar the Trainer prints every log dict instead
    return trainer, stop


def _training_arguments(config: TrainConfig, run: Path, has_eval: bool, progress: bool, args_class=None,
                        **method_args):
    """The Trainer's arguments (``args_class``, a method's subclass of them, with ``method_args`` on top)."""
    from transformers import TrainingArguments

    return (args_class or TrainingArguments)(**{**dict(
        output_dir=str(run), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr, lr_scheduler_type=LR_SCHEDULES[config.lr_schedule], warmup_steps=config.warmup_steps,
        max_steps=config.steps or -1, num_train_epochs=config.epochs or 1.0,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, eval_strategy="steps" if config.eval_steps and has_eval else "no",
        eval_steps=config.eval_steps, seed=config.seed, report_to=config.report_to, disable_tqdm=not progress,
        # the collator always yields labels; naming them keeps the eval loss for models whose
        # forward takes them through **kwargs, where the Trainer cannot see them
        label_names=["labels"], dataloader_pin_memory=torch.cuda.is_available(),
        # under torchrun without a GPU the Trainer only turns data-parallel (gloo) when told the CPU is the device
        use_cpu=launched() and not torch.cuda.is_available(), ddp_timeout=round(timeout().total_seconds()),
    ), **method_args})


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"plop": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def method_of(config: TrainConfig) -> Method:
    """The method a run trains with: SFT, or GRPO (whose module imports only when asked for)."""
    if config.method == "grpo":
        from .grpo import GRPO

        return GRPO
    return SFT
