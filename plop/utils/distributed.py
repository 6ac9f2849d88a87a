"""Several processes (``torchrun``, ``accelerate launch``): the process group, one writer, and a
failure in any process ending the job.

A launcher starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`init_from_env`
joins them into a ``torch.distributed`` process group (gloo on CPU, nccl on CUDA) whose
collectives time out after ``$PLOP_DIST_TIMEOUT`` seconds (default 300), so a process that dies
or hangs ends the job instead of blocking it. An exception in one process reaches the others
through :func:`raise_if_any_failed`: every process then raises, the failing one its own error,
the others a :class:`PeerError` that names it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, PlopError

TIMEOUT_ENV = "PLOP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


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


def finish(code: int = 0) -> None:
    """End a command's part in a launched job (no-op for a single process).

    A process that succeeded waits for the others before leaving the group, so that none tears its
    side down while a peer still uses it. A launched process then exits without Python's
    finalization: gloo's threads may still hold tensors, and freeing them while the interpreter is
    torn down can abort the process (SIGABRT after the report was written, seen once in CI at 3
    processes), which turns a finished job into a failed one. atexit handlers still run first."""
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)


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


def gather_rows(row: np.ndarray) -> np.ndarray:
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
