"""Loading and sharding a model across the processes with FSDP2 (``--shard``); what the diagnosis
does with the shards is :mod:`plop.measure.sharded`.

* :func:`shard`: one FSDP2 group per decoder block, one for the body the diagnosis calls
  (embeddings, final norm), and one for what is left outside it (an untied output head).
  FSDP2 lays the shards out (dim 0, ``torch.chunk``); nothing here slices a tensor by hand.
* :func:`load_sharded`: the model is built on the meta device, sharded, given storage for its
  own shards only, and filled by torch.distributed.checkpoint's ``HuggingFaceStorageReader``,
  which reads each process's rows of each tensor from the safetensors files. No process ever
  holds a whole copy.

Refused, each in one line: a single process (nothing to shard across), quantized bases
(bitsandbytes packs 4/8-bit weights with per-block scales that FSDP2 would not shard with them),
offloaded weights, an output head tied to the input embedding together with ``include_head``
(the head would run outside the group that gathers its weight).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..utils.distributed import world
from .layers import body


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of the classes transformers names as never to be split across
    devices (``_no_split_modules``: the decoder/encoder blocks), as FSDP wraps them."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks, prefixes = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(p) for p in prefixes):
            blocks.append(module)
            prefixes.append(f"{name}.")
    return blocks


def _tied_head(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def prepare(model: nn.Module, include_head: bool) -> None:
    """Check that this job can diagnose ``model`` sharded, and shard it unless it already is."""
    check_shardable(model, include_head)
    if not is_sharded(model):
        shard(model)


def check_shardable(model: nn.Module, include_head: bool = False) -> None:
    """Raise, in one line, if this job cannot diagnose ``model`` sharded."""
    if not world().parallel:
        raise ConfigError("--shard needs several processes: there is nothing to shard across one",
                          "start plop with torchrun --nproc_per_node N or accelerate launch --num_processes N")
    if getattr(model, "hf_quantizer", None) is not None or any(
            getattr(p, "quant_state", None) is not None or not p.is_floating_point() for p in model.parameters()):
        raise ConfigError("--shard cannot shard a quantized base: bitsandbytes packs 4/8-bit weights with "
                          "per-block scales that FSDP2 does not shard with them", "diagnose it without --shard")
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        raise ConfigError("--shard needs a model that accelerate has not placed (device_map, --max-memory, "
                          "--offload-dir): FSDP2 places the shards itself")
    if include_head and _tied_head(model):
        raise ConfigError("--include-head with --shard needs an untied output head: a tied one shares the input "
                          "embedding's sharded weight, which FSDP2 gathers only while the body runs")


def shard_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MMAP_THRESHOLD = 1 << 20


def _return_freed_memory() -> None:
    """On the CPU under glibc: serve every allocation of 1 MiB or more by a mapping of its own,
    returned to the system when freed. glibc's default raises that threshold (up to 32 MiB) at
    the first large free, then serves the blocks' gathered weights from its heap and keeps them
    there once freed: measured at 2 processes, ~1 GB more per process, as much as the whole model
    (benchmarks/bench_sharded.py). A fixed threshold turns the adjustment off."""
    if shard_device().type != "cpu":
        return  # the gathers are on the GPU, in torch's caching allocator
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def shard(model: nn.Module) -> None:
    """Shard ``model`` in place with FSDP2: each block, then the body, then the rest (if any).

    Weights outside the body that alias one of its own (a tied output head) are pointed at the
    sharded parameter afterwards instead of being sharded a second time by another group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_shardable(model)
    blocks = decoder_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} names no blocks to shard (transformers' _no_split_modules)",
                         "diagnose it without --shard")
    _return_freed_memory()
    mesh = init_device_mesh(shard_device().type, (world().size,))
    inner = body(model)  # what the diagnosis calls: a group of its own, so that calling it gathers the embeddings
    owners = {id(p): (m, n) for m in inner.modules() for n, p in m.named_parameters(recurse=False)}
    aliases = [(m, n, owners[id(p)]) for m in model.modules() if not any(m is x for x in inner.modules())
               for n, p in m.named_parameters(recurse=False) if id(p) in owners]
    rest = [p for p in model.parameters() if id(p) not in owners]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)  # True: hold one block at a time
    fully_shard(inner, mesh=mesh, reshard_after_forward=True)
    for module, name, (owner, owner_name) in aliases:
        setattr(module, name, getattr(owner, owner_name))
    if rest and inner is not model:
        fully_shard(model, mesh=mesh, reshard_after_forward=True)


def held_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: its shards (or whole tensors where unsharded)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def _read_checkpoint(model: nn.Module, source: str) -> None:
    """Fill each process's shards from the safetensors files in ``source``, its rows only."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader, load

    reader = HuggingFaceStorageReader(source)
    stored = set(reader.read_metadata().state_dict_metadata)
    state = model.state_dict()
    # an alias (a tied head) is filled through the tensor it shares; named_* list each tensor once
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = sorted(k for k in state if k in own and k not in stored)
    if missing:
        raise ModelError(f"--shard reads safetensors as stored, and {len(missing)} of the model's tensors are not "
                         f"in {source} under their names (e.g. {missing[0]}): transformers renames or fuses them "
                         "while loading, as it does MoE experts stored one by one",
                         "diagnose it without --shard, or shard the loaded model: plop.diagnose(..., shard=True)")
    load({k: v for k, v in state.items() if k in stored}, storage_reader=reader,
         planner=DefaultLoadPlanner(allow_partial_load=True))


def load_sharded(auto_class, source: str, config, dtype, trust_remote_code: bool = False) -> nn.Module:
    """``auto_class``'s model of ``config``, sharded, its shards read from ``source``."""
    from accelerate import init_empty_weights

    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    shard(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=shard_device())  # storage for this process's shards only
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])  # to_empty left them uninitialised
    _read_checkpoint(model, source)
    return model.eval()
