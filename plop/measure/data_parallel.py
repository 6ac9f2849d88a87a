"""The data-parallel diagnosis: every process runs its share of the batches, and every process gets
the report a single process would give on the same rows, not an approximation of it:

* the token batches are the single-process batches (same rows, same padding), dealt out in
  turn: in step ``s``, process ``r`` runs global batch ``s * world + r``;
* a sample's Poisson bootstrap weights follow its place in the data (:attr:`Batch.rows`), not the
  process that runs it;
* after each step every process gathers every process's per-batch accumulators and adds them in
  global batch order, so the sums, maxima, calls, bootstrap totals, checkpoints and the
  ``until_stable`` stop are the single-process ones on every process, which all stop together;
* a process out of batches still takes part in the collectives (an empty step) until none has any;
* an exception in one process is gathered with the accumulators, and every process raises
  (:func:`plop.utils.distributed.raise_if_any_failed`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..utils.distributed import World, gather_rows, raise_if_any_failed, world
from .batching import Batch
from .collector import ModuleStats, NFNCollector
from .experts import ExpertWeightStats

_HAS_BATCH, _ERROR, _SAMPLES, _TOKENS = range(4)  # the header of each process's gathered row


@dataclass
class GlobalState:
    """The accumulators a diagnosis reads (``stats`` of the linear modules, ``experts`` of the 3-D
    expert weights): one process's own, or every process's added in global batch order, which is
    what a single process would hold."""

    stats: dict[str, ModuleStats]
    experts: dict[str, ExpertWeightStats] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0

    @classmethod
    def like(cls, collector: NFNCollector, experts: Mapping[str, ExpertWeightStats]) -> GlobalState:
        """Empty accumulators shaped like this process's."""
        return cls({name: replace(s, calls=0) for name, s in collector.stats.items()},
                   {name: replace(s, calls=0, input_norm_max=0.0) for name, s in experts.items()})

    def accumulators(self) -> list[ModuleStats | ExpertWeightStats]:
        return [*self.stats.values(), *self.experts.values()]

    @functools.cached_property
    def _cuts(self) -> np.ndarray:
        """Where each accumulator's part of a gathered row ends (their sizes never change)."""
        return np.cumsum([s.vector().size for s in self.accumulators()])[:-1]

    def add(self, row: np.ndarray) -> None:
        self.samples += int(row[_SAMPLES])
        self.tokens += int(row[_TOKENS])
        for s, part in zip(self.accumulators(), np.split(row[4:], self._cuts)):
            s.merge(part)


def _local_step(batches: Iterator[Batch], forward: Callable, world_: World,
                lockstep: bool = False) -> tuple[list[Batch], bool]:
    """The next step's batches (one per process, fewer at the end) and whether this process ran
    its own. ``lockstep``: a process without one runs the step's first batch anyway (sharded
    weights: every block's all-gather needs every process); its row is dropped unread."""
    step = list(itertools.islice(batches, world_.size))
    if world_.rank < len(step):
        forward(step[world_.rank])
    elif lockstep and step:
        forward(step[0])
    return step, world_.rank < len(step)


def data_parallel_passes(
    collector: NFNCollector, experts: Mapping[str, ExpertWeightStats], batches: Iterable[Batch], forward: Callable,
    lockstep: bool = False,
) -> Iterator[tuple[GlobalState, Batch]]:
    """``(global state, batch)`` after each global batch, the same sequence on every process.

    ``forward(batch)`` runs one batch through the hooked model. Stopping the iteration early
    (``until_stable``) is safe: every process sees the same states, so all stop at once.
    ``lockstep``: every process runs a forward in every step (see :func:`_local_step`).
    """
    world_, state, batches = world(), GlobalState.like(collector, experts), iter(batches)
    local = GlobalState(collector.stats, dict(experts))  # this process's own accumulators
    remaining = world_.size  # the processes that might still hold a batch
    while remaining:
        header, error, step = np.zeros(4), None, []
        start_samples, start_tokens = collector.samples, collector.tokens
        try:
            step, header[_HAS_BATCH] = _local_step(batches, forward, world_, lockstep)
        except Exception as e:  # noqa: BLE001 - every process must learn of it, see raise_if_any_failed
            error, header[_ERROR] = e, 1
        header[_SAMPLES], header[_TOKENS] = collector.samples - start_samples, collector.tokens - start_tokens
        row = np.concatenate([header, *(s.vector() for s in local.accumulators())])
        for s in local.accumulators():
            s.reset()
        gathered = gather_rows(row)
        raise_if_any_failed(error, gathered[:, _ERROR])
        remaining = int(gathered[:, _HAS_BATCH].sum())
        for row, batch in zip(gathered[gathered[:, _HAS_BATCH] > 0], step):
            state.add(row)
            yield state, batch
