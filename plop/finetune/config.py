"""What a fine-tune can be asked for: :class:`TrainConfig`, and where a run's files go.

Torch-free, so the CLI reads its defaults from here without paying for torch.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..config import option
from ..errors import ConfigError
from ..ranking.placements import COMPARE_DEFAULT, COMPARE_PLACEMENTS
from ..placement import LoraSettings

SUMMARY_FILE = "plop_train_summary.json"
REPORT_FILE = "plop_report.json"  # the diagnosis a run made for itself (train, axolotl plugin), reused on resume
REPORT_TO = ("none", "tensorboard", "wandb")  # passed to the Trainer; the package must be installed
_LORA = "fine-tuning"
METHODS = ("sft", "grpo")
# plop's names -> transformers' SchedulerType values
LR_SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup"}
_RL = "reinforcement learning (--method grpo)"


def _old_lora_keywords(cls: type) -> type:
    """``cls`` also taking the LoRA keywords it had before :class:`LoraSettings` held them
    (``TrainConfig(rank=8, dora=True)``, ``replace(config, rank=4)``): they go into ``lora``, with
    a FutureWarning. Kept for one release."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        old = {k: kwargs.pop(k) for k in [k for k in kwargs if k in _OLD_LORA_KEYWORDS]}
        if old:
            new = ", ".join(f"{_OLD_LORA_KEYWORDS[k]}=" for k in old)
            warnings.warn(f"{cls.__name__}({', '.join(f'{k}=' for k in old)}...) is deprecated and goes in the next "
                          f"release: give lora=LoraSettings({new}...), or replace(config, lora=replace(config.lora, "
                          f"{new}...))", FutureWarning, stacklevel=2)
            lora = kwargs.get("lora", _TRAIN_LORA)
            kwargs["lora"] = replace(lora, **{_OLD_LORA_KEYWORDS[k]: v for k, v in old.items()})
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# TrainConfig's keywords before ``lora``, and the LoraSettings fields they now set
_OLD_LORA_KEYWORDS = {"rank": "r", "alpha": "alpha", "dropout": "dropout", "dora": "use_dora",
                      "loraplus_ratio": "loraplus_ratio"}
_TRAIN_LORA = LoraSettings(loraplus_ratio=16.0)  # a fine-tune's LoRA settings unless told: LoRA+ on


@_old_lora_keywords
@dataclass
class TrainConfig:
    """Settings of a fine-tune; all of them land in the summary JSON. ``lora`` holds the adapters'
    settings (rank, alpha, dropout, DoRA, rsLoRA, the LoRA+ ratio: ``--rank``, ``--alpha``...);
    ``TrainConfig(rank=8)`` and ``replace(config, rank=8)`` still set them there, with a
    FutureWarning, until the next release. ``steps`` or ``epochs`` bound the run (neither: one
    epoch); ``logging_steps`` and ``save_steps`` below 1 are fractions of the run (the Trainer's
    convention), so short and long runs both get a readable loss curve and a few checkpoints;
    ``adapter_name`` other than ``"default"`` writes into ``output_dir/<name>/``, PEFT's layout for
    several adapters on one base.
    """

    method: Literal["sft", "grpo"] = option(
        "sft", "sft: learn the data's responses; grpo: TRL's GRPO on the data's prompts, scored by --reward",
        choices=METHODS, group=_LORA)
    reward: str | Callable[..., list[float]] | None = option(
        None, "the GRPO reward, MODULE:FUNCTION (a module importable from here, or a .py file): TRL's signature "
              "f(completions, **kwargs) -> list[float], the data's other fields as keyword lists",
        metavar="MODULE:FUNCTION", group=_RL)
    num_generations: int = option(8, "completions sampled per prompt; --batch-size x --grad-accum must be a "
                                     "multiple of it", group=_RL, parse="positive")
    max_new_tokens: int = option(128, "longest completion sampled or scored", group=_RL, parse="positive")
    lora: LoraSettings = option(_TRAIN_LORA, "the adapters' LoRA settings (LoRA+ on)")
    lr: float = option(2e-4, "learning rate (of the A matrices under LoRA+)", group=_LORA)
    lr_schedule: str = option("linear", "the learning rate over the run: linear decay to 0 (the Trainer's), or "
                                        "constant after the warm-up (a comparison's steps stay comparable)",
                              choices=LR_SCHEDULES, group=_LORA)
    warmup_steps: int = option(0, "steps the learning rate rises linearly over (transformers' rule: the first of "
                                  "them at a rate of 0)", group=_LORA)
    steps: int | None = option(None, "optimizer steps (default: one epoch)", group=_LORA, parse="positive")
    epochs: float | None = option(None, "epochs, instead of --steps", group=_LORA)
    batch_size: int = option(8, "rows per batch", group="data", parse="positive")
    grad_accum: int = option(1, "batches per optimizer step", group=_LORA, parse="positive")
    max_length: int = option(256, "tokens per sample", group="data", parse="positive")
    eval_fraction: float = option(0.1, "share of the data held out for the eval loss", group=_LORA)
    seed: int = option(0, "seed of the row sampling, the split and the training", group="data")
    output_dir: str = option("plop-adapter", "adapter, checkpoints and plop_train_summary.json", group="output")
    resume: bool = option(False, "continue from the last checkpoint in the output dir", group="output",
                          exclusive="again")
    overwrite: bool = option(False, "replace a previous run in the output dir", group="output", exclusive="again")
    adapter_name: str = option("default", "a named adapter goes to OUTPUT_DIR/NAME/", group="output")
    logging_steps: float = option(0.02, "log every N steps (below 1: that fraction of the run)", cli=False)
    save_steps: float = option(0.25, "checkpoint every N steps (below 1: that fraction of the run)", cli=False)
    save_total_limit: int = option(2, "checkpoints kept", cli=False)
    eval_steps: int | None = option(None, "also evaluate every N steps", cli=False)
    step_size_steps: int | None = option(None, "after N steps, measure how far the model moved from its base on the "
                                               "held-out set (into the summary's step_size)", group=_LORA,
                                         parse="positive")
    report_to: str = option("none", "where the Trainer logs; tensorboard also gets the placement and NFN heatmap "
                                    "at step 0", choices=REPORT_TO, group=_LORA)

    def __post_init__(self) -> None:
        if not isinstance(self.lora, LoraSettings):
            raise ConfigError(f"lora must be a LoraSettings, not {type(self.lora).__name__}")
        for name in ("batch_size", "grad_accum", "max_length", "save_total_limit", "num_generations",
                     "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        checks = [
            (0 < self.lr <= 1, f"lr must be in (0, 1], got {self.lr}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.steps is None or self.epochs is None, "give steps or epochs, not both"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (not (self.resume and self.overwrite), "resume and overwrite exclude each other"),
            (self.logging_steps > 0 and self.save_steps > 0, "logging_steps and save_steps must be positive"),
            (self.eval_steps is None or self.eval_steps >= 1, f"eval_steps must be >= 1, got {self.eval_steps}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                                               f"not {self.lr_schedule!r}"),
            (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
             f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}"),
            (self.step_size_steps is None or self.step_size_steps >= 1,
             f"step_size_steps must be >= 1, got {self.step_size_steps}"),
            (bool(self.adapter_name) and "/" not in self.adapter_name and self.adapter_name not in (".", ".."),
             f"adapter_name must be a plain name, got {self.adapter_name!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._check_method()
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}, not {self.report_to!r}")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to={self.report_to} needs the {self.report_to} package",
                              f"pip install {self.report_to}")

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.method == "sft":
            if self.reward is not None:
                raise ConfigError("a reward is for --method grpo", "add --method grpo, or drop --reward")
            return
        if self.reward is None:
            raise ConfigError("--method grpo needs a reward", "give --reward MODULE:FUNCTION")
        if not (callable(self.reward) or isinstance(self.reward, str)):
            raise ConfigError(f"reward must be MODULE:FUNCTION or a function, not {type(self.reward).__name__}")
        if self.num_generations < 2:  # GRPO's advantage is a reward against its group's mean
            raise ConfigError(f"num_generations must be >= 2, got {self.num_generations}")
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ConfigError(f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                              f"num_generations ({self.num_generations})",
                              "each step scores whole groups of completions of one prompt")

    def record(self) -> dict[str, Any]:
        """The settings as JSON can hold them, flat: the LoRA settings under their
        :class:`~plop.placement.LoraSettings` names (``r``, ``alpha``, ``dropout``, ``use_dora``,
        ``use_rslora``, ``loraplus_ratio``) beside the others, a reward function by its ``module:name``."""
        record = asdict(self)
        return {**record.pop("lora"), **record, "reward": reward_name(self.reward)}

    @property
    def run_dir(self) -> Path:
        return adapter_path(self.output_dir, self.adapter_name)


def adapter_path(directory: str | Path, name: str) -> Path:
    """Where adapter ``name`` lives under ``directory`` (the default at its root, as PEFT saves it)."""
    return Path(directory) if name == "default" else Path(directory) / name


def reward_name(reward: str | Callable | None) -> str | None:
    """``module:qualname`` of a reward function (a MODULE:FUNCTION string as given)."""
    if reward is None or isinstance(reward, str):
        return reward
    return f"{getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', repr(reward))}"


_HOW = "comparison"


@dataclass(frozen=True)
class CompareConfig:
    """How placements are compared (:func:`compare`'s protocol; ``plop compare``'s options)."""

    placements: tuple[str, ...] | None = option(
        None, f"from {', '.join(COMPARE_PLACEMENTS)} (default: {', '.join(COMPARE_DEFAULT)}), or a named set "
              "of types: vod=v_proj+o_proj+down_proj", group=_HOW)
    seeds: tuple[int, ...] = option((0,), "one reported run per placement and seed", group=_HOW)
    lr_grid: tuple[float, ...] | None = option(
        None, "multipliers of --lr each placement is tried at on a validation split; each is then reported at "
              "its best learning rate", group=_HOW)
    select_seeds: tuple[int, ...] = option((100, 101), "seeds of the learning-rate choice's runs", group=_HOW)
    validation_fraction: float = option(0.2, "share of the training rows the learning rate is chosen on (never "
                                             "the held-out rows)", group=_HOW)

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.lr_grid is not None and (not self.lr_grid or min(self.lr_grid) <= 0):
            raise ConfigError(f"lr_grid takes positive multipliers of the learning rate, got {self.lr_grid}")
        if not self.seeds or not self.select_seeds:
            raise ConfigError("give at least one seed (and one learning-rate choice seed)")
