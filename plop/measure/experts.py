"""NFN of MoE experts stored as 3-D parameters (transformers 5), one hook per experts module.

transformers 5 keeps a MoE layer's experts in one module (``MixtralExperts``, ``Qwen3MoeExperts``,
``GptOssExperts``, ... all decorated with ``use_experts_implementation``) holding two stacked
weights, no ``nn.Linear``::

    gate_up_proj  (E, 2I, H)   or (E, H, 2I) when ``is_transposed`` (gpt-oss); ``up_proj`` when not ``has_gate``
    down_proj     (E, H, I)    or (E, I, H)

and called as ``experts(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))`` on the
flattened tokens, whichever kernel ``config._experts_implementation`` picks (eager, batched_mm,
grouped_mm, ...); Llama-4's experts take ``(E * T, H)`` rows instead, a token's row zero for an
expert it is not routed to (:mod:`plop.model.experts`). A forward pre-hook on that module sees the
tokens and their routing, so for every expert ``e`` and the tokens ``z_t`` routed to it, it
recomputes::

    ratio_t(gate_up_e) = ||W_e z_t|| / ||z_t||                          (no bias: NFN is about W)
    ratio_t(down_e)    = ||D_e u_t|| / ||u_t||,  u_t = gate(W_e z_t + b_e)   (the expert's own activation)

and keeps per expert the sums of ``ratio_t`` and ``ratio_t^2`` and the token count: nothing per
token is stored. With the exact baseline ``||W_e||_F / sqrt(d_in)`` per expert, an expert's NFN
is ``mean_t ratio_t / baseline_e``, and a layer's experts weight gets the token-weighted mean of
its experts' NFNs (the NFN a routed token meets). Padding tokens are excluded through the
attention mask, flattened like the hidden states.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ModelError
from ..model.experts import activation, dense_routed, expert_weights, input_bias, input_weight_name
from .hooks import Hooks
from .nfn import normalized_feature_norm, random_baselines

_SUM, _SUMSQ, _COUNT, _IN_SUM, _OUT_SUM = range(5)  # rows of ExpertWeightStats.sums


@dataclass
class ExpertWeightStats:
    """Streaming per-expert sums for one stacked weight (float64, CPU), and Poisson-bootstrap
    sums of ``ratio_t / baseline_e`` and counts per replicate (the diagnosis' per-sample weights)."""

    name: str  # full parameter name, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, int, int]  # (experts, d_out, d_in)
    baseline: np.ndarray  # (E,) ||W_e||_F / sqrt(d_in)
    n_replicates: int = 0
    sums: np.ndarray = field(init=False)  # (5, E): ratio sum, ratio^2 sum, tokens, input and output norm sums
    boot: np.ndarray = field(init=False)  # (2, R): sum of ratio / baseline, tokens
    input_norm_max: float = 0.0
    calls: int = 0

    def __post_init__(self) -> None:
        self.sums = np.zeros((5, self.shape[0]))
        self.boot = np.zeros((2, self.n_replicates))

    @property
    def count(self) -> np.ndarray:
        return self.sums[_COUNT]

    @property
    def tokens(self) -> int:
        """Routed (token, expert) pairs seen."""
        return int(self.count.sum())

    @property
    def expert_nfn(self) -> np.ndarray:
        """NFN per expert, NaN for an expert no token was routed to."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return normalized_feature_norm(self.sums[_SUM] / self.count, self.baseline)

    @property
    def nfn(self) -> float:
        """Token-weighted mean of the experts' NFNs: ``sum_e ratio_sum_e / baseline_e / sum_e count_e``."""
        return float((self.sums[_SUM] / self.baseline).sum() / self.count.sum())

    @property
    def nfn_std(self) -> float:
        """Standard deviation of ``ratio_t / baseline_e`` over all routed pairs."""
        second = (self.sums[_SUMSQ] / self.baseline**2).sum() / self.count.sum()
        return math.sqrt(max(second - self.nfn**2, 0.0))

    @property
    def input_norm_mean(self) -> float:
        return float(self.sums[_IN_SUM].sum() / self.count.sum())

    @property
    def output_norm_mean(self) -> float:
        return float(self.sums[_OUT_SUM].sum() / self.count.sum())

    @property
    def lora_params_per_rank(self) -> int:
        """PEFT's ``ParamWrapper`` gives every expert its own rank-r pair: ``E * (d_in + d_out)``."""
        experts, d_out, d_in = self.shape
        return experts * (d_in + d_out)

    def bootstrap_nfn(self) -> np.ndarray:
        """NFN under each Poisson-bootstrap replicate, shape ``(R,)``, as the collector's modules give it."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.boot[0] / self.boot[1]

    def vector(self) -> np.ndarray:
        """Every accumulator in one float64 row, the layout :meth:`merge` reads: what processes
        exchange in a data-parallel diagnosis."""
        return np.concatenate([self.sums.ravel(), self.boot.ravel(), [self.input_norm_max, self.calls]])

    def merge(self, vector: np.ndarray) -> None:
        """Add another accumulator's :meth:`vector` (the input-norm maximum is a maximum)."""
        sums, boot, (input_max, calls) = np.split(vector, [self.sums.size, self.sums.size + self.boot.size])
        self.sums += sums.reshape(self.sums.shape)
        self.boot += boot.reshape(self.boot.shape)
        self.input_norm_max = max(self.input_norm_max, float(input_max))
        self.calls += int(calls)

    def reset(self) -> None:
        self.__post_init__()
        self.input_norm_max, self.calls = 0.0, 0

    def add(self, per_sample: np.ndarray, sums: np.ndarray, input_max: float, weights: np.ndarray | None) -> None:
        """One call's sums: ``per_sample`` (2, E, G) ratio sums and counts per sample (one group
        when the tokens are not laid out as the batch), ``sums`` (5, E)."""
        self.sums += sums
        self.input_norm_max = max(self.input_norm_max, input_max)
        scaled = np.stack([(per_sample[0] / self.baseline[:, None]).sum(0), per_sample[1].sum(0)])  # (2, G)
        if weights is not None and scaled.shape[1] == weights.shape[0]:
            self.boot += scaled @ weights
        else:
            self.boot += scaled.sum(1, keepdims=True)
        self.calls += 1


class ExpertStats(Hooks):
    """Per-expert NFN sums for ``experts`` modules during a ``with`` block.

    Call :meth:`start_batch` with the batch's ``(batch, seq)`` attention mask (and the
    diagnosis' ``(batch, R)`` bootstrap weights) before each forward. Hooks are registered on
    entry and always removed on exit, also when the forward raises.
    """

    def __init__(self, experts: dict[str, nn.Module], n_bootstrap: int = 0,
                 baselines: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.experts = experts
        self.stats: dict[str, ExpertWeightStats] = {}
        for prefix, module in experts.items():
            for pname, w in expert_weights(module).items():
                if baselines is not None:  # from FSDP shards (plop.measure.sharded): no process holds w whole
                    baseline = baselines[f"{prefix}.{pname}"]
                else:  # one (d_out, d_in) matrix per expert, normed in float64
                    baseline = np.array(random_baselines(list(w.detach())))
                self.stats[f"{prefix}.{pname}"] = ExpertWeightStats(f"{prefix}.{pname}", tuple(w.shape), baseline,
                                                                    n_bootstrap)
        self._mask: torch.Tensor | None = None
        self._weights: np.ndarray | None = None

    def register(self) -> Iterator[RemovableHandle]:
        return (module.register_forward_pre_hook(self._make_hook(prefix), with_kwargs=True)
                for prefix, module in self.experts.items())

    def remove(self) -> None:
        super().remove()
        self._mask = None

    def start_batch(self, attention_mask: torch.Tensor, weights: np.ndarray | None = None) -> None:
        self._mask = attention_mask.bool()
        self._weights = weights

    def _make_hook(self, prefix: str):
        module = self.experts[prefix]
        signature = inspect.signature(module.forward)  # the wrapper keeps the experts' own signature
        names = (input_weight_name(module), "down_proj")
        stats = [self.stats[f"{prefix}.{n}"] for n in names]

        def hook(module: nn.Module, args, kwargs) -> None:
            bound = list(signature.bind(*args, **kwargs).arguments.values())
            if dense_routed(module):
                self._accumulate(module, stats, *self._dense_routing(bound[0], stats[0].shape[0], prefix))
            else:
                self._accumulate(module, stats, *bound[:2])

        return hook

    @staticmethod
    @torch.no_grad()
    def _dense_routing(rows: torch.Tensor, n_experts: int, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, T, H)`` hidden states and a ``(T, E)`` routing from a dense-routed call's
        ``(E * T, H)`` rows: a token goes to the experts whose row of it is not zero."""
        if rows.shape[0] % n_experts:
            raise ModelError(f"{prefix}: its {rows.shape[0]} input rows do not split over its {n_experts} experts, "
                             f"so plop cannot tell which tokens each expert got")
        hidden = rows.reshape(n_experts, -1, rows.shape[-1])
        routed = torch.linalg.vector_norm(hidden, dim=-1).T > 0
        return hidden, torch.where(routed, torch.arange(n_experts, device=rows.device), -1)

    def _routed(self, index: torch.Tensor, n_experts: int, n_tokens: int) -> tuple[torch.Tensor, ...]:
        """``(tokens, experts, samples, groups)``: the routed pairs sorted by expert, each token's
        sample (all 0, one group, when the tokens are not laid out as the batch)."""
        keep = (index >= 0) & (index < n_experts)  # expert parallelism marks foreign experts out of range
        mask = self._mask
        laid_out = mask is not None and mask.numel() == n_tokens
        if laid_out:
            keep &= mask.reshape(-1).to(index.device).unsqueeze(1)
        tokens = keep.nonzero()[:, 0]
        chosen = index[keep]
        order = torch.argsort(chosen, stable=True)
        tokens, chosen = tokens[order], chosen[order]
        samples = tokens // mask.shape[-1] if laid_out else torch.zeros_like(tokens)
        return tokens, chosen, samples, mask.shape[0] if laid_out else 1

    @torch.no_grad()
    def _accumulate(self, module: nn.Module, stats: list[ExpertWeightStats], hidden: torch.Tensor,
                    index: torch.Tensor) -> None:
        """``hidden`` is ``(T, H)``, or ``(E, T, H)`` when each expert sees its own scaled copy of
        the tokens (:func:`~plop.model.experts.dense_routed`)."""
        n_experts = stats[0].shape[0]
        tokens, chosen, samples, groups = self._routed(index, n_experts, hidden.shape[-2])
        per_expert = torch.bincount(chosen, minlength=n_experts).tolist()
        weights = expert_weights(module)
        w_in, w_down = weights[input_weight_name(module)], weights["down_proj"]
        bias = input_bias(module)
        sums = torch.zeros(2, 5, n_experts, device=hidden.device)
        per_sample = torch.zeros(2, 2, n_experts, groups, device=hidden.device)
        input_max = torch.zeros(2, device=hidden.device)
        for e, rows, owner in zip(range(n_experts), tokens.split(per_expert), samples.split(per_expert)):
            if rows.numel() == 0:
                continue
            z = (hidden[e] if hidden.ndim == 3 else hidden)[rows].float()
            h = z @ w_in[e].float().T
            u = activation(module, h if bias is None else h + bias[e].float())
            for k, (x, y) in enumerate(((z, h), (u, u @ w_down[e].float().T))):
                x_norm = torch.linalg.vector_norm(x, dim=-1)
                ok = x_norm > 0  # a zero input has no direction
                y_norm = torch.linalg.vector_norm(y, dim=-1)[ok]
                ratio = y_norm / x_norm[ok]
                sums[k, :, e] = torch.stack([ratio.sum(), (ratio * ratio).sum(), ok.sum(), x_norm[ok].sum(),
                                             y_norm.sum()])
                per_sample[k, 0, e].index_add_(0, owner[ok], ratio)
                per_sample[k, 1, e].index_add_(0, owner[ok], torch.ones_like(ratio))
                input_max[k] = torch.maximum(input_max[k], x_norm.max())
        sums, per_sample = sums.double().cpu().numpy(), per_sample.double().cpu().numpy()
        for k, s in enumerate(stats):
            s.add(per_sample[k], sums[k], float(input_max[k]), self._weights)
