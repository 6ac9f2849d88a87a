"""A recommendation as a ``peft.LoraConfig``: its targets, the rank/alpha patterns of an allocation,
what PEFT's adapters on 3-D expert weights allow, and the task type read off the architecture.

Every ``LoraConfig`` plop builds (``Report.to_peft_config``, ``plop train``) and the PEFT export's
``adapter_config.json`` come from here. ``peft`` is imported only when a config object is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import default_alpha
from ..errors import ConfigError

# architecture-name suffixes and PEFT's task types, first match wins (see task_type)
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
          ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


def task_type(model: Mapping[str, Any]) -> str | None:
    """PEFT's task type for a report's ``model`` record, read off the architecture name
    (``...ForCausalLM`` -> CAUSAL_LM; ``...ForConditionalGeneration`` is SEQ_2_SEQ_LM for
    encoder-decoders only)."""
    arch = model.get("architecture", "")
    if arch.endswith("ForConditionalGeneration") and model.get("encoder_decoder") is False:
        return "CAUSAL_LM"  # a vision-language model's language model generates the text
    if arch.endswith("LMHeadModel") and not arch.endswith("WithLMHeadModel"):  # GPT2LMHeadModel & co.
        return "CAUSAL_LM"
    return next((task for suffix, task in _TASKS if arch.endswith(suffix)), None)


def rank_patterns(ranks: Mapping[str, int], r: int, lora_alpha: float) -> dict[str, dict[str, float]]:
    """PEFT's ``rank_pattern`` for a rank per type, and the ``alpha_pattern`` that keeps each
    type's ``alpha / rank`` at ``lora_alpha / r``."""
    return {"rank_pattern": dict(ranks), "alpha_pattern": {t: rank * lora_alpha / r for t, rank in ranks.items()}}


def lora_config_kwargs(*, target_parameters: list[str] | None = None, **kwargs) -> dict[str, Any]:
    """``peft.LoraConfig`` keyword arguments made safe for 3-D expert weights, without importing
    PEFT: its adapters on ``target_parameters`` take no dropout and no DoRA, so the dropout is set
    to 0 there and DoRA is refused with a ConfigError rather than deep inside PEFT."""
    if target_parameters:
        if kwargs.get("use_dora"):
            raise ConfigError("DoRA cannot adapt MoE expert weights (PEFT target_parameters)",
                              "train without --dora, or choose targets without the experts")
        kwargs["lora_dropout"] = 0.0
    return {"target_parameters": target_parameters, **kwargs}


def peft_lora_config(**kwargs):
    """``peft.LoraConfig`` on :func:`lora_config_kwargs`."""
    from peft import LoraConfig

    return LoraConfig(**lora_config_kwargs(**kwargs))


def report_lora_kwargs(report: Any, r: int | None = None, lora_alpha: float | None = None, **kwargs) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments of ``report``'s recommended ``target_modules`` and
    ``target_parameters`` (no PEFT import: the PEFT export writes them as JSON).

    ``r`` defaults to the rank the report was costed at, ``lora_alpha`` to :func:`default_alpha`;
    an ``allocate`` recommendation also sets ``rank_pattern`` (its rank per type) and
    ``alpha_pattern`` (each type's rank times ``lora_alpha / r``).
    """
    rec = report.recommendation
    r = r or rec.rank
    lora_alpha = lora_alpha or default_alpha(r)
    kwargs.setdefault("task_type", task_type(report.model))
    kwargs.setdefault("target_parameters", rec.target_parameters)
    if rec.rank_pattern:  # allocate: every chosen type has its own rank, alpha / rank as asked
        for key, pattern in rank_patterns(rec.rank_pattern, r, lora_alpha).items():
            kwargs.setdefault(key, pattern)
    return lora_config_kwargs(r=r, lora_alpha=lora_alpha, target_modules=rec.target_modules, **kwargs)


def report_lora_config(report: Any, r: int | None = None, lora_alpha: float | None = None, **kwargs):
    """A ``peft.LoraConfig`` on :func:`report_lora_kwargs`."""
    from peft import LoraConfig

    return LoraConfig(**report_lora_kwargs(report, r, lora_alpha, **kwargs))
