"""Several processes (``torchrun``, ``accelerate launch``): data-parallel diagnosis, one writer.

A launcher starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`init_from_env`
joins them into a ``torch.distributed`` process group (gloo on CPU, nccl on CUDA) whose
collectives time out after ``$PLOP_DIST_TIMEOUT`` seconds (default 300), so a process that dies
or hangs ends the job instead of blocking it.

The data-parallel diagnosis (:func:`data_parallel_passes`) gives the report a single process
would give on the same rows, not an approximation of it:

* the token batches are the single-process batches (same rows, same padding), dealt out in
  turn: in step ``s``, process ``r`` runs global batch ``s * world + r``;
* a sample's Poisson bootstrap weights follow its place in the data (:attr:`Batch.rows`), not the
  process that runs it;
* after each step every process gathers every process's per-batch accumulators and adds them in
  global batch order, so the sums, maxima, calls, bootstrap totals, checkpoints and the
  ``until_stable`` stop are the single-process ones on every process, which all stop together;
* a process out of batches still takes part in the collectives (an empty step) until none has any;
* an exception in one process is gathered with the accumulators: every process then raises, the
  failing one its own error, the others a :class:`PeerError` that names it.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, PlopError
from .batching import Batch
from .collector import ModuleStats, NFNCollector
from .experts import ExpertWeightStats

TIMEOUT_ENV = "PLOP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_HAS_BATCH, _ERROR, _SAMPLES, _TOKENS = range(4)  # the header of each process's gathered row


class PeerError(PlopError):
    """Another process of a multi-process job failed; this one stops with it."""


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes (``size`` 1: a plain single process)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def timeout() -> timedelta:
    """How long a collective may wait for the slowest process (``$PLOP_DIST_TIMEOUT`` seconds)."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def world() -> World:
    """The initialised process group's view, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> World:
    """Join the launcher's process group (once; a group the caller initialised is kept)."""
    if dist.is_available() and not dist.is_initialized() and launched():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout())
    return world()


def finish() -> None:
    """Leave the process group cleanly at the end of a command (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(line: str, code: int) -> None:
    """End a failed process of a launched job at once, after saying ``line`` on stderr.

    SIGTERM is held off while it speaks: the launcher SIGTERMs the other processes as soon as one
    exits, and tearing down a process group whose peer has left can abort the process (SIGABRT)
    after its line, so either would turn its exit code into a signal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def barrier() -> None:
    """Wait for every process (after rank 0 wrote a file the others may read)."""
    if world().parallel:
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` (any picklable object) on every process."""
    if not world().parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def shared_tempdir(prefix: str) -> Iterator[str]:
    """A temporary directory every process of the job uses (one machine's file system): rank 0
    makes it and removes it once all are done with it."""
    path = broadcast(tempfile.mkdtemp(prefix=prefix) if world().is_main else None)
    try:
        yield path
    finally:
        barrier()
        if world().is_main:
            shutil.rmtree(path, ignore_errors=True)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(row: np.ndarray) -> np.ndarray:
    """Every process's ``row`` (float64), stacked in rank order."""
    tensor = torch.from_numpy(row).to(_device())
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor)
    return torch.stack(rows).cpu().numpy()


def raise_if_any_failed(error: BaseException | None, failed: np.ndarray) -> None:
    """Every process raises once any failed: its own error, or a :class:`PeerError`."""
    if not failed.any():
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error).splitlines()[0])
    if error is not None:
        raise error
    rank = int(np.flatnonzero(failed)[0])
    raise PeerError(f"process {rank} of {len(failed)} failed: {messages[rank]}")


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
        gathered = _gather_rows(row)
        raise_if_any_failed(error, gathered[:, _ERROR])
        remaining = int(gathered[:, _HAS_BATCH].sum())
        for row, batch in zip(gathered[gathered[:, _HAS_BATCH] > 0], step):
            state.add(row)
            yield state, batch
