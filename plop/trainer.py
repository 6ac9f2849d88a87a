"""``plop.train``: LoRA, LoRA+ and DoRA fine-tuning on a placement, built on ``transformers.Trainer``.

The loop is the Trainer's, not one of plop's own, so that ``accelerate launch`` (several GPUs,
DeepSpeed, FSDP), mixed precision, checkpoints and resumption all work as they do elsewhere.
plop adds what the diagnosis knows: where the adapters go, a response-only SFT loss, an eval
loss before and after, and a summary JSON next to the adapter.

This module imports no ``transformers`` at load time: importing its trainer takes seconds, and
``import plop`` (or ``plop show``) should not pay for that.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .collector import find_linear_modules, module_type
from .data import Example
from .errors import PlopError
from .ranker import PLACEMENTS, placement_types, placement_types_for_names
from .report import Report
from .sft import SFTCollator, split_examples, tokenize_examples

SUMMARY_FILE = "plop_train_summary.json"
PLACEMENT_CHOICES = ("recommended", *PLACEMENTS)


class ConfigError(PlopError, ValueError):
    """A training setting out of range: a ``ValueError`` for the API, a one-line error for the CLI."""


@dataclass
class TrainConfig:
    """Settings of a fine-tune; all of them land in the summary JSON.

    ``alpha`` defaults to ``2 * rank`` (32 at the default rank), as :meth:`Report.to_peft_config`
    does. ``loraplus_ratio``: LoRA+ learning-rate ratio of the B matrices to the A matrices (1:
    plain LoRA). ``steps`` or ``epochs`` bound the run (neither: one epoch). ``logging_steps``
    and ``save_steps`` below 1 are fractions of the run (the Trainer's convention), so short and
    long runs both get a readable loss curve and a few checkpoints. ``eval_steps``: also
    evaluate during training (the eval loss is always measured before and after).
    ``adapter_name``: ``"default"`` writes into ``output_dir``; any other name into
    ``output_dir/<name>/``, PEFT's own layout for several adapters on one base model.
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

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "grad_accum", "max_length", "save_total_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.alpha is None:
            self.alpha = 2 * self.rank
        checks = [
            (self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
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

    @property
    def run_dir(self) -> Path:
        return adapter_path(self.output_dir, self.adapter_name)


def adapter_path(directory: str | Path, name: str) -> Path:
    """Where adapter ``name`` lives under ``directory`` (the default at its root, as PEFT saves it)."""
    return Path(directory) if name == "default" else Path(directory) / name


@dataclass
class Targets:
    """Where the adapters go: a placement's name, PEFT ``target_modules`` and the types they cover."""

    placement: str
    target_modules: list[str] | str
    types: list[str]


@dataclass
class TrainResult:
    """What a fine-tune produced. ``adapter_path``: the folder with the adapter, its checkpoints and
    summary (``output_dir`` itself, or ``output_dir/<adapter_name>``). ``trainer``: the
    ``transformers.Trainer`` (its ``model`` the trained ``PeftModel``), for further evaluation."""

    summary: dict[str, Any]
    output_dir: Path
    adapter_path: Path
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    trainer: Any = field(repr=False)

    @property
    def model(self):
        return self.trainer.model


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was written; ``resume`` continues it."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"training interrupted at step {step}; {where} (continue with resume / --resume)")
        self.step, self.checkpoint = step, checkpoint


# -- where the adapters go ------------------------------------------------------------------------
def check_report_matches(report: Report, model: nn.Module) -> None:
    """Refuse a report diagnosed on another model: same architecture, and every diagnosed module
    is a linear module of this model with the same shape."""
    from .diagnose import _model_info

    here = _model_info(model, None)
    linear = {name: _shape(m) for name, m in find_linear_modules(model, include_head=True).items()}
    missing = [m.name for m in report.modules if linear.get(m.name) != (m.d_out, m.d_in)]
    if report.model.get("architecture") != here["architecture"] or missing:
        differ = ""
        if missing:
            differ = f"; {len(missing)} of its {len(report.modules)} modules differ here (e.g. {missing[0]})"
        raise PlopError(
            f"the report was made for another model: {report.model.get('id')} ({report.model.get('architecture')}), "
            f"not this {here['architecture']}{differ}",
            "diagnose this model first (plop diagnose MODEL)",
        )


def _shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, module.nx  # transformers' Conv1D


def resolve_targets(
    model: nn.Module,
    *,
    report: Report | None = None,
    target_modules: Sequence[str] | str | None = None,
    placement: str | None = None,
) -> Targets:
    """The adapters' targets: explicit ``target_modules``, a named ``placement`` (resolved on the
    report's modules, else on the model's linear modules), or the report's recommendation."""
    if target_modules is not None and placement is not None:
        raise ConfigError("give target_modules or placement, not both")
    if report is not None:
        check_report_matches(report, model)
    if target_modules is not None:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        names = list(find_linear_modules(model, include_head=True))
        return Targets("custom", targets, sorted({module_type(n) for n in _matching(names, targets)}))
    placement = placement or ("recommended" if report is not None else None)
    if placement is None:
        raise ConfigError("say where the adapters go: a report, target_modules or a placement")
    if placement not in PLACEMENT_CHOICES:
        raise ConfigError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENT_CHOICES)}")
    if placement == "recommended":
        if report is None:
            raise PlopError("placement 'recommended' needs a report", "run plop diagnose first, or pass --report")
        rec = report.recommendation
        return Targets("recommended", rec.target_modules, list(rec.types))
    if report is not None:
        types = placement_types(report.modules, placement)
    else:
        types = placement_types_for_names(list(find_linear_modules(model)), placement)
    if not types:
        raise PlopError(f"placement {placement!r} matches no module of this model",
                        f"its module types: {', '.join(sorted({module_type(n) for n in find_linear_modules(model)}))}")
    return Targets(placement, types, types)


def _matching(names: list[str], target_modules: list[str] | str) -> list[str]:
    """The names PEFT would adapt (its own matcher, so plop and PEFT never disagree)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=target_modules)
    matched = [n for n in names if check_target_module_exists(probe, n)]
    if not matched:
        raise PlopError(f"target modules {target_modules!r} match no linear module of this model",
                        f"its module types: {', '.join(sorted({module_type(n) for n in names}))}")
    return matched


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; that
    FutureWarning is nothing a plop user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


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
    progress: bool = True,
) -> TrainResult:
    """Fine-tune LoRA adapters on ``examples`` and save them in PEFT's format.

    The eval loss is measured on ``eval_examples`` when given (all of ``examples`` then train),
    else on a seeded ``config.eval_fraction`` split of ``examples``.

    Where they go: ``target_modules``, else ``placement`` (``recommended``, ``qv``,
    ``attention``, ``mlp``, ``all-linear``), else the ``report``'s recommendation. ``model`` is
    wrapped in place (``get_peft_model``); the trained ``PeftModel`` is ``result.model``.
    SIGINT/SIGTERM finish the current step, write a checkpoint and raise
    :class:`TrainingInterrupted`.
    """
    config = config or TrainConfig()
    targets = resolve_targets(model, report=report, target_modules=target_modules, placement=placement)
    return train_on_targets(model, tokenizer, examples, config, targets, report=report, model_id=model_id,
                            data_info=data_info, eval_examples=eval_examples, progress=progress)


def train_on_targets(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig,
    targets: Targets,
    *,
    report: Report | None = None,
    model_id: str | None = None,
    data_info: Mapping[str, Any] | None = None,
    eval_examples: Sequence[Example] | None = None,
    progress: bool = True,
) -> TrainResult:
    """:func:`train` once the targets are known (:mod:`plop.compare` builds its own)."""
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed

    from .diagnose import _model_info
    from .hf_trainer import LoraPlusTrainer, StopOnSignal, signals_stop

    run = check_output_dir(config)
    info = _model_info(model, model_id)
    if not _is_causal_lm(model):
        raise PlopError(f"training needs a causal language model (...ForCausalLM), not {info['architecture']}")
    train_set, eval_set = _datasets(examples, tokenizer, config, eval_examples)
    lora = _lora_config(model, config, targets, report)
    set_seed(config.seed)  # the LoRA A matrices are drawn now, before the Trainer seeds anything
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    if config.overwrite:
        _clear_previous_run(run)

    stop = StopOnSignal()
    trainer = LoraPlusTrainer(
        model=peft_model, args=_training_arguments(config, run, bool(eval_set), progress), train_dataset=train_set,
        eval_dataset=eval_set or None, data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[stop], loraplus_ratio=config.loraplus_ratio,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # without a bar the Trainer prints every log dict instead
    resume_from = last_checkpoint(run) if config.resume else None

    eval_before = _evaluate(trainer) if eval_set else None
    started = time.perf_counter()
    with signals_stop(stop):
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    if stop.signal is not None:
        raise TrainingInterrupted(trainer.state.global_step, last_checkpoint(run))
    eval_after = _evaluate(trainer) if eval_set else None
    trainer.save_model(str(run))

    steps = trainer.state.global_step - (int(resume_from.rsplit("-", 1)[1]) if resume_from else 0)
    summary = {
        "placement": targets.placement,
        "types": targets.types,
        "target_modules": targets.target_modules,
        "adapter_name": config.adapter_name,
        "rank": config.rank,
        "alpha": config.alpha,
        "loraplus_ratio": config.loraplus_ratio,
        "dora": config.dora,
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / steps, 4) if steps else None,  # of this session, when resumed
        "resumed_from": resume_from,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "loss_curve": [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
                       for h in trainer.state.log_history if "loss" in h],
        "eval_before": eval_before,
        "eval_after": eval_after,
        "model": info,
        "data": dict(data_info or {}),
        "config": asdict(config),
        "versions": _versions(),
    }
    if trainer.is_world_process_zero():
        (run / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return TrainResult(summary, Path(config.output_dir), run, eval_before, eval_after, trainer)


def _datasets(
    examples: Sequence[Example], tokenizer, config: TrainConfig, eval_examples: Sequence[Example] | None = None
) -> tuple[list[dict], list[dict]]:
    """Tokenized train and eval sets, saying how many examples had nothing left to learn."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parts = (examples, eval_examples) if eval_examples is not None else \
        split_examples(examples, config.eval_fraction, config.seed)
    train_set, eval_set = (tokenize_examples(part, tokenizer, config.max_length) for part in parts)
    if not train_set:
        raise PlopError("no example has a response token left to learn from",
                        "raise --max-length, or check the prompt/response fields")
    dropped = len(examples) + len(eval_examples or ()) - len(train_set) - len(eval_set)
    if dropped:
        warnings.warn(f"{dropped} example(s) have no response token within max_length={config.max_length} "
                      "and are left out", stacklevel=3)
    return train_set, eval_set


def _lora_config(model: nn.Module, config: TrainConfig, targets: Targets, report: Report | None):
    from peft import LoraConfig

    options = {"lora_dropout": config.dropout, "use_dora": config.dora, "task_type": "CAUSAL_LM"}
    if targets.placement == "recommended" and report is not None:
        return report.to_peft_config(r=config.rank, lora_alpha=config.alpha, **options)
    _matching(list(find_linear_modules(model, include_head=True)), targets.target_modules)
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets.target_modules, **options)


def _training_arguments(config: TrainConfig, run: Path, has_eval: bool, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr, max_steps=config.steps or -1, num_train_epochs=config.epochs or 1.0,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, eval_strategy="steps" if config.eval_steps and has_eval else "no",
        eval_steps=config.eval_steps, seed=config.seed, report_to="none", disable_tqdm=not progress,
        # the collator always yields labels; naming them keeps the eval loss for models whose
        # forward takes them through **kwargs, where the Trainer cannot see them
        label_names=["labels"], dataloader_pin_memory=torch.cuda.is_available(),
    )


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"plop": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers import AutoModelForCausalLM

    try:  # the class transformers maps this config to for causal LM (GPT-2's is ...LMHeadModel)
        return isinstance(model, AutoModelForCausalLM._model_mapping[type(model.config)])
    except (AttributeError, KeyError):
        return type(model).__name__.endswith("ForCausalLM")


def _evaluate(trainer) -> dict[str, float]:
    loss = float(trainer.evaluate()["eval_loss"])
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}

