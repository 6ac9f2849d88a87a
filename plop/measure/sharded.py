"""``shard=True`` (``--shard``): a diagnosis on weights split across the processes by FSDP2.

A data-parallel diagnosis (:mod:`plop.measure.data_parallel`) gives every process the whole model.
Sharded, each process holds about 1/N of every weight instead (:mod:`plop.model.sharding` loads
and shards it). What that changes for the measurement:

* **The forward**: before a block runs FSDP2 all-gathers its weights and sets the unsharded
  parameters as the modules' attributes; after it, it frees them. The collector's hooks run
  inside the block's forward, so they read the full output and bias exactly as unsharded: NFN's
  numerator costs no extra matmul and no extra gather.
* **The denominator** ``||W||_F^2 / d_in`` needs no gather: each process sums the squares of its
  own rows in float64 and one all-reduce adds every module's (and every expert's) partial sum,
  before the first batch (:func:`baselines`).
* **The data** is dealt out as in the data-parallel diagnosis, and its float64 sums are gathered
  in data order by the same code; the only difference is that a process without a batch of its
  own in the last step runs a batch whose statistics are dropped, since every block's all-gather
  needs every process (``lockstep`` in :func:`plop.measure.data_parallel.data_parallel_passes`).

``weight_scores`` (one SVD per full weight) is refused sharded, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ModelError
from ..model.experts import expert_weights
from ..model.layers import module_shape, parameter
from ..model.sharding import shard_device
from ..utils.distributed import world
from .nfn import baseline_of_norm


def _rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(local tensor, indices of its dim-0 rows)``; the indices are None for a tensor every
    process holds whole (rank 0 alone counts it)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, None
    if tuple(weight.placements) != (Shard(0),):
        raise ModelError(f"a weight is sharded as {weight.placements}, not on dim 0 over one mesh dimension")
    local = weight.to_local()
    # FSDP2's documented layout: torch.chunk along dim 0, the tail chunks possibly empty
    chunks = torch.chunk(torch.arange(weight.shape[0]), world().size)
    rows = chunks[world().rank] if world().rank < len(chunks) else torch.arange(0)
    if len(rows) != local.shape[0]:
        raise ModelError(f"a shard holds {local.shape[0]} rows where torch.chunk gives {len(rows)}")
    return local, rows


def _partial(weight: torch.Tensor, per_expert: bool) -> torch.Tensor:
    """This process's part of the all-reduced vector for one weight: the float64 sum of squares
    of its rows (1 entry), or the norm of each of its experts at its index (E entries, zeros
    elsewhere): experts are sharded whole along dim 0, so each is normed on one process, in
    float64 as :class:`plop.measure.experts.ExpertStats` does, and the sum adds only zeros to it."""
    local, rows = _rows(weight.detach())
    mine = rows is not None or world().is_main
    if not per_expert:
        return local.double().pow(2).sum().reshape(1) if mine else torch.zeros(1, dtype=torch.float64)
    out = torch.zeros(weight.shape[0], dtype=torch.float64)
    if mine and local.shape[0]:
        out[rows if rows is not None else slice(None)] = torch.linalg.matrix_norm(local, dtype=torch.float64).cpu()
    return out


def baselines(modules: Mapping[str, nn.Module], experts: Mapping[str, nn.Module]
              ) -> tuple[list[float], dict[str, np.ndarray]]:
    """``||W||_F / sqrt(d_in)`` of each linear module, and per expert of each 3-D expert weight
    (by ``prefix.name``), from the shards with one all-reduce: what
    :class:`~plop.measure.collector.NFNCollector` and :class:`~plop.measure.experts.ExpertStats` compute from whole
    weights."""
    parts = [_partial(parameter(m, "weight"), False) for m in modules.values()]
    stacks = [(f"{prefix}.{name}", w) for prefix, m in experts.items() for name, w in expert_weights(m).items()]
    parts += [_partial(w, True) for _, w in stacks]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    flat = flat.to(shard_device())
    dist.all_reduce(flat)
    values = np.split(flat.cpu().numpy(), np.cumsum([len(p) for p in parts])[:-1])
    linear = [baseline_of_norm(math.sqrt(v[0]), module_shape(m)[1]) for v, m in zip(values, modules.values())]
    per_expert = {name: baseline_of_norm(v, w.shape[2]) for (name, w), v in zip(stacks, values[len(modules):])}
    return linear, per_expert
