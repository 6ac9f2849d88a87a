"""What a fine-tune changed, where: NFN re-measured on the same rows, adapted against frozen.

The frozen model is the PEFT model with its adapters disabled; the adapted one is a merged copy
(``W + (alpha/r)·B·A`` in place of ``W``), so the trained model itself is never touched. Types
that carry no adapter change only through what flows into them from adapted layers below.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..config import DiagnoseConfig
from ..diagnosis import diagnose


def nfn_change(peft_model, texts: Sequence[str], tokenizer, *, max_length: int, batch_size: int,
               adapted_types: Sequence[str]) -> dict[str, dict]:
    """Per module type: mean NFN of the frozen and the adapted model on ``texts``, the change,
    and whether the type carries an adapter."""
    config = DiagnoseConfig(samples=None, max_length=max_length, batch_size=batch_size, n_bootstrap=1)  # every text
    with peft_model.disable_adapter():
        frozen = diagnose(peft_model.get_base_model(), list(texts), tokenizer, config)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    adapted = {t.type: t.nfn_mean for t in diagnose(merged, list(texts), tokenizer, config).types}
    return {t.type: {"frozen": t.nfn_mean, "adapted": adapted[t.type], "delta": adapted[t.type] - t.nfn_mean,
                     "has_adapter": t.type in adapted_types}
            for t in frozen.types}
