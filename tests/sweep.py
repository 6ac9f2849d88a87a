"""One architecture of ``tests/archs.py`` through plop end to end, as a user would take it:
``plop.diagnose`` -> the PEFT export (``adapter_config.json``, read back by PEFT) ->
``get_peft_model`` -> one backward step. ``tests/test_sweep.py`` asserts on the row,
``benchmarks/arch_sweep.py`` writes every row into the support matrix of docs/architectures.md.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import archs
from conftest import make_batches
from plop import diagnose
from plop.stacks import export
from plop.model.roles import role

LENGTHS = [12, 7, 12, 3, 9, 12]  # right padding in every batch
VISION = ("vision_tower", "visual", "vision_model", "multi_modal_projector")  # not run on text data


@dataclass
class Row:
    """What plop did with one architecture."""

    arch: str
    kind: str
    types: list[str]  # every diagnosed type
    recommended: list[str]
    target_modules: list[str] | str
    target_parameters: list[str] | None
    excluded: dict[str, str]  # types PEFT refuses on this model -> why
    coverage: float
    undiagnosed: list[dict]
    unseen: list[str]  # projections neither diagnosed nor listed by coverage (VLM towers expected)
    wrapped: set[str] = field(repr=False)  # what PEFT put LoRA on (3-D weights as <module>.<parameter>)
    chosen: set[str] = field(repr=False)  # what the recommendation says
    trainable: int = 0
    costed: int = 0  # the recommendation's trainable_params
    no_grad: list[str] = field(default_factory=list)  # LoRA parameters the backward step did not reach
    expert_types: list[str] = field(default_factory=list)


def batches():
    return make_batches(len(LENGTHS), 12, 3, vocab=archs.SAFE_VOCAB, lengths=LENGTHS)


def _wrapped(peft_model) -> set[str]:
    """Module names with a LoRA, and ``<experts module>.<parameter>`` for 3-D weights (PEFT nests
    one ``ParamWrapper`` per parameter through ``base_layer``)."""
    out = set()
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not module.lora_A:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        parameter = getattr(module, "parameter_name", None)
        out.add(f"{name}.{parameter}" if parameter else name)
    return out


def _backward(name: str, peft_model) -> list[str]:
    """One training step's gradients; the LoRA parameters they did not reach. The adapters start
    with B != 0 (``init_lora_weights=False``), else A's gradient is zero by construction."""
    peft_model.train()
    batch = batches()[0]
    kwargs = archs.inputs(name, batch)
    if archs.ARCHS[name].kind == "encoder":
        loss = peft_model(**kwargs).last_hidden_state.square().mean()
    else:
        kwargs.pop("decoder_input_ids", None)
        kwargs.pop("decoder_attention_mask", None)
        loss = peft_model(**kwargs, labels=batch["input_ids"]).loss
    loss.backward()
    return [n for n, p in peft_model.named_parameters()
            if "lora_" in n and (p.grad is None or not p.grad.abs().sum() > 0)]


def _unseen(model, report) -> list[str]:
    """Projections the report neither diagnosed nor names in its coverage (the output head aside)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    seen = {m.name for m in report.modules}
    listed = [u["role"] for u in report.coverage["undiagnosed"]]
    return sorted(n for n in archs.projections(model) if n not in seen and n != head_name
                  and role(n) not in listed)


def run(name: str) -> Row:
    from peft import LoraConfig, get_peft_model

    model = archs.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = diagnose(model, batches(), n_bootstrap=20)
        result = export(report, "peft")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / result.filename).write_text(result.text)
        config = LoraConfig.from_pretrained(tmp)
    config.init_lora_weights = False
    rec = report.recommendation
    unseen = _unseen(model, report)
    peft_model = get_peft_model(model, config)
    return Row(
        arch=name, kind=archs.ARCHS[name].kind, types=[t.type for t in report.types], recommended=rec.types,
        target_modules=rec.target_modules, target_parameters=rec.target_parameters, excluded=rec.excluded or {},
        coverage=report.coverage["share"], undiagnosed=report.coverage["undiagnosed"], unseen=unseen,
        wrapped=_wrapped(peft_model), chosen=set(rec.modules), costed=rec.trainable_params,
        trainable=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        no_grad=_backward(name, peft_model), expert_types=sorted({m.type for m in report.modules if m.experts}),
    )


torch.set_num_threads(1)
