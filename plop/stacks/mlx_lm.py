"""mlx-lm LoRA YAML (``mlx_lm.lora --config FILE``), both ways, and what mlx-lm's own model of a
config.json gets from it (:func:`resolve`; mlx-lm builds its own modules, PEFT never sees them).

Keys: ml-explore/mlx-lm mlx_lm/lora.py (CONFIG_DEFAULTS: fine_tune_type lora|dora, num_layers 16,
lora_parameters {rank 8, scale 20.0, dropout 0.0}) and mlx_lm/tuner/utils.py linear_to_lora_layers:
LoRA goes on the last ``num_layers`` blocks (0 or -1: all), on the paths inside a block that equal
one of ``keys`` exactly (not a suffix match), or without keys on every Linear, SwitchLinear and
Embedding path of the blocks, MoE routers included; scale multiplies B·A directly, so it is
alpha / rank."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number
from .result import ExportResult, finish
from .target import Target, layer_path

NAME = "mlx-lm"
MLX_LM_VERSION = "0.32.2"  # the version these rules and TREES are read from (pyproject's stack-mlx extra)
DEFAULT_LAYERS = 16
DEFAULT_PARAMETERS = {"rank": 8, "dropout": 0.0, "scale": 20.0}  # mlx_lm/lora.py CONFIG_DEFAULTS


def claims(data: Any) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in ("lora_parameters", "fine_tune_type"))


def write(t: Target) -> ExportResult:
    paths = t.by_layer_path()
    chosen_layers = set().union(*paths.values())
    lowest = min(chosen_layers, default=t.n_layers)
    shape = TREES.get(t.report.model.get("model_type"))
    # paths inside a block as mlx-lm's model of this type names them (its SwitchLinear experts
    # included); modules outside the blocks keep their full name, matched at model level
    keys = sorted({key for path, layers in paths.items()
                   for key in (inner_paths(path, shape) if shape and layers else [path])})
    emitted = {m.name for m in t.report.modules
               if layer_path(m.name, m.layer)[0] in paths and (m.layer is None or m.layer >= lowest)}
    # the chosen expert weights are among the paths, as SwitchLinear keys, where plop knows the tree
    experts = shape is not None and any(m.experts for m in t.report.modules if m.name in set(t.modules))
    warnings, exact = t.gaps("mlx-lm", loraplus=False, patterns=False, parameters=experts, rslora=False)
    if shape is None:
        warnings.append(f"plop does not know mlx-lm's own module tree for model_type "
                        f"{t.report.model.get('model_type')!r}: the keys follow transformers' names")
    if emitted != set(t.modules):
        warnings.append(f"mlx-lm takes one set of keys for the last num_layers={t.n_layers - lowest} blocks: "
                        f"{len(emitted) - len(t.modules)} modules beyond the recommendation get adapters too")
    settings = {
        "fine_tune_type": "dora" if t.settings.use_dora else "lora",
        "num_layers": t.n_layers - lowest,
        "lora_parameters": {
            "keys": keys,
            "rank": t.rank,
            "scale": t.alpha / t.rank,
            "dropout": t.settings.dropout,
        },
    }
    return finish(t, NAME, settings, "mlx-lora.yaml", warnings, exact and emitted == set(t.modules),
                  comment="keys are paths inside a block of mlx-lm's own model, compared exactly")


# mlx_lm/lora.py adds this float resolver to PyYAML's SafeLoader, so "2e1" and "1e-5" (no dot, a
# string under YAML 1.1) reach mlx-lm as floats; plop's loader does not, so it applies it here
_MLX_FLOAT = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?)$""", re.X)


def _as_mlx_reads(values: Mapping) -> dict:
    """``values`` with the strings mlx-lm's loader reads as floats turned into floats."""
    return {k: float(v.replace("_", "")) if isinstance(v, str) and _MLX_FLOAT.match(v) else v for k, v in values.items()}


def read(data: Mapping, source: str) -> StackConfig:
    data = _as_mlx_reads(data)
    if data.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise ConfigError(f"{source}: fine_tune_type {data.get('fine_tune_type')!r}; plop check audits lora/dora")
    params = data.get("lora_parameters", DEFAULT_PARAMETERS)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    params = _as_mlx_reads(params)
    # mlx_lm/lora.py main: a config's lora_parameters replaces CONFIG_DEFAULTS' whole mapping, and
    # linear_to_lora_layers reads config["rank"], ["scale"], ["dropout"]: a missing one is a KeyError
    lacking = [k for k in DEFAULT_PARAMETERS if k not in params]
    if lacking:
        raise ConfigError(f"{source}: lora_parameters lacks {', '.join(lacking)}: mlx-lm replaces its defaults with "
                          f"this mapping and stops with KeyError {lacking[0]!r} (it never reads alpha)")
    rank = number(params, "rank", None)
    settings = LoraSettings(rank, number(params, "scale", None, float) * rank, number(params, "dropout", None, float),
                            use_dora=data.get("fine_tune_type") == "dora")
    notes = [f"mlx-lm {MLX_LM_VERSION} does not read lora_layers (num_layers replaced it): "
             f"it adapts the last {DEFAULT_LAYERS} blocks"] if "lora_layers" in data and "num_layers" not in data else []
    return StackConfig(NAME, source, Placement(target_modules=names(params.get("keys"), "lora_parameters.keys")),
                       settings, base_model=data.get("model"), expand="mlx-lm",
                       rules={"num_layers": number(data, "num_layers", DEFAULT_LAYERS)}, notes=notes)


# -- what mlx-lm's own model of a config.json holds, and what its LoRA conversion wraps ----------
@dataclass(frozen=True)
class Tree:
    """Where mlx-lm's model of one model type names things otherwise than transformers' (checked
    against mlx-lm's own classes by tests/test_mlx_lm_native.py): the MoE block (``moe``), its
    stacked experts (``experts``: SwitchLinear ``gate_proj``/``up_proj``/``down_proj`` there),
    whether transformers stores ``gate_up_proj`` as (experts, in, out), when the model has an
    ``lm_head`` module (``tied``: unless tie_word_embeddings; ``always``, ``never``), and the paths
    inside a block that mlx-lm holds as something its conversion cannot wrap (``unwrappable``)."""

    moe: str = "mlp"
    experts: str = "switch_mlp"
    transposed: bool = False
    head: str = "tied"
    unwrappable: tuple[str, ...] = ()


# mlx_lm/models/<type>.py at mlx-lm 0.32.2 ("mistral" loads mlx-lm's llama, MODEL_REMAPPING)
TREES: dict[str, Tree] = {
    **{t: Tree() for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "starcoder2", "olmo2")},
    **{t: Tree(head="never") for t in ("gemma", "gemma2", "cohere")},
    "phi": Tree(head="always"),
    "mixtral": Tree(moe="block_sparse_moe"),
    "qwen2_moe": Tree(head="always"),
    "qwen3_moe": Tree(),
    "olmoe": Tree(),
    "gpt_oss": Tree(experts="experts", transposed=True, head="always"),
    # deepseek_v3.py: kv_b_proj becomes MultiLinear embed_q / unembed_out, the router a bare weight (MoEGate)
    "deepseek_v3": Tree(head="always", unwrappable=("self_attn.kv_b_proj", "mlp.gate")),
}
# model types mlx-lm has a model for that plop does not map (yet), each with why; plop says so and stops
UNMAPPED: dict[str, str] = {
    "gemma3_text": "mlx-lm drops lm_head when the checkpoint's weights lack one (sanitize), which config.json does not say",
    "gemma3": "mlx-lm builds the text model alone, under language_model, unmapped",
    "gpt2": "transformers holds Conv1D projections (transposed), mlx-lm Linear ones, unmapped",
    "gpt_neox": "mlx-lm's blocks are model.h, transformers' gpt_neox.layers, unmapped",
    "gptj": "mlx-lm's blocks are model.h, transformers' transformer.h, unmapped",
    "jamba": "mlx-lm's Mamba mixers and router are unmapped",
    "llama4_text": "mlx-lm's llama4_text is dense (every block a feed_forward MLP of intermediate_size_mlp, "
                   "no experts, no router), unlike transformers' Llama-4 MoE, unmapped",
    "mamba": "mlx-lm's Mamba mixers are unmapped",
    "llava": "mlx-lm loads it as mistral3 and builds the text model alone, unmapped",
    "qwen2_vl": "mlx-lm builds the text model alone, under language_model, unmapped",
}


@dataclass(frozen=True)
class Native:
    """One module of mlx-lm's model that its LoRA conversion can wrap: its path there, its block
    (None outside ``model.layers``) and path inside it, the transformers module or expert weight
    plop reports it under, and its shape (``experts`` > 1: a SwitchLinear)."""

    name: str
    block: int | None
    inner: str
    source: str
    fan_in: int
    fan_out: int
    experts: int = 1

    def lora_params(self, rank: int, dora: bool) -> int:
        """mlx_lm/tuner/lora.py: lora_a (in, r) and lora_b (r, out), per expert for a SwitchLinear;
        tuner/dora.py adds the magnitude ``m``, one per output (an embedding's rows)."""
        return self.experts * rank * (self.fan_in + self.fan_out) + (self.fan_out if dora else 0)


@dataclass
class NativeBuild:
    """What ``linear_to_lora_layers`` wraps (each module with its trainable parameters), the keys
    that match no module, the paths inside a block there are, and mlx-lm's refusal, if it refuses."""

    wrapped: dict[str, tuple[Native, int]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    inner: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)  # the SwitchLinear paths inside a block
    refused: str | None = None


def blocks(model: Any) -> tuple[str, int]:
    """The text model's block list (the ``...layers`` with the most indices) and its length."""
    counts: dict[str, set[int]] = {}
    for name, _ in model.named_modules():
        match = re.match(r"^(.*?\blayers)\.(\d+)$", name)
        if match and "vision" not in match.group(1) and "visual" not in match.group(1):
            counts.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not counts:
        return "", 0
    prefix = max(counts, key=lambda p: len(counts[p]))
    return prefix, len(counts[prefix])


def shown(spec: StackConfig) -> dict[str, Any]:
    """The settings mlx-lm converts with, as ``plop check`` shows them."""
    keys = spec.placement.target_modules
    return {"keys": keys if keys is not None else "every Linear, SwitchLinear and Embedding path in a block",
            "num_layers": spec.rules.get("num_layers", DEFAULT_LAYERS), "rank": spec.settings.r,
            "scale": spec.settings.alpha / spec.settings.r, "dropout": spec.settings.dropout,
            "fine_tune_type": "dora" if spec.settings.use_dora else "lora"}


def chosen_blocks(num_layers: int, n: int) -> range:
    """``model.layers[-max(num_layers, 0):]``: the last ``num_layers`` blocks, all of them for 0 or -1."""
    return range(0 if num_layers <= 0 else max(n - num_layers, 0), n)


def tree(model_type: str | None) -> Tree:
    """The :class:`Tree` of ``model_type``, or one line saying plop does not know it."""
    if model_type not in TREES:
        why = UNMAPPED.get(model_type, f"mlx-lm {MLX_LM_VERSION} may have no model for it")
        raise ConfigError(f"plop does not know mlx-lm's own module tree for model_type {model_type!r} ({why}); "
                          f"it knows {', '.join(sorted(TREES))}")
    return TREES[model_type]


EXPERT_WEIGHTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # transformers -> SwitchLinear


def inner_paths(inner: str, shape: Tree) -> list[str]:
    """The paths inside an mlx-lm block that hold what transformers holds at ``inner`` inside its
    block (a module, or an expert weight such as ``mlp.experts.gate_up_proj``); none where mlx-lm
    holds something its conversion cannot wrap."""
    if inner in shape.unwrappable:
        return []
    if inner.split(".", 1)[0] == "mlp":  # only MoE blocks are named otherwise
        inner = shape.moe + inner[3:]
    owner, _, leaf = inner.rpartition(".")
    if owner.rpartition(".")[2] == "experts" and leaf in EXPERT_WEIGHTS:
        base = ".".join(filter(None, [owner.rpartition(".")[0], shape.experts]))
        return [f"{base}.{proj}" for proj in EXPERT_WEIGHTS[leaf]]
    return [inner]


def native_modules(model: Any, model_type: str | None) -> list[Native]:
    """Every module mlx-lm's model of this config can wrap, read off the transformers meta model:
    2-D weights are Linear (Embedding by class), a transformers MoE's ``gate_up_proj`` /
    ``down_proj`` are mlx-lm's SwitchLinear gate/up/down projections."""
    shape = tree(model_type)
    prefix, _ = blocks(model)
    config = getattr(model, "config", None)
    head = {"always": True, "never": False}.get(shape.head, not getattr(config, "tie_word_embeddings", False))
    found = []
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        match = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", name) if prefix else None
        if match is None:
            if "weight" in params and params["weight"].ndim == 2 and (name != "lm_head" or head):
                found.append(Native(name, None, name, name, params["weight"].shape[1], params["weight"].shape[0]))
            continue
        block, inner = int(match.group(1)), match.group(2)
        for leaf, weight in params.items():
            if weight.ndim == 3 and leaf in EXPERT_WEIGHTS and {"gate_up_proj", "down_proj"} <= set(params):
                found += _experts(f"{prefix}.{block}", block, f"{inner}.{leaf}", params, shape)
            elif leaf == "weight" and weight.ndim == 2:
                found += [Native(f"{prefix}.{block}.{path}", block, path, name, weight.shape[1], weight.shape[0])
                          for path in inner_paths(inner, shape)]
    return found


def _experts(block_name: str, block: int, inner: str, params: dict, shape: Tree) -> list[Native]:
    """The SwitchLinear modules of one transformers expert weight (``gate_up_proj`` holds two)."""
    up = params["gate_up_proj"].shape
    n, hidden, inter = (up[0], up[1], up[2] // 2) if shape.transposed else (up[0], up[2], up[1] // 2)
    fan_in, fan_out = (inter, hidden) if inner.endswith("down_proj") else (hidden, inter)
    return [Native(f"{block_name}.{path}", block, path, f"{block_name}.{inner}", fan_in, fan_out, n)
            for path in inner_paths(inner, shape)]


def reached(spec: StackConfig, modules: list[tuple[str, int | None]], model_type: str | None) -> set[str]:
    """Which of a report's modules and expert weights (name, layer; transformers' names) ``spec``'s
    keys reach in mlx-lm's model, by :func:`resolve`'s rule on names alone (no shapes needed)."""
    shape = tree(model_type)
    n = 1 + max((layer for _, layer in modules if layer is not None), default=-1)
    chosen = set(chosen_blocks(spec.rules.get("num_layers", DEFAULT_LAYERS), n))
    keys = spec.placement.target_modules
    out = set()
    for name, layer in modules:
        paths = inner_paths(layer_path(name, layer)[0], shape) if layer is not None else []
        if (layer in chosen and paths and (keys is None or set(paths) & set(keys))) or name in (keys or ()):
            out.add(name)
    return out


def resolve(spec: StackConfig, model: Any) -> NativeBuild:
    """mlx_lm/tuner/utils.py linear_to_lora_layers on mlx-lm's model of ``model``'s config:
    ``keys`` are compared exactly with paths inside each of the last ``num_layers`` blocks, then
    with full paths in the whole model; without keys, every path inside any block that holds a
    Linear, SwitchLinear or Embedding (routers included). lora.py's train refuses more
    ``num_layers`` than blocks, and tuner/utils.py DoRA on a SwitchLinear."""
    modules = native_modules(model, getattr(getattr(model, "config", None), "model_type", None))
    _, n = blocks(model)
    num = spec.rules.get("num_layers", DEFAULT_LAYERS)
    build = NativeBuild(inner=sorted({m.inner for m in modules if m.block is not None}),
                        experts=sorted({m.inner for m in modules if m.experts > 1}))
    if num > n:
        build.refused = f"mlx-lm refuses it: Requested to train {num} layers but the model only has {n} layers"
        return build
    keys = spec.placement.target_modules
    if keys is None:
        keys = set(build.inner)
    chosen = set(chosen_blocks(num, n))
    for m in modules:
        if (m.block in chosen and m.inner in keys) or m.name in keys:
            if spec.settings.use_dora and m.experts > 1:
                build.refused = "mlx-lm refuses it: SwitchLinear doesn't support DoRA yet"
                return build
            build.wrapped[m.name] = (m, m.lora_params(spec.settings.r, spec.settings.use_dora))
    build.unmatched = [k for k in spec.placement.target_modules or ()
                       if not any(k in (m.inner, m.name) for m in modules)]
    return build
