"""``plop.lora_config``: the diagnosis and PEFT's ``LoraConfig`` in one call, for ``SFTTrainer``.

    trainer = SFTTrainer(model=model, train_dataset=ds, peft_config=plop.lora_config(model, ds))

It returns the ``LoraConfig`` alone, so it drops in wherever PEFT's does. The report behind it is
the two calls it makes, ``plop.diagnose(model, ds, ...)`` then ``report.to_peft_config(...)``:
whoever wants to save or look at the report makes those two calls instead (one way to get a
report, and one return type here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import STRATEGY_ARGUMENTS, DiagnoseConfig
from ..diagnosis import diagnose

_DIAGNOSE_FIELDS = frozenset(f.name for f in dataclasses.fields(DiagnoseConfig)) | set(STRATEGY_ARGUMENTS)


def lora_config(model: nn.Module, dataset, tokenizer=None, *, budget: int | None = None, allocate: bool = False,
                **kwargs: Any):
    """A ``peft.LoraConfig`` on the modules plop recommends for ``model`` on ``dataset``.

    Args:
        model: the model you will fine-tune (diagnosed as it is: dtype, device, quantization).
        dataset: a ``datasets.Dataset``, ``IterableDataset`` or list of dicts in any of TRL's
            standard formats (:mod:`plop.files.trl_formats`), or plop's own texts/examples.
        tokenizer: the tokenizer TRL trains with (default: the one saved with the model).
        budget: LoRA parameters to spend (greedy in ascending NFN at the config's rank).
        allocate: give each chosen type its own rank (``rank_pattern``/``alpha_pattern``), under
            ``budget`` (default: what the top-k costs); both read by :meth:`plop.config.Strategy.decode`,
            as the command line's ``--budget`` and ``--allocate`` are.
        kwargs: :class:`~plop.config.DiagnoseConfig` fields (``samples``, ``tokens``, ``seed``,
            ``top_k``, ``max_length``, ...) go to the diagnosis; everything else (``r``,
            ``lora_alpha``, ``lora_dropout``, ``use_dora``, ``task_type``, ...) to ``LoraConfig``.
            ``r`` defaults to the diagnosis' ``rank`` (16) and ``lora_alpha`` to ``2 r``.
    """
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in _DIAGNOSE_FIELDS}
    if "r" in kwargs and "rank" not in settings:
        settings["rank"] = kwargs["r"]  # the budget and the allocation are costed at the rank trained
    if budget is not None:
        settings["budget"] = budget
    if allocate:  # with the budget, read as the command line's --allocate BUDGET is (Strategy.decode)
        settings["allocate"] = True
    report = diagnose(model, dataset, tokenizer, **settings)
    return report.to_peft_config(kwargs.pop("r", None), kwargs.pop("lora_alpha", None), **kwargs)
