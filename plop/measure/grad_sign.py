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
  ``tokens`` setting says (:class:`plop.measure.batching.Batch`'s ``scored`` mask). GRPO is not
  built yet (the config refuses it).
* **Agreement.** An entry agrees when its gradient has the same nonzero sign in all k batches,
  ``|sum_j sign(g_ij)| = k``; the score is the share of such entries in ``[0, 1]``. All k, not a
  majority: what a sign-based reading of the paper's "consistently signed" asks for, and under
  random signs its chance level, ``2^(1-k)``, is the same for every module whatever its width, so
  modules compare fairly. Higher consistency = more useful to adapt.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import DataError
from .batching import Batch
from .hooks import Hooks
from ..model.layers import module_shape


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


def causal_lm_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean next-token cross-entropy with the scored tokens (all real ones when the batch says
    none) as targets: what SFT trains on."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    scored = batch.scored if batch.scored is not None else inputs.get("attention_mask")
    if scored is None:
        scored = torch.ones_like(inputs["input_ids"])
    keep = scored[:, 1:].to(device).bool()  # position t predicts token t + 1
    if not keep.any():
        raise DataError("a grad-sign batch has no scored token to predict", "give rows with a response")
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    logits = model(**inputs, **extra).logits
    return F.cross_entropy(logits[:, :-1][keep].float(), inputs["input_ids"][:, 1:][keep])


def b_gradients(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Batch], k: int, seed: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """``{name: (k, d_out)}``: the loss gradient with respect to each module's probe ``B`` on each of
    the first ``k`` batches; a module the forward never reached in some batch is left out."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    seen = 0
    with torch.enable_grad(), RankOneProbes(model, modules, seed, device) as probes:
        for batch in itertools.islice(batches, k):
            names = list(probes.b)
            found = torch.autograd.grad(causal_lm_loss(model, batch, device), [probes.b[n] for n in names],
                                        allow_unused=True)
            for name, g in zip(names, found):
                if g is not None:
                    grads[name].append(g.detach().float().reshape(-1).cpu())
            seen += 1
    if seen < k:
        raise DataError(f"grad-sign needs {k} batches, the data made {seen}",
                        "give more rows, or lower --grad-batches or --batch-tokens")
    return {name: torch.stack(g) for name, g in grads.items() if len(g) == k}


def sign_consistency(grads: torch.Tensor) -> float:
    """Share of entries whose sign is the same, and nonzero, in every row of ``grads`` ``(k, n)``."""
    k = grads.shape[0]
    return float((torch.sign(grads).sum(dim=0).abs() == k).float().mean())


def grad_sign_scores(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Batch], k: int, seed: int,
                     device: torch.device) -> dict[str, float]:
    """Each module's sign consistency over ``k`` batches (see the module docstring)."""
    return {name: sign_consistency(g) for name, g in b_gradients(model, modules, batches, k, seed, device).items()}
