"""A model's structure without its weights: ``config.json`` -> the published class on the meta device.

``torch.device("meta")`` gives every parameter a shape and no storage, so building even
DeepSeek-V3 (671 B parameters) takes about a second and no memory, and PEFT wraps it like a real
model. The class is the one ``config.json`` names in ``architectures`` (a VLM's
``...ForConditionalGeneration``, BERT's ``BertForMaskedLM``), else the generative class the stacks
fine-tune. Remote code is never run: a config that needs it is refused.

The file is read torch-free first, bounded like any config (:mod:`plop.utils.untrusted`), and the
model's size estimated from its numbers (:mod:`.size`), so an absurd config is refused in one line
before transformers is imported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ModelError, first_line
from ..utils.fsio import kind_of, read_text_capped
from ..utils.untrusted import parse_json
from .size import check_size

MAX_MODEL_CONFIG_BYTES = 4 * 1024 * 1024
_MODEL_HINT = "pass a model folder with config.json, a config.json, or a .gguf file"


def config_path(model: str | Path) -> Path:
    """The ``config.json`` of a model folder, or the file itself (a regular file: a FIFO would block)."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ModelError(f"{path}: no such model config", _MODEL_HINT)
    if not path.is_file():
        raise ModelError(f"{path} is not a regular file ({kind_of(path.stat().st_mode)})", _MODEL_HINT)
    return path


# transformers' save_pretrained writes the floats JSON lacks as {"__float__": "Infinity"}
# (configuration_utils._encode_special_floats: NemotronH's time_step_limit); read them back as it does
_FLOAT_TAG = "__float__"
_TAGGED_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _tagged_float(item: dict) -> Any:
    if item.keys() == {_FLOAT_TAG} and item[_FLOAT_TAG] in _TAGGED_FLOATS:
        return _TAGGED_FLOATS[item[_FLOAT_TAG]]
    return item


def read_model_config(path: Path) -> dict:
    """A ``config.json``'s settings, torch-free: a mapping with a ``model_type``, no remote code, and
    the size of a model plop check can build."""
    data = parse_json(read_text_capped(path, MAX_MODEL_CONFIG_BYTES), str(path), ModelError, _tagged_float)
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelError(f"{path}: a model config needs a model_type")
    if "auto_map" in data:
        raise ModelError(f"{path}: this model runs code of its own (auto_map), which plop check never runs")
    check_size(data, str(path))
    return data


def load_config(model: str | Path):
    """The transformers config of a ``config.json``, a model folder or a ``.gguf`` file."""
    path = config_path(model)
    if path.suffix == ".gguf":
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from e
    data = read_model_config(path)
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        # a value of the wrong type (vocab_size: 1.5) fails transformers' strict dataclass checks
        raise ModelError(f"{path}: transformers cannot build a {model_type!r} config: {first_line(e)}") from e


def model_class(config) -> type:
    """The class ``config.json`` names, when transformers has it; else the generative class the
    stacks load (:func:`task_class`)."""
    import transformers
    from transformers import PreTrainedModel

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return task_class(config)


def task_class(config) -> type:
    """The class a fine-tuning stack loads ``config`` with when ``architectures`` does not say: the
    seq2seq LM of an encoder-decoder, else the causal LM, else the image-text-to-text model (a VLM),
    as their ``AutoModelFor...`` map it. The bare ``...Model`` would name modules without the
    ``model.`` prefix every stack's model has, so a type with none of these is refused, not guessed."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    tasks = ([AutoModelForSeq2SeqLM] if getattr(config, "is_encoder_decoder", False) else []) + \
        [AutoModelForCausalLM, AutoModelForImageTextToText]
    for auto in tasks:
        cls = auto._model_mapping.get(type(config), None)
        if cls is not None:
            return cls
    raise ModelError(f"config.json names no architectures transformers has, nor has transformers a causal-LM, "
                     f"seq2seq-LM or image-text-to-text class for {config.model_type!r}: plop cannot know which "
                     "model the stack builds",
                     "add the model's class to config.json as \"architectures\": [\"...\"]")


def meta_model(model: str | Path):
    """The model of ``model`` (a ``config.json``, a model folder or a ``.gguf``) on the meta device."""
    config = load_config(model)
    import torch

    cls = model_class(config)
    try:
        with torch.device("meta"):
            built = cls._from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ModelError(f"transformers cannot build {cls.__name__} from {model}: {str(e).splitlines()[0]}") from e
    built.eval()
    return built
