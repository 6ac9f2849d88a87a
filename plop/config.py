"""What a diagnosis can be asked for: :class:`DiagnoseConfig` and the choices it accepts.

Torch-free, so the CLI reads its defaults and choices from here without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

STRATEGIES = ("top_k", "budget", "per_layer", "allocate")
ESTIMATORS = ("closed_form", "monte_carlo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
TOKEN_SCOPES = ("all", "prompt", "response")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")  # bitsandbytes, as QLoRA trains on the base
AUTO_MIN_SAMPLES = 16  # samples="auto" never stops on fewer: the bootstrap needs some rows to resample


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class DiagnoseConfig:
    """Settings of a diagnosis; all of them are recorded in the report, and all are checked here,
    before any model is touched.

    ``samples``: how many rows to use (``None``: all; ``"auto"``: stop as soon as the bootstrap
    says the recommendation is stable, after at least 16). ``batch_tokens``: texts are batched
    by length, ``rows x longest row <= batch_tokens`` (``None``: ``batch_size x max_length``,
    or more on a GPU with memory to spare; see :mod:`plop.batching`). ``tokens``: which tokens of
    prompt/response examples a decoder-only model is scored on (``"response"``: what supervised
    fine-tuning trains on; the model always reads the whole example). ``estimator``: ``"closed_form"``
    (exact ``||W||_F / sqrt(d_in)`` denominator, no extra compute) or ``"monte_carlo"``.
    ``strategy``: ``"top_k"``, ``"budget"`` (needs ``budget``, trainable parameters at
    ``rank``), ``"per_layer"``, or ``"allocate"`` (a rank per type, growing as its NFN falls,
    ``rank ∝ (min NFN / NFN)^allocate_power``, under ``budget``; without one, under what the
    ``top_k`` recommendation costs at ``rank``). ``weight_scores``: also compute KappaTune's condition
    number and Spectrum's SNR of every weight (data-free; one SVD per matrix), to show where they
    disagree with NFN.
    """

    samples: int | Literal["auto"] | None = None
    max_length: int = 256
    batch_size: int = 8
    batch_tokens: int | None = None
    tokens: Literal["all", "prompt", "response"] = "all"
    seed: int = 0
    estimator: Literal["closed_form", "monte_carlo"] = "closed_form"
    strategy: Literal["top_k", "budget", "per_layer", "allocate"] = "top_k"
    top_k: int = 3
    budget: int | None = None
    rank: int = 16
    allocate_power: float = 2.0
    n_bootstrap: int = 200
    include_head: bool = False
    weight_scores: bool = False
    # shard: under torchrun / accelerate launch, each process holds 1/N of the weights (FSDP2, plop.sharded)
    # instead of a whole copy; the report is the one-process report
    shard: bool = False

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "top_k", "rank", "n_bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_tokens is not None and (
            not isinstance(self.batch_tokens, int) or isinstance(self.batch_tokens, bool) or self.batch_tokens < 1
        ):
            raise ConfigError(f"batch_tokens must be a positive integer, got {self.batch_tokens!r}")
        if self.samples is not None and self.samples != "auto" and (
            not isinstance(self.samples, int) or self.samples < 1
        ):
            raise ConfigError(f"samples must be a positive integer or 'auto', got {self.samples!r}")
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("tokens", self.tokens, TOKEN_SCOPES)
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(f"budget must be a positive number of parameters, got {self.budget!r}")
        if not self.allocate_power > 0:
            raise ConfigError(f"allocate_power must be positive, got {self.allocate_power!r}")
        if self.shard and self.weight_scores:
            raise ConfigError("weight_scores with shard: the scores need one SVD of each whole weight, which no "
                              "process holds", "score the weights without sharding")
        if self.strategy == "budget" and self.budget is None:
            raise ConfigError("the budget strategy needs a positive parameter budget")
