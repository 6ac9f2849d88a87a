"""What plop can be asked for: :class:`ModelConfig` (which model, how loaded: sharded too) and
:class:`DiagnoseConfig` (how it is measured and what is recommended).

Each field carries its default, type, choices and help (PEFT's ``field(metadata={"help": ...})``
style): the command line is generated from them (:mod:`plop.cli.options`), so a new option is a
new field here and the code that uses it. Torch-free, so ``plop --help`` pays for no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError

STRATEGIES = ("top_k", "budget", "per_layer", "allocate")
ESTIMATORS = ("closed_form", "monte_carlo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
TOKEN_SCOPES = ("all", "prompt", "response")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")  # bitsandbytes, as QLoRA trains on the base
SIGNALS = ("nfn", "grad-sign", "nfn+grad-sign")  # what module types are ranked by (plop.ranking.ranker.signal_values)
STABLE_MIN_ROWS = 16  # until_stable never stops on fewer rows: the bootstrap needs rows to resample


def option(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A config field that documents itself. ``cli`` says what the command line needs beyond the
    field's type: ``flag`` (another name), ``metavar``, ``choices``, ``group``, ``exclusive`` (a
    mutually exclusive group's name), ``positional``, ``parse`` ("names": comma-separated,
    "positive": a whole number >= 1), ``value_into`` (a switch's optional value sets that field),
    ``cli=False`` (API only)."""
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


def check_budget(strategy: str, budget: int | None) -> None:
    """A budget is a positive parameter count, and the budget strategy needs one."""
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"budget must be a positive parameter budget, got {budget!r}")
    if strategy == "budget" and budget is None:
        raise ConfigError("the budget strategy needs a positive parameter budget")


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
                                "plop.model.sharding), not a whole copy; the report is the one-process report",
                         group="models bigger than one device")

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("quantize", self.quantize, QUANTIZATIONS)
        check_shard_options(self.shard, self.quantize, self.max_memory, self.offload_dir)


_RECOMMEND = "recommendation"
# the API's names of a strategy's parts (diagnose, lora_config), as Strategy.decode takes them
STRATEGY_ARGUMENTS = ("strategy", "top_k", "budget", "allocate_power", "per_layer", "allocate")


@dataclass(frozen=True)
class Strategy:
    """How the recommendation is chosen from the ranking: one value, read by :meth:`decode` from the
    command line's flags, the axolotl plugin's keys and the API's arguments alike.

    ``kind``: ``top_k``, the paper's ``top_k`` lowest-NFN types; ``budget``, the lowest-NFN types
    whose LoRA parameters at the rank fit ``budget``; ``per_layer``, single modules, ``top_k`` per
    layer on average (within ``budget`` if given); ``allocate``, a rank per type, larger where NFN
    is lower (rank ~ (min NFN / NFN)^``power``), under ``budget``: none spends what the top-k costs.
    """

    kind: Literal["top_k", "budget", "per_layer", "allocate"] = "top_k"
    top_k: int = 3
    budget: int | None = None
    power: float = 2.0

    def __post_init__(self) -> None:
        check_choice("strategy", self.kind, STRATEGIES)
        check_positive("top_k", self.top_k)
        check_budget(self.kind, self.budget)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not self.power > 0:
            raise ConfigError(f"allocate_power must be positive, got {self.power!r}")

    @classmethod
    def decode(cls, strategy: str | None = None, *, top_k: int | None = None, budget: int | None = None,
               allocate_power: float | None = None, per_layer: bool = False, allocate: bool = False) -> Strategy:
        """The one reading of a strategy as plop's front ends name it: its kind (the API's
        ``strategy=``), else the shorthands of the command line, the plugin and :func:`plop.lora_config`:
        ``allocate`` (ranks under ``budget``), ``per_layer``, or a ``budget`` alone; else the top-k."""
        implied = "allocate" if allocate else "per_layer" if per_layer else None
        if strategy is not None and implied not in (None, strategy):
            raise ConfigError(f"strategy {strategy!r} and {implied} are two strategies", "choose one")
        kind = strategy or implied or ("budget" if budget is not None else "top_k")
        return cls(kind, cls.top_k if top_k is None else top_k, budget,
                   cls.power if allocate_power is None else allocate_power)


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
    strategy: Strategy = option(Strategy(), "how the recommendation is chosen (the command line decodes it from "
                                            "--top-k, --budget, --per-layer and --allocate)", cli=False)
    signal: Literal["nfn", "grad-sign", "nfn+grad-sign"] = option(
        "nfn", "what ranks module types: NFN (lowest first), the sign consistency of rank-1 LoRA-B gradients "
               "over --grad-batches batches (highest first; plop.measure.grad_sign), or both",
        choices=SIGNALS, group=_RECOMMEND)
    reward: str | None = option(
        None, "grad-sign with --generate: the GRPO reward its advantages come from, MODULE:FUNCTION or "
              "FILE.py:FUNCTION, called as TRL calls it", metavar="MODULE:FUNCTION", group=_RECOMMEND)
    grad_batches: int = option(4, "grad-sign: mini-batches whose B-gradient signs must agree (k >= 2)", metavar="K",
                               group=_RECOMMEND, parse="positive")
    signal_weight: float = option(0.5, "nfn+grad-sign: grad-sign's weight in the combination (0: NFN alone, "
                                       "1: grad-sign alone)", metavar="W", group=_RECOMMEND)
    rank: int = option(16, "LoRA rank the costs are computed at", group=_RECOMMEND, parse="positive")
    exclude: list[str] | None = option(None, "module types or full module names never recommended, whatever the "
                                             "strategy (routers, gates, lm_head)", metavar="A,B", group=_RECOMMEND)
    n_bootstrap: int = option(200, "bootstrap resamples for the selection probabilities", cli=False)
    include_head: bool = option(False, "also diagnose the output head", group="measurement")
    weight_scores: bool = option(False, "also score every weight without data (KappaTune condition number, "
                                        "Spectrum SNR)", group="measurement")
    # set on the command line by ModelConfig's --shard, which also loads only each process's shards
    shard: bool = option(False, "measure on weights split across the processes (FSDP2, plop.model.sharding); a "
                                "model not sharded yet is sharded in place", cli=False)

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "rank", "n_bootstrap"):
            check_positive(name, getattr(self, name))
        check_positive("batch_tokens", self.batch_tokens, optional=True)
        check_positive("generate", self.generate, optional=True)
        check_positive("max_new_tokens", self.max_new_tokens)
        if self.generate and self.until_stable:
            raise ConfigError("generate with until_stable: the completions of every sampled prompt are generated "
                              "before the pass, so stopping early would waste them", "drop --until-stable")
        check_positive("samples", self.samples, optional=True)
        if not isinstance(self.strategy, Strategy):
            raise ConfigError(f"strategy must be a Strategy, not {self.strategy!r}",
                              "Strategy('allocate', top_k=2), or diagnose(..., strategy='allocate', top_k=2)")
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("tokens", self.tokens, TOKEN_SCOPES)
        if self.exclude is not None and not all(isinstance(x, str) and x for x in self.exclude):
            raise ConfigError(f"exclude must be a list of module types or names, got {self.exclude!r}")
        if self.shard and self.weight_scores:
            raise ConfigError("weight_scores with shard: the scores need one SVD of each whole weight, which no "
                              "process holds", "score the weights without sharding")
        self._check_signal()

    def _check_signal(self) -> None:
        check_choice("signal", self.signal, SIGNALS)
        if not isinstance(self.grad_batches, int) or isinstance(self.grad_batches, bool) or self.grad_batches < 2:
            raise ConfigError(f"grad_batches must be a whole number >= 2 (signs agree across batches), "
                              f"got {self.grad_batches!r}")
        weight = self.signal_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ConfigError(f"signal_weight must be a number in [0, 1], got {weight!r}")
        if self.reward is not None and (self.signal == "nfn" or not self.generate):
            raise ConfigError("reward is read only by a grad-sign signal with generate (GRPO's advantages)",
                              "add --signal grad-sign --generate K, or drop --reward")
        if self.signal == "nfn":
            return
        if self.generate is not None and self.generate < 2:
            raise ConfigError(f"signal {self.signal!r} with generate {self.generate}: GRPO's advantages compare the "
                              "completions of one prompt", "generate at least 2 per prompt")
        if self.generate and self.reward is None:
            raise ConfigError(f"signal {self.signal!r} with generate takes the GRPO objective, which needs a reward",
                              "give --reward MODULE:FUNCTION (TRL's reward signature)")
        if self.until_stable or self.shard:
            raise ConfigError(f"signal {self.signal!r} with {'until_stable' if self.until_stable else 'shard'}: the "
                              "gradients are taken once, on whole weights, after the pass", "use --signal nfn")

    def stops(self, seen: int) -> bool:
        """Whether a stable recommendation after ``seen`` rows ends the pass: the until_stable policy."""
        return self.until_stable and seen >= STABLE_MIN_ROWS

    def with_overrides(self, **overrides: Any) -> DiagnoseConfig:
        """This config with ``overrides``: its fields, and a strategy as the API names it, whole
        (``strategy=Strategy(...)``) or by its parts (:meth:`Strategy.decode`'s arguments), which
        replace those of this config's strategy; its kind stays, unless it is the plain top-k, so that
        a budget alone asks for the budget strategy as it does on the command line."""
        parts = {k: overrides.pop(k) for k in STRATEGY_ARGUMENTS if k in overrides}
        if not parts:
            return replace(self, **overrides)
        strategy = parts["strategy"] if isinstance(parts.get("strategy"), Strategy) else None
        if strategy is not None and len(parts) > 1:
            raise ConfigError("give the strategy as a Strategy or by its parts, not both")
        if strategy is None:
            own = self.strategy
            strategy = Strategy.decode(**{"strategy": None if own.kind == "top_k" else own.kind, "top_k": own.top_k,
                                          "budget": own.budget, "allocate_power": own.power, **parts})
        return replace(self, **overrides, strategy=strategy)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DiagnoseConfig:
        """The config a report's ``settings`` record, as any plop version wrote them
        (:func:`recorded_settings`); settings this plop does not know are left out."""
        values = _known(cls, recorded_settings(settings))
        if isinstance(values.get("strategy"), Mapping):
            values["strategy"] = Strategy(**_known(Strategy, values["strategy"]))
        return cls(**values)


@dataclass
class StrategyFlags:
    """The command line's words for a :class:`Strategy`, one exclusive choice, read by
    :meth:`Strategy.decode` as the axolotl plugin's keys and the API's arguments are."""

    top_k: int = option(Strategy.top_k, "the k lowest-NFN types", group=_RECOMMEND, exclusive="strategy",
                        parse="positive")
    budget: int | None = option(None, "trainable LoRA parameters at --rank: the lowest-NFN types that fit",
                                group=_RECOMMEND, exclusive="strategy", parse="positive")
    per_layer: bool = option(False, "pick individual modules (k per layer on average) instead of whole types",
                             group=_RECOMMEND, exclusive="strategy")
    allocate: bool = option(
        False, "a LoRA rank per type, larger where NFN is lower, under BUDGET parameters (default: what the top-k "
               "placement costs at --rank); PEFT rank_pattern", metavar="BUDGET", group=_RECOMMEND,
        exclusive="strategy", value_into="budget", parse="positive")

    def strategy(self) -> Strategy:
        return Strategy.decode(top_k=self.top_k, budget=self.budget, per_layer=self.per_layer, allocate=self.allocate)


def recorded_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A report's recorded diagnosis settings in today's fields. Before ``until_stable``,
    ``samples="auto"`` asked for it, with no limit on the rows given; before :class:`Strategy`, its
    parts stood beside the rest (``strategy`` its kind, ``top_k``, ``budget``, ``allocate_power``)."""
    out = dict(settings)
    if out.get("samples") == "auto":
        out.update(samples=None, until_stable=True)
    if isinstance(out.get("strategy"), str):
        out["strategy"] = {"kind": out.pop("strategy"), "top_k": out.pop("top_k", Strategy.top_k),
                           "budget": out.pop("budget", None), "power": out.pop("allocate_power", Strategy.power)}
    return out


def _known(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` less the keys that are no field of ``cls`` (fields a later plop may add)."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in known}
