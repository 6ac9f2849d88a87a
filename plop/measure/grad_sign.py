"""Sign consistency of LoRA-B gradients: a placement signal that sees the loss (issue 33).

What the paper defines (Sehanobish & Lovering, "Not How Many, But Which: Parameter Placement in
Low-Rank Adaptation", arXiv 2605.12207; read through its abstract and summaries, the full method
text was not reachable): a LoRA adapter with A frozen and a budget of trainable *entries* of B.
Each B entry is scored by how consistently the sign of its gradient holds over a few steps; under
GRPO, whose gradients are high-rank and near-orthogonal across steps, only consistently signed
entries keep the learning signal, and the chosen entries concentrate on the projections that
write the residual stream (V, O, Down). The scoring costs under 0.5 % of training.

What plop implements, and where it differs:

* **Modules, not entries.** plop places whole module types, so an entry-level score becomes a
  module's share of consistent entries; :func:`plop.ranking.ranker.signal_values` turns module
  scores into a type ranking under plop's own strategies.
* **Probes.** A throwaway rank-1 adapter on every candidate linear module, kept off the model:
  a forward hook adds ``B (A x)`` to the module's output, with ``A`` a fixed random row
  (:func:`probe_vectors`, PEFT's default ``lora_A`` init, seeded) and ``B = 0``, as PEFT
  initialises it. The output is unchanged, so every probe sees the unadapted model, while
  ``dL/dB = sum_t (dL/dy_t) (A x_t)`` is nonzero. Hooks rather than ``get_peft_model``: no module
  is replaced and no parameter is registered, so the model's ``state_dict`` cannot change, and
  removing the hooks restores it exactly. Only the ``B``'s require grad; no optimizer, no step.
* **Batches, not steps.** The paper's steps move the adapter between gradients; here the k
  gradients are taken at the same point (B = 0) on k different mini-batches, so the score measures
  how the sign holds across data, the part of "over steps" a diagnosis can see without training.
* **Loss.** SFT: the causal-LM loss (mean cross-entropy) on the scored tokens as targets, as the
  ``tokens`` setting says (:class:`plop.measure.batching.Batch`'s ``scored`` mask). GRPO
  (``generate`` with a ``reward``): TRL's GRPO loss at its first step on the model's own sampled
  groups (:func:`grpo_loss`), each completion weighted by its group-normalised advantage
  (:func:`group_advantages`).
* **Agreement.** An entry agrees when its gradient has the same nonzero sign in all k batches,
  ``|sum_j sign(g_ij)| = k``; the score is the share of such entries in ``[0, 1]``. All k, not a
  majority: what a sign-based reading of the paper's "consistently signed" asks for, and under
  random signs its chance level, ``2^(1-k)``, is the same for every module whatever its width, so
  modules compare fairly. Higher consistency = more useful to adapt.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import DataError
from ..model.layers import module_shape
from .batching import Batch
from .hooks import Hooks


def probe_vectors(modules: Mapping[str, nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Each module's ``A``, a ``(1, d_in)`` float32 row drawn as PEFT draws ``lora_A`` (Kaiming
    uniform with ``a = sqrt(5)``: uniform in ``+-1/sqrt(d_in)``), in module order from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in modules.items():
        d_in = module_shape(module)[1]
        bound = d_in ** -0.5
        out[name] = torch.empty(1, d_in).uniform_(-bound, bound, generator=generator)
    return out


class RankOneProbes(Hooks):
    """Rank-1 probes ``y + B (A x)`` on ``modules`` for a ``with`` block, ``B = 0`` in float32 on
    ``device``; the model's own parameters stop requiring grad inside and get their flags back after,
    also when the block fails."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], seed: int, device: torch.device) -> None:
        super().__init__()
        self.model, self.modules = model, modules
        self.a = probe_vectors(modules, seed)
        self.b = {name: torch.zeros(module_shape(m)[0], 1, device=device, requires_grad=True)
                  for name, m in modules.items()}
        self._flags: dict[nn.Parameter, bool] = {}

    def register(self) -> Iterator[RemovableHandle]:
        for name, module in self.modules.items():
            yield module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        a, b = self.a[name], self.b[name]

        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            # float32, as PEFT casts the input to its adapter's dtype; B = 0 keeps the output's values
            delta = (x.float() @ a.to(x.device).T) @ b.to(x.device).T
            return output + delta.to(output.dtype)

        return hook

    def __enter__(self) -> RankOneProbes:
        self._flags = {p: p.requires_grad for p in self.model.parameters()}
        for p in self._flags:
            p.requires_grad_(False)  # the graph then reaches only the B's: no weight gradient is computed
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        self._flags = {}


def _scored_logits(model: nn.Module, batch: Batch, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, targets, row)`` of every scored token (all real ones when the batch says none),
    float32: position t predicts token t + 1; ``row`` is the batch row each comes from."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    scored = batch.scored if batch.scored is not None else inputs.get("attention_mask")
    if scored is None:
        scored = torch.ones_like(inputs["input_ids"])
    keep = scored[:, 1:].to(device).bool()
    if not keep.any():
        raise DataError("a grad-sign batch has no scored token to predict", "give rows with a response")
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    logits = model(**inputs, **extra).logits
    row = torch.arange(keep.shape[0], device=device)[:, None].expand_as(keep)
    return logits[:, :-1][keep].float(), inputs["input_ids"][:, 1:][keep], row[keep]


def causal_lm_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean next-token cross-entropy on the scored tokens: what SFT trains on."""
    logits, targets, _ = _scored_logits(model, batch, device)
    return F.cross_entropy(logits, targets)


def grpo_loss(model: nn.Module, batch: Batch, advantages: torch.Tensor, device: torch.device) -> torch.Tensor:
    """TRL's GRPO loss at its first step on a batch of sampled completions (the scored tokens),
    ``advantages`` one per row. There the policy is the sampling policy and the reference, so each
    token's ``-A exp(logp - logp.detach())`` has the gradient ``-A grad(logp)``, clipping is inactive
    and the KL term's gradient is zero: the loss is ``sum(A * CE) / tokens``, summed over the batch's
    completion tokens as TRL's default ``loss_type="dapo"`` normalises."""
    logits, targets, row = _scored_logits(model, batch, device)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return (advantages.to(device=device, dtype=per_token.dtype)[row] * per_token).sum() / len(per_token)


def group_advantages(rewards: np.ndarray, k: int) -> np.ndarray:
    """GRPO's advantages of ``rewards`` laid out as consecutive groups of ``k`` completions of one
    prompt, as TRL computes them by default (``scale_rewards="group"``): each reward minus its
    group's mean, over the group's standard deviation (unbiased, as ``torch.std``) plus 1e-4. A
    group whose completions all got the same reward gets zeros: it teaches nothing."""
    groups = np.asarray(rewards, dtype=np.float64).reshape(-1, k)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return (centred / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)


def b_gradients(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Batch], k: int, seed: int,
                device: torch.device, advantages: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """``{name: (k, d_out)}``: the loss gradient with respect to each module's probe ``B`` on each of
    ``k`` batches; a module the forward never reached in some batch is left out. With
    ``advantages`` (one per row of the sampled order, :func:`group_advantages`) the loss is
    :func:`grpo_loss`, and a batch whose advantages are all 0 is passed over: its gradient is 0,
    so no sign in it could agree. Else the loss is :func:`causal_lm_loss` on the first ``k``."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    seen = silent = 0
    with torch.enable_grad(), RankOneProbes(model, modules, seed, device) as probes:
        for batch in batches:
            if seen == k:
                break
            if advantages is None:
                loss = causal_lm_loss(model, batch, device)
            else:
                rows = torch.as_tensor(advantages[batch.rows], dtype=torch.float32)
                if not rows.any():
                    silent += 1
                    continue
                loss = grpo_loss(model, batch, rows, device)
            names = list(probes.b)
            found = torch.autograd.grad(loss, [probes.b[n] for n in names], allow_unused=True)
            for name, g in zip(names, found):
                if g is not None:
                    grads[name].append(g.detach().float().reshape(-1).cpu())
            seen += 1
    if seen < k:
        why = (f"; {silent} more had every completion rewarded as the others of its prompt, which gives GRPO no "
               "gradient" if silent else "")
        raise DataError(f"grad-sign needs {k} batches, the data made {seen}{why}",
                        "give more rows (or prompts the model sometimes solves), or lower --grad-batches or "
                        "--batch-tokens")
    return {name: torch.stack(g) for name, g in grads.items() if len(g) == k}


def sign_consistency(grads: torch.Tensor) -> float:
    """Share of entries whose sign is the same, and nonzero, in every row of ``grads`` ``(k, n)``."""
    k = grads.shape[0]
    return float((torch.sign(grads).sum(dim=0).abs() == k).float().mean())


def grad_sign_scores(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Batch], k: int, seed: int,
                     device: torch.device, advantages: np.ndarray | None = None) -> dict[str, float]:
    """Each module's sign consistency over ``k`` batches (see the module docstring)."""
    grads = b_gradients(model, modules, batches, k, seed, device, advantages)
    return {name: sign_consistency(g) for name, g in grads.items()}
