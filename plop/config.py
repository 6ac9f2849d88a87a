"""What plop can be asked for: :class:`ModelConfig` (which model, how loaded: sharded too) and
:class:`DiagnoseConfig` (how it is measured and what is recommended).

Each field carries its default, type, choices and help (PEFT's ``field(metadata={"help": ...})``
style): the command line is generated from them (:mod:`plop.cli.options`), so a new option is a
new field here and the code that uses it. Torch-free, so ``plop --help`` pays for no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

STRATEGIES = ("top_k", "budget", "per_layer", "allocate")
ESTIMATORS = ("closed_form", "monte_carlo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
TOKEN_SCOPES = ("all", "prompt", "response")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")  # bitsandbytes, as QLoRA trains on the base
STABLE_MIN_ROWS = 16  # until_stable never stops on fewer rows: the bootstrap needs rows to resample


def option(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A config field that documents itself. ``cli`` says what the command line needs beyond the
    field's type: ``flag`` (another name), ``metavar``, ``choices``, ``group``, ``exclusive`` (a
    mutually exclusive group's name), ``positional``, ``parse`` ("names": comma-separated,
    "positive": a whole number >= 1), ``cli=False`` (API only)."""
    return field(default=default, metadata={"help": help, **cli})


def names(text: str) -> list[str]:
    """``a,b, c`` -> ``["a", "b", "c"]``: a list as the command line writes it."""
    return [v.strip() for v in text.split(",") if v.strip()]


def targets(text: str) -> list[str] | str:
    """``target_modules`` written as text: ``a,b`` are names that PEFT matches whole or as suffixes;
    one value with regex characters, or PEFT's ``all-linear``, stays one string, as PEFT takes a
    string (a regex it full-matches against every module name)."""
    return text if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\") else names(text)


def default_alpha(rank: float) -> float:
    """``lora_alpha`` when none is given: twice the rank, the LoRA+ paper's and PEFT examples' choice,
    so that ``alpha / rank`` stays 2 whatever the rank."""
    return 2 * rank


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def check_positive(name: str, value: object, optional: bool = False) -> None:
    """A whole number >= 1 (``None`` too where ``optional``); bools are not numbers here."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_shard_options(shard: bool, quantize: str, max_memory, offload_dir) -> None:
    """Refuse the loading options that do not combine with sharding, before the slow part."""
    if shard and (quantize != "none" or max_memory is not None or offload_dir is not None):
        raise ConfigError("--shard combines with neither --quantize (FSDP2 shards float weights, not bitsandbytes' "
                          "packed ones) nor --max-memory/--offload-dir (another way to fit the model)")


@dataclass
class ModelConfig:
    """Which model to diagnose or train, and how it is loaded (:func:`plop.load_model`)."""

    model: str | None = option(None, "hub id, local model directory or .gguf file (default: the embedded "
                                     "SmolLM2-135M-Instruct)", positional=True)
    dtype: str = option("auto", "weights' dtype", choices=DTYPES)
    device: str = option("auto", "where the model runs ('auto': the GPUs when there are some)", choices=DEVICES)
    quantize: str = option("none", "load the base as QLoRA trains it: bitsandbytes 8-bit, or 4-bit NF4 (CPU or GPU)",
                           choices=QUANTIZATIONS)
    trust_remote_code: bool = option(False, "run the model repository's own code")
    max_memory: str | None = option(None, 'weights each GPU and the CPU may hold, e.g. "2GiB"; the rest stays on '
                                          "disk", metavar="SIZE", group="models bigger than memory (one process)")
    offload_dir: str | None = option(None, "where weights that do not fit go (safetensors checkpoints are read in "
                                           "place without it)", metavar="DIR",
                                     group="models bigger than memory (one process)")
    shard: bool = option(False, "under torchrun/accelerate launch: each process holds 1/N of the weights (FSDP2, "
                                "plop.measure.sharded), not a whole copy; the report is the one-process report",
                         group="models bigger than one device")

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("quantize", self.quantize, QUANTIZATIONS)
        check_shard_options(self.shard, self.quantize, self.max_memory, self.offload_dir)


_RECOMMEND = "recommendation"


@dataclass
class DiagnoseConfig:
    """Settings of a diagnosis; all of them are recorded in the report, and all are checked here,
    before any model is touched."""

    samples: int | None = option(100, "rows to sample (API: None for all the rows given)", group="data",
                                 parse="positive")
    until_stable: bool = option(False, "read the rows in windows of 16, 16, 32, 64, ... and stop at the first after "
                                       "which the bootstrap calls the recommendation stable: --samples is then the "
                                       "most rows read", group="data")
    max_length: int = option(256, "tokens per sample", group="data", parse="positive")
    batch_size: int = option(8, "rows per batch (with --max-length, the default token budget of a batch)",
                             group="data", parse="positive")
    batch_tokens: int | None = option(
        None, "tokens per batch: rows are batched by length, rows x longest <= N (default: --batch-size x "
              "--max-length, more on a GPU with memory to spare)", metavar="N", group="measurement", parse="positive")
    tokens: Literal["all", "prompt", "response"] = option(
        "all", "which tokens of prompt/response data to score (the model reads them all); 'response': what "
               "supervised fine-tuning trains on", choices=TOKEN_SCOPES, group="measurement")
    seed: int = option(0, "seed of the row sampling and the bootstrap (and of --generate's sampling)", group="data")
    generate: int | None = option(
        None, "score K completions per prompt sampled from the model itself (its generation settings), not the "
              "data's responses: the tokens RL trains on", metavar="K", group="measurement", parse="positive")
    max_new_tokens: int = option(128, "longest completion --generate samples", group="measurement", parse="positive")
    estimator: Literal["closed_form", "monte_carlo"] = option(
        "closed_form", "NFN's denominator: the exact ||W||_F / sqrt(d_in), or the paper's Monte-Carlo estimate",
        choices=ESTIMATORS, group="measurement")
    strategy: Literal["top_k", "budget", "per_layer", "allocate"] = option(
        "top_k", "how the recommendation is chosen (the command line decodes it from --top-k, --budget, "
                 "--per-layer and --allocate)", choices=STRATEGIES, cli=False)
    top_k: int = option(3, "the k lowest-NFN types", group=_RECOMMEND, exclusive="strategy", parse="positive")
    budget: int | None = option(None, "trainable LoRA parameters at --rank: the lowest-NFN types that fit",
                                group=_RECOMMEND, exclusive="strategy", parse="positive")
    rank: int = option(16, "LoRA rank the costs are computed at", group=_RECOMMEND, parse="positive")
    exclude: list[str] | None = option(None, "module types or full module names never recommended, whatever the "
                                             "strategy (routers, gates, lm_head)", metavar="A,B", group=_RECOMMEND)
    allocate_power: float = option(2.0, "allocate's exponent: rank ~ (min NFN / NFN)^power", cli=False)
    n_bootstrap: int = option(200, "bootstrap resamples for the selection probabilities", cli=False)
    include_head: bool = option(False, "also diagnose the output head", group="measurement")
    weight_scores: bool = option(False, "also score every weight without data (KappaTune condition number, "
                                        "Spectrum SNR)", group="measurement")
    # set on the command line by ModelConfig's --shard, which also loads only each process's shards
    shard: bool = option(False, "measure on weights split across the processes (FSDP2, plop.measure.sharded); a "
                                "model not sharded yet is sharded in place", cli=False)

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "top_k", "rank", "n_bootstrap"):
            check_positive(name, getattr(self, name))
        check_positive("batch_tokens", self.batch_tokens, optional=True)
        check_positive("generate", self.generate, optional=True)
        check_positive("max_new_tokens", self.max_new_tokens)
        if self.generate and self.until_stable:
            raise ConfigError("generate with until_stable: the completions of every sampled prompt are generated "
                              "before the pass, so stopping early would waste them", "drop --until-stable")
        check_positive("samples", self.samples, optional=True)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("tokens", self.tokens, TOKEN_SCOPES)
        check_budget(self.strategy, self.budget)
        if self.exclude is not None and not all(isinstance(x, str) and x for x in self.exclude):
            raise ConfigError(f"exclude must be a list of module types or names, got {self.exclude!r}")
        if not self.allocate_power > 0:
            raise ConfigError(f"allocate_power must be positive, got {self.allocate_power!r}")
        if self.shard and self.weight_scores:
            raise ConfigError("weight_scores with shard: the scores need one SVD of each whole weight, which no "
                              "process holds", "score the weights without sharding")

    def stops(self, seen: int) -> bool:
        """Whether a stable recommendation after ``seen`` rows ends the pass: the until_stable policy."""
        return self.until_stable and seen >= STABLE_MIN_ROWS


@dataclass
class StrategyFlags:
    """The command line's shorthands for a strategy, decoded into :class:`DiagnoseConfig`'s
    ``strategy`` and ``budget`` (the API sets those directly)."""

    per_layer: bool = option(False, "pick individual modules (k per layer on average) instead of whole types",
                             group=_RECOMMEND, exclusive="strategy")
    allocate: int | None = option(
        None, "a LoRA rank per type, larger where NFN is lower, under BUDGET parameters (default: what the top-k "
              "placement costs at --rank); PEFT rank_pattern", metavar="BUDGET", group=_RECOMMEND,
        exclusive="strategy", optional_value=0, parse="positive")

    def apply(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (DiagnoseConfig fields) with the strategy these flags and ``budget`` ask for."""
        if self.allocate is not None:  # --allocate alone (0): spend what the top-k costs
            return {**values, "strategy": "allocate", "budget": self.allocate or None}
        if values.get("budget") is not None:
            return {**values, "strategy": "budget"}
        return {**values, "strategy": "per_layer"} if self.per_layer else values


def recorded_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A report's recorded diagnosis settings in today's fields. Before ``until_stable``,
    ``samples="auto"`` asked for it, with no limit on the rows given."""
    if settings.get("samples") == "auto":
        return {**settings, "samples": None, "until_stable": True}
    return dict(settings)


def check_budget(strategy: str, budget: int | None) -> None:
    """A budget is a positive parameter count, and the budget strategy needs one."""
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"budget must be a positive parameter budget, got {budget!r}")
    if strategy == "budget" and budget is None:
        raise ConfigError("the budget strategy needs a positive parameter budget")
