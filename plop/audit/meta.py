"""A model's structure without its weights: ``config.json`` -> the published class on the meta device.

``torch.device("meta")`` gives every parameter a shape and no storage, so building even
DeepSeek-V3 (671 B parameters) takes about a second and no memory, and PEFT wraps it like a real
model. The class is the one ``config.json`` names in ``architectures`` (a VLM's
``...ForConditionalGeneration``, BERT's ``BertForMaskedLM``), else the one plop loads models with.
Remote code is never run: a config that needs it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..stacks.reading import StackConfig
from ..utils.fsio import read_text_capped

MAX_MODEL_CONFIG_BYTES = 4 * 1024 * 1024


def config_path(model: str | Path) -> Path:
    """The ``config.json`` of a model folder, or the file itself."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: no such model config",
                         "pass a model folder with config.json, a config.json, or a .gguf file")
    return path


def load_config(model: str | Path):
    """The transformers config of a ``config.json``, a model folder or a ``.gguf`` file."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from e
    path = config_path(path)
    try:
        data = json.loads(read_text_capped(path, MAX_MODEL_CONFIG_BYTES))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelError(f"{path}: a model config needs a model_type")
    if "auto_map" in data:
        raise ModelError(f"{path}: this model runs code of its own (auto_map), which plop check never runs")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: transformers cannot build a {model_type!r} config: {str(e).splitlines()[0]}") from e


def model_class(config) -> type:
    """The class ``config.json`` names, when transformers has it; else plop's loading class."""
    import transformers
    from transformers import PreTrainedModel

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    from ..model.loading import auto_class

    auto = auto_class(config)
    return auto._model_mapping[type(config)]


def meta_model(model: str | Path):
    """The model of ``model`` (a ``config.json``, a model folder or a ``.gguf``) on the meta device."""
    import torch

    config = load_config(model)
    cls = model_class(config)
    try:
        with torch.device("meta"):
            built = cls._from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ModelError(f"transformers cannot build {cls.__name__} from {model}: {str(e).splitlines()[0]}") from e
    built.eval()
    return built


class _Builder(nn.Module):
    """The root of a builder's module tree; its output projection is the head, as
    ``get_output_embeddings`` names it on a transformers model (None when tied to the embeddings)."""

    head: str | None = None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_submodule(self.head) if self.head else None


def builder_model(spec: StackConfig) -> tuple[nn.Module, dict]:
    """A torchtune recipe's model as its builder (``model._component_``) makes it, on the meta
    device: every linear layer under torchtune's own names, from plop's table of torchtune's
    builders (:mod:`plop.stacks.torchtune`), and the builder's facts for the report. Only the
    linear layers are built: the parameters LoRA adds and PEFT counts depend on nothing else."""
    import torch

    from ..stacks import torchtune

    component, entry = torchtune.builder(spec)
    linears = torchtune.modules(entry)
    root = _Builder()
    with torch.device("meta"):
        for name, row in linears.items():
            parent = root
            for part in name.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name.rsplit(".", 1)[-1], nn.Linear(*row["shape"], bias=row["bias"]))
    root.head = next((n for n, row in linears.items() if row.get("switch") == "output"), None)
    info = {"id": component, "architecture": torchtune.builder_name(component),
            "model_type": f"torchtune {torchtune.table()['torchtune']}", "parameters": entry["parameters"]}
    return root, info
