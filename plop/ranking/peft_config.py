"""PEFT's task type for a report's model, read off its architecture name (the ``LoraConfig``
itself comes from :func:`plop.placement.lora_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
