"""How far a run has moved the model from its base after its first steps: the step size that a
fair placement comparison must match as well as the parameter count.

Two placements at one learning rate can take very different steps: with ``alpha = 2 x rank`` the
LoRA scale is constant, so one Adam step changes a module's output roughly in proportion to its
rank, and a placement given more rank directions per layer simply moves further. These figures say,
per run, how far it moved, measured against the base model itself (the adapters switched off with
PEFT's ``disable_adapter``), on held-out data:

* :func:`relative_output_change` (supervised runs): ``sqrt(sum ||dW x||^2 / sum ||W x||^2)`` over
  the adapted linear modules and the held-out real tokens, ``dW x`` being a LoRA layer's output
  minus its base layer's: the adapters' share of what the adapted modules output;
* :func:`policy_kl` (GRPO runs): the mean per-token ``KL(base || policy)`` of the next-token
  distributions along the base model's greedy completions of held-out prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..measure.hooks import Hooks


class _AdapterShare(Hooks):
    """Sums ``||dW x||^2`` and ``||W x||^2`` over the real tokens of each batch, for every LoRA
    layer whose base is a linear module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m.base_layer, nn.Linear)]
        self.mask: torch.Tensor | None = None
        self.sums = torch.zeros(2, dtype=torch.float64)
        self._base: dict[int, torch.Tensor] = {}

    def register(self) -> Iterator:
        for layer in self.layers:
            yield layer.base_layer.register_forward_hook(self._keep_base)
            yield layer.register_forward_hook(self._add)

    def _keep_base(self, module, args, output) -> None:
        self._base[id(module)] = output

    def _add(self, module, args, output) -> None:
        base = self._base.pop(id(module.base_layer))
        real = self.mask.reshape(-1).bool()
        delta = (output - base).reshape(-1, output.shape[-1])[real].double()
        self.sums += torch.stack([delta.square().sum(), base.reshape(-1, base.shape[-1])[real].double().square().sum()])


@torch.no_grad()
def relative_output_change(peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """The adapters' share of the adapted modules' outputs on ``batches`` (``input_ids`` and
    ``attention_mask``; padding is left out), in eval mode (no dropout)."""
    training = peft_model.training
    peft_model.eval()
    try:
        with _AdapterShare(peft_model) as share:
            if not share.layers:
                return float("nan")
            device = next(peft_model.parameters()).device
            for batch in batches:
                share.mask = batch["attention_mask"].to(device)
                peft_model(input_ids=batch["input_ids"].to(device), attention_mask=share.mask)
        return float((share.sums[0] / share.sums[1]).sqrt()) if share.sums[1] > 0 else float("nan")
    finally:
        peft_model.train(training)


@torch.no_grad()
def policy_kl(peft_model: nn.Module, sequences: Iterable[tuple[torch.Tensor, int]]) -> float:
    """Mean per-token ``KL(base || policy)`` over the completion positions of ``sequences``: each a
    1-D tensor of prompt + completion token ids and the prompt's length (the base model's greedy
    completion of a held-out prompt, so both models are scored on the same tokens)."""
    training = peft_model.training
    peft_model.eval()
    total, count = 0.0, 0
    try:
        device = next(peft_model.parameters()).device
        for ids, prompt_length in sequences:
            ids = ids.to(device).unsqueeze(0)
            logits = peft_model(input_ids=ids).logits[0, prompt_length - 1:-1].double()
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids).logits[0, prompt_length - 1:-1].double()
            kl = (base.softmax(-1) * (base.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
            total, count = total + float(kl.sum()), count + kl.numel()
        return total / count if count else float("nan")
    finally:
        peft_model.train(training)
