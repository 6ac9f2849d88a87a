"""Forward-hook collector: streaming NFN statistics per linear module.

``NFNCollector`` is a context manager. On entry it registers one forward hook per linear-like
module; on exit (also when the forward raises) it removes every one of them. Each hook turns the
module's input and output into a handful of float64 sums that live on the CPU, so memory is
O(number of modules) however much data flows through, and nothing is stored per token.

Per module and per forward call the hook reads::

    ||z_t||          from the input (shared inputs, e.g. q/k/v, are normed once)
    ||W z_t||        from the output minus the bias: no extra matmul
    ratio_t = ||W z_t|| / ||z_t||

over the non-padding tokens given by the batch's attention mask. It also keeps, for a streaming
Poisson bootstrap, the per-sample ratio sums weighted by ``R`` resampling weights per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import ESTIMATORS, check_choice
from ..errors import NonFiniteError
from .hooks import Hooks
from ..model.layers import dense_weight, is_offloaded, module_shape, parameter
from .nfn import normalized_feature_norm, random_baseline, random_baselines, random_unit_vectors

# Rows of the per-call statistics (one column per sample, see NFNCollector._accumulate): the first
# three depend only on the input, so modules that share an input share them.
_COUNT, _IN_SUM, _IN_MAX, _SUM, _SUMSQ, _OUT_SUM, _MC_SUM = range(7)
_N_SCALARS = 7


@dataclass
class ModuleStats:
    """Streaming accumulator for one module (float64, on the CPU)."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    baseline: float  # ||W||_F / sqrt(d_in), or the Monte-Carlo E||Wu|| once finalised
    has_bias: bool
    n_replicates: int
    sums: np.ndarray = field(init=False)
    boot_sum: np.ndarray = field(init=False)
    boot_count: np.ndarray = field(init=False)
    calls: int = 0

    def __post_init__(self) -> None:
        self.sums = np.zeros(_N_SCALARS, dtype=np.float64)
        self.boot_sum = np.zeros(self.n_replicates, dtype=np.float64)
        self.boot_count = np.zeros(self.n_replicates, dtype=np.float64)

    @property
    def count(self) -> int:
        return int(self.sums[_COUNT])

    @property
    def ratio_mean(self) -> float:
        return self.sums[_SUM] / self.sums[_COUNT]

    @property
    def denominator(self) -> float:
        """``E_u ||W u||`` as estimated: closed form, or the Monte-Carlo running mean."""
        if self.sums[_MC_SUM] > 0:
            return self.sums[_MC_SUM] / self.sums[_COUNT]
        return self.baseline

    @property
    def nfn(self) -> float:
        return normalized_feature_norm(self.ratio_mean, self.denominator)

    @property
    def nfn_std(self) -> float:
        """Standard deviation of the per-token ratio, in NFN units."""
        n = self.sums[_COUNT]
        var = max(self.sums[_SUMSQ] / n - self.ratio_mean**2, 0.0)
        return float(np.sqrt(var)) / self.denominator

    @property
    def input_norm_mean(self) -> float:
        return self.sums[_IN_SUM] / self.sums[_COUNT]

    @property
    def input_norm_max(self) -> float:
        return float(self.sums[_IN_MAX])

    @property
    def output_norm_mean(self) -> float:
        return self.sums[_OUT_SUM] / self.sums[_COUNT]

    def vector(self) -> np.ndarray:
        """Every accumulator in one float64 row, the layout :meth:`merge` reads: what processes
        exchange in a data-parallel diagnosis."""
        return np.concatenate([self.sums, self.boot_sum, self.boot_count, [self.calls]])

    def merge(self, vector: np.ndarray) -> None:
        """Add another accumulator's :meth:`vector` (the input-norm maximum is a maximum)."""
        sums, boot_sum, boot_count, calls = np.split(vector, np.cumsum([_N_SCALARS, self.n_replicates,
                                                                         self.n_replicates]))
        in_max = max(self.sums[_IN_MAX], sums[_IN_MAX])
        self.sums += sums
        self.sums[_IN_MAX] = in_max
        self.boot_sum += boot_sum
        self.boot_count += boot_count
        self.calls += int(calls[0])

    def reset(self) -> None:
        self.__post_init__()
        self.calls = 0

    def bootstrap_nfn(self) -> np.ndarray:
        """NFN under each Poisson-bootstrap replicate, shape ``(R,)``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.boot_sum / self.boot_count / self.denominator


class BootstrapWeights:
    """``R`` Poisson(1) resampling weights per sample, drawn from one seeded stream in the order of
    the samples' places in the data: a sample's weights are the same whichever batch, or process,
    runs it. Drawn once, as small integers (a few hundred bytes per sample)."""

    def __init__(self, replicates: int, seed: int) -> None:
        self.replicates = replicates
        self._rng = np.random.default_rng(seed)
        self._drawn = np.zeros((0, replicates), dtype=np.uint8)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """The ``(len(rows), R)`` weights of the samples at places ``rows``."""
        missing = int(rows.max(initial=-1)) + 1 - len(self._drawn)
        if missing > 0:
            more = self._rng.poisson(1.0, size=(missing, self.replicates)).clip(max=255).astype(np.uint8)
            self._drawn = np.concatenate([self._drawn, more])
        return self._drawn[rows].astype(np.float64)


class NFNCollector(Hooks):
    """Registers NFN hooks on ``modules`` for the duration of a ``with`` block.

    Call :meth:`start_batch` with the batch's attention mask before each forward, so padding
    tokens are excluded and bootstrap weights are drawn per sample. ``estimator`` is
    ``"closed_form"`` (default, no extra compute) or ``"monte_carlo"`` (the authors' estimator:
    a fresh random unit vector per token and a second matmul; for validation). ``baselines``:
    the closed-form denominators, one per module, when the caller computed them (sharded weights).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        estimator: str = "closed_form",
        n_bootstrap: int = 200,
        seed: int = 0,
        baselines: list[float] | None = None,
    ) -> None:
        super().__init__()
        check_choice("estimator", estimator, ESTIMATORS)
        if not modules:
            raise ValueError("no linear modules to collect from")
        self.modules = modules
        self.estimator = estimator
        self.seed = seed
        # baselines given: computed from FSDP shards (plop.measure.sharded), as no process holds W whole
        if baselines is None and any(is_offloaded(module) for module in modules.values()):  # one weight at a time
            baselines = [random_baseline(dense_weight(module)) for module in modules.values()]
        elif baselines is None:
            baselines = random_baselines([dense_weight(module) for module in modules.values()])
        self.stats: dict[str, ModuleStats] = {
            name: ModuleStats(
                name=name,
                shape=module_shape(module),
                baseline=baseline,
                has_bias=parameter(module, "bias") is not None,
                n_replicates=n_bootstrap,
            )
            for (name, module), baseline in zip(modules.items(), baselines)
        }
        self._bootstrap = BootstrapWeights(n_bootstrap, seed)
        self._mc_generators: dict[torch.device, torch.Generator] = {}
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # by (batch, seq) shape
        self._weights: np.ndarray | None = None  # (batch, R) Poisson(1) bootstrap weights
        self._masks_by_device: dict[tuple, torch.Tensor] = {}
        self._cached_input: torch.Tensor | None = None
        self._cached_input_version = -1
        self._cached_rows: tuple | None = None
        # (stats, valid, 1/||z||, input rows, output norms) per module call, until flush()
        self._pending: list[tuple] = []
        self.samples = 0
        self.tokens = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def register(self) -> Iterator[RemovableHandle]:
        return (module.register_forward_hook(self._make_hook(name)) for name, module in self.modules.items())

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.remove()

    def remove(self) -> None:
        """Remove every hook and drop references to activations; safe to call twice."""
        super().remove()
        self._drop_cache()
        self._pending, self._masks, self._masks_by_device, self._weights = [], {}, {}, None

    @property
    def weights(self) -> np.ndarray | None:
        """The current batch's ``(batch, R)`` bootstrap weights (for other per-sample statistics)."""
        return self._weights

    def start_batch(self, attention_mask: torch.Tensor, *other_masks: torch.Tensor,
                    rows: np.ndarray | None = None) -> None:
        """Declare the next forward's ``(batch, seq)`` mask and take its bootstrap weights.

        ``other_masks``: masks of the same samples' other token streams (an encoder-decoder's
        decoder), each told apart by its shape, which must differ from the others'. ``rows``:
        the samples' places in the data (default: the next ones), which fix their bootstrap
        weights.
        """
        self.flush()
        self._masks = {tuple(m.shape): m.bool() for m in (*other_masks, attention_mask)}
        self._masks_by_device = {}
        n = attention_mask.shape[0]
        self._weights = self._bootstrap(np.arange(self.samples, self.samples + n) if rows is None else rows)
        self.samples += n
        self.tokens += int(attention_mask.sum())

    def _drop_cache(self) -> None:
        self._cached_input = None
        self._cached_rows = None

    # -- the hook ----------------------------------------------------------------------------
    def _make_hook(self, name: str):
        stats = self.stats[name]

        def hook(module: nn.Module, args, output) -> None:
            self._accumulate(module, stats, args[0], output)

        return hook

    def _mask_for(self, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        key = tuple(leading_shape)
        if key not in self._masks:
            return None  # tokens not laid out as (batch, seq): count them all, as one group
        if (device, key) not in self._masks_by_device:
            self._masks_by_device[device, key] = self._masks[key].to(device, non_blocking=True)
        return self._masks_by_device[device, key]

    def _input_rows(self, x: torch.Tensor):
        """``(valid, 1/||z||, rows)`` for an input; ``rows`` holds per-sample token count, input
        norm sum and max. q/k/v (and gate/up) read the very same tensor: computed once."""
        if x is self._cached_input and x._version == self._cached_input_version:
            return self._cached_rows
        in_norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
        mask = self._mask_for(in_norm.shape, in_norm.device)  # None unless shaped (batch, seq)
        if mask is None:
            in_norm = in_norm.reshape(1, -1)
        valid = in_norm != 0  # zero inputs carry no direction; NaN stays in and is reported
        if mask is not None:
            valid &= mask
        zero = in_norm.new_zeros(())
        masked = torch.where(valid, in_norm, zero)
        inverse = torch.where(valid, in_norm.reciprocal(), zero)
        rows = torch.stack([valid.sum(-1, dtype=torch.float32), masked.sum(-1), masked.amax(-1)])
        self._cached_input, self._cached_input_version = x, x._version
        self._cached_rows = (valid, inverse, rows)
        return self._cached_rows

    @torch.no_grad()
    def _accumulate(self, module, stats: ModuleStats, x, output) -> None:
        # A hook only takes the output's per-token norm: on a GPU, kernel launches are what a
        # hook costs, so the arithmetic on the norms is batched over all modules in flush().
        y = output[0] if isinstance(output, tuple) else output
        valid, inverse, in_rows = self._input_rows(x)
        bias = parameter(module, "bias") if stats.has_bias else None
        if bias is not None:
            y = y - bias.to(y.device, y.dtype)
        norms = [torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).reshape(valid.shape)]
        if self.estimator == "monte_carlo":
            norms.append(self._monte_carlo_norms(module, x).reshape(valid.shape))
        self._pending.append((stats, valid, inverse, in_rows, torch.stack(norms)))

    def flush(self) -> None:
        """Reduce the pending per-token norms and move them to the CPU accumulators: a few
        kernels and one copy per device and batch, no host sync inside the forward."""
        pending, self._pending = self._pending, []
        self._drop_cache()
        groups: dict[tuple, list] = {}
        for entry in pending:
            norms = entry[-1]
            groups.setdefault((norms.device, norms.shape), []).append(entry)
        for entries in groups.values():
            valid = torch.stack([e[1] for e in entries]).unsqueeze(1)  # (K, 1, G, T)
            norms = torch.where(valid, torch.stack([e[4] for e in entries]), 0.0)  # padding may hold inf
            ratio = norms[:, 0] * torch.stack([e[2] for e in entries])
            rows = [torch.stack([e[3] for e in entries]), torch.stack([ratio, ratio * ratio, norms[:, 0]], 1).sum(-1)]
            if norms.shape[1] > 1:
                rows.append(norms[:, 1:].sum(-1))
            block = torch.cat(rows, 1).cpu().double().numpy()  # (K, rows, G)
            self._accumulate_block([e[0] for e in entries], block)

    def _accumulate_block(self, stats: list[ModuleStats], block: np.ndarray) -> None:
        per_sample = self._weights is not None and block.shape[2] == self._weights.shape[0]
        if per_sample:
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are reported below
                boot_sum, boot_count = block[:, _SUM] @ self._weights, block[:, _COUNT] @ self._weights
        for k, s in enumerate(stats):
            totals = block[k].sum(-1)
            totals[_IN_MAX] = block[k, _IN_MAX].max()
            if not np.isfinite(totals).all():
                raise NonFiniteError(
                    f"module {s.name!r} produced a non-finite feature norm (input or output is inf/NaN); "
                    "try --dtype float32 or check the model's weights"
                )
            s.calls += 1
            s.sums[_IN_MAX] = max(s.sums[_IN_MAX], totals[_IN_MAX])
            totals[_IN_MAX] = 0.0
            s.sums[: len(totals)] += totals
            s.boot_sum += boot_sum[k] if per_sample else totals[_SUM]
            s.boot_count += boot_count[k] if per_sample else totals[_COUNT]

    def _monte_carlo_norms(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``||W u_t||`` for one fresh random unit vector ``u_t`` per token (the authors' way)."""
        device = x.device
        if device not in self._mc_generators:
            self._mc_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        tokens = x.reshape(-1, x.shape[-1])
        u = random_unit_vectors(
            tokens.shape[0], tokens.shape[1], generator=self._mc_generators[device], device=device, dtype=x.dtype
        )
        weight = dense_weight(module).to(device, x.dtype)
        return torch.linalg.vector_norm(torch.nn.functional.linear(u, weight), dim=-1, dtype=torch.float32)
