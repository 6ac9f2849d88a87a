"""What a config trains on a model: each stack's key semantics, then PEFT itself on the meta model.

The stack rules that need the model (axolotl ``lora_target_linear``, LLaMA-Factory ``all`` and its
VLM target patching, torchtune's builders) turn an :class:`StackConfig` into the ``LoraConfig``
that stack hands to PEFT. Then ``get_peft_model`` wraps the meta model: PEFT's own matcher, its
transformers-5 MoE conversion and its refusals decide what is wrapped, so plop never disagrees
with PEFT, and the trainable count is PEFT's. mlx-lm builds its own model and wraps it itself:
:func:`native` counts that (:func:`plop.stacks.mlx_lm.resolve`).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import first_line
from ..model.peft_rules import converted_parameters
from ..stacks import axolotl, llama_factory, mlx_lm, torchtune
from ..stacks.reading import StackConfig

ADAPTER = "default"
@dataclass
class Build:
    """What PEFT wrapped: target -> rank (a module name, or ``module.parameter`` for a 3-D expert
    weight), trainable parameters per target, full copies (``modules_to_save``) by name, and PEFT's
    refusal, if it refused."""

    lora_config: object
    ranks: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    saved: dict[str, int] = field(default_factory=dict)
    other: int = 0  # trainable parameters outside adapters and copies (bias="all")
    wrapped_params: dict[str, str] = field(default_factory=dict)  # ``module.parameter`` target -> its module
    converted: object = None  # the config after PEFT's own rewriting
    refused: str | None = None
    missed: list[str] | None = None  # keys the stack's own matcher found nothing for (None: PEFT matched)
    native: list[str] = field(default_factory=list)  # what the stack wrapped, in its own module names
    inner: list[str] = field(default_factory=list)  # the stack's own paths inside a block
    expert_keys: list[str] = field(default_factory=list)  # those of them that hold the routed experts

    @property
    def trainable(self) -> int:
        return sum(self.params.values()) + sum(self.saved.values()) + self.other


# -- stack rules that need the model -------------------------------------------------------------
def _leaf_names(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> set[str]:
    """The last name components of the modules ``keep(name, module)`` selects, as both stacks'
    "all linear" rules collect them."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and keep(name, m)}


def _leaf_linear_names(model: nn.Module, forbidden: list[str] = ()) -> set[str]:
    """LLaMA-Factory's find_all_linear_modules: modules whose class name holds "Linear" (not
    "Embedding"), outside the forbidden substrings."""
    return _leaf_names(model, lambda name, m: "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__
                       and not any(f in name for f in forbidden))


def _axolotl_linear(model: nn.Module) -> set[str]:
    """axolotl's find_all_linear_names (loaders/adapter.py, 0.21): every ``nn.Linear`` (Llama-4's
    router is one) or module whose class name holds "Linear", less
    :data:`~plop.stacks.axolotl.OUTPUT_EMBEDDING` by name (not the model's actual head)."""
    return _leaf_names(model, lambda name, m: (isinstance(m, nn.Linear) or "Linear" in type(m).__name__)
                       and type(m).__name__ != "LlamaLinearScalingRotaryEmbedding") - {axolotl.OUTPUT_EMBEDDING}


def _llama_factory(spec: StackConfig, model: nn.Module) -> list[str]:
    """hiyouga/LLaMA-Factory src/llamafactory/model/adapter.py _setup_lora_tuning: ``all`` alone ->
    find_all_linear_modules (leaf names of Linear modules outside the forbidden substrings); on a
    composite (VLM) model, patch_target_modules turns the targets into the full names that contain
    one of them as a substring and none of the frozen or conflicting keys
    (:mod:`plop.stacks.llama_factory` holds its tables)."""
    model_type = getattr(model.config, "model_type", None)
    targets = list(spec.placement.target_modules or [])
    if targets == ["all"]:
        targets = sorted(_leaf_linear_names(model, llama_factory.all_linear_forbidden(spec, model_type)))
    blocked = llama_factory.patch_forbidden(spec, model_type)
    if blocked is not None:
        targets = [n for n, _ in model.named_modules() if any(t in n for t in targets) and not any(b in n for b in blocked)]
    return targets


def _resized_vocab(model: nn.Module) -> list[str]:
    """adapter.py: ``resize_vocab`` without additional_target trains the embeddings in full."""
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is e for e in embeddings)})


def lora_kwargs(spec: StackConfig, model: nn.Module) -> dict:
    """The ``LoraConfig`` arguments the stack hands to PEFT for ``model``."""
    kwargs = spec.lora_kwargs()
    if spec.expand == "axolotl-linear":
        extra = spec.placement.target_modules if isinstance(spec.placement.target_modules, list) else [spec.placement.target_modules]
        kwargs["target_modules"] = sorted(set(filter(None, extra)) | _axolotl_linear(model))
    elif spec.expand and spec.expand.startswith("llama-factory"):
        kwargs["target_modules"] = _llama_factory(spec, model)
        if spec.rules.get("resize_vocab") and not spec.modules_to_save:
            kwargs["modules_to_save"] = _resized_vocab(model)
    elif spec.expand == "torchtune":
        kwargs["target_modules"] = torchtune.wrapped(spec)  # full names on the builder's own tree
    elif spec.expand == "mlx-lm":
        kwargs = mlx_lm.shown(spec)
    elif spec.expand == "unsloth":
        from . import unsloth

        unsloth.apply(spec, model, kwargs)
    if spec.stack == "axolotl" and kwargs.get("lora_dropout") and _axolotl_converts(kwargs, model):
        # when PEFT's MoE conversion turns target_modules into expert parameters, axolotl's load_lora
        # patches PEFT's ParamWrapper to build those with dropout 0 (_patch_peft_param_wrapper_dropout),
        # the other layers keeping theirs; PEFT alone refuses. Dropout has no parameters to count.
        kwargs["lora_dropout"] = 0.0
    return kwargs


def _axolotl_converts(kwargs: dict, model: nn.Module) -> bool:
    """axolotl's _peft_will_auto_convert_target_params: no target_parameters given, and PEFT's
    conversion of the target_modules makes some (its schema refuses dropout with given ones)."""
    from peft import LoraConfig

    if kwargs.get("target_parameters"):
        return False
    try:
        config = LoraConfig(**{**kwargs, "lora_dropout": 0.0})
    except (ValueError, TypeError):  # refused: the wrap reports it
        return False
    return bool(converted_parameters(model, config))


def native(spec: StackConfig, model: nn.Module) -> Build:
    """What mlx-lm's own conversion wraps on its model of ``model``'s config, under transformers'
    names (an expert weight for SwitchLinear experts) so the findings read it like PEFT's."""
    got = mlx_lm.resolve(spec, model)
    build = Build(None, refused=got.refused, missed=got.unmatched, native=sorted(got.wrapped), inner=got.inner,
                  expert_keys=got.experts)
    for module, params in got.wrapped.values():
        build.ranks[module.source] = spec.settings.r
        build.params[module.source] = build.params.get(module.source, 0) + params
        if module.experts > 1:
            build.wrapped_params[module.source] = module.source.rsplit(".", 1)[0]
    return build


def _strip_base(name: str) -> str:
    return re.sub(r"\.base_layer\b", "", name)


def wrapped_targets(inner: nn.Module) -> dict[str, tuple[str, object]]:
    """Every adapter of a PEFT-wrapped model (``peft_model.base_model.model``): its target (a
    module name, or ``module.parameter`` for a wrapped parameter) by the wrapper's own name, with
    the wrapper. ``plop train`` compares these with its plan."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.r:
            key = _strip_base(name)
            found[name] = (f"{key}.{module.parameter_name}" if isinstance(module, ParamWrapper) else key, module)
    return found


def _collect(inner: nn.Module, build: Build) -> None:
    """Read the wrapped model: each adapter's rank and trainable parameters, each full copy's size."""
    owners: dict[str, str] = {}
    for name, (key, module) in wrapped_targets(inner).items():
        owners[name] = key
        build.ranks[key] = module.r[ADAPTER]
        if key != _strip_base(name):
            build.wrapped_params[key] = _strip_base(name)
    for pname, param in inner.named_parameters():
        if not param.requires_grad:
            continue
        if ".modules_to_save." in pname:
            copy_of = pname.split(".modules_to_save.")[0]
            build.saved[copy_of] = build.saved.get(copy_of, 0) + param.numel()
            continue
        owner = re.split(r"\.(?:lora_\w+|lora_magnitude_vector)\.", pname)[0]
        if owner in owners:
            build.params[owners[owner]] = build.params.get(owners[owner], 0) + param.numel()
        else:
            build.other += param.numel()


def wrap(model: nn.Module, kwargs: dict) -> Build:
    """``get_peft_model`` on the meta ``model`` (changed in place) with ``kwargs``, whose regexes the
    caller has put through :func:`plop.stacks.reading.check_regexes`; what it wrapped."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model

    try:
        config = LoraConfig(**kwargs)
    except (ValueError, TypeError) as e:
        return Build(None, refused=f"PEFT refuses this LoraConfig: {first_line(e)}")
    build = Build(copy.deepcopy(config))
    try:
        with warnings.catch_warnings(), init_empty_weights():
            warnings.simplefilter("ignore")  # PEFT's own notes; what matters is read off the result
            peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
        build.refused = f"PEFT refuses it: {first_line(e)}"
        return build
    build.converted = peft_model.peft_config[ADAPTER]
    _collect(peft_model.base_model.model, build)
    total = peft_model.get_nb_trainable_parameters()[0]
    if total != build.trainable:  # a trainable parameter plop did not attribute: a plop bug
        raise RuntimeError(f"plop counted {build.trainable:,} trainable parameters, PEFT {total:,}")
    return build
