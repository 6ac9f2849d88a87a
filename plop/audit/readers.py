"""Read an adapter config of any stack into an :class:`AdapterSpec` (torch-free, untrusted input).

Configs are read like reports: under a size cap (:func:`plop.files.fsio.read_text_capped`, checked on
the open file before a byte is read), YAML with the safe loader, JSON with the standard parser,
and a Python file (unsloth) parsed with :mod:`ast` and never run. Regexes are checked by
:func:`plop.files.untrusted.check_regex` in :mod:`plop.audit.resolve`, where they are used.

Every stack's keys, and what the stack does with them before PEFT sees them, are cited at the
reader that applies them.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import default_alpha
from ..config import targets as parse_targets
from ..errors import ConfigError
from ..files.fsio import read_text_capped
from .spec import AdapterSpec

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # training configs are kilobytes; this leaves room for long regex lists


def _load_text(path: Path) -> Any:
    text = read_text_capped(path, MAX_CONFIG_BYTES)
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if path.suffix == ".py":
        return text
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None


def _list(value: Any, key: str) -> list[str] | None:
    """A list of names from a list, or from a comma-separated string (LLaMA-Factory, CLIs)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key} must be a list of module names, not {type(value).__name__}")


def _targets(value: Any, key: str) -> list[str] | str | None:
    """PEFT's ``target_modules``: a list of suffixes, or one string that PEFT full-matches as a regex."""
    if value is None or isinstance(value, str):
        return value
    return _list(value, key)


def _number(data: Mapping, key: str, default: Any, kind: type = int) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key} must be a{'n integer' if kind is int else ' number'}, not {value!r}")
    return kind(value)


def _pattern(data: Mapping, key: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must map module-name patterns to numbers")
    return {k: _number(value, k, None, float if "alpha" in key else int) for k in value}


def _layers(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key} must be a layer index or a list of them")
    return values


# -- PEFT ------------------------------------------------------------------------------------
@functools.cache
def lora_config_keys() -> frozenset[str]:
    """The field names of the installed PEFT's ``LoraConfig`` dataclass, read from its source
    (``LoraConfig`` and the ``PeftConfig``/``PeftConfigMixin`` it extends) rather than imported:
    importing PEFT costs seconds and pulls in torch and bitsandbytes, which ``plop export``'s
    read-back must not. A test holds this equal to ``dataclasses.fields(LoraConfig)``."""
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("reading a PEFT adapter_config.json needs peft", "pip install peft")
    root = Path(spec.submodule_search_locations[0])
    keys: set[str] = set()
    for path, classes in ((root / "config.py", {"PeftConfigMixin", "PeftConfig"}),
                          (root / "tuners" / "lora" / "config.py", {"LoraConfig"})):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name in classes:
                keys.update(st.target.id for st in node.body if isinstance(st, ast.AnnAssign)
                            and isinstance(st.target, ast.Name) and "ClassVar" not in ast.unparse(st.annotation))
    return frozenset(keys)


def read_peft(data: Mapping, source: str) -> AdapterSpec:
    """``adapter_config.json`` as ``LoraConfig.save_pretrained`` writes it. Keys PEFT's installed
    ``LoraConfig`` does not have are refused: PEFT would drop them with a warning and train
    something else."""
    if data.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{source} is a {data.get('peft_type')} adapter; plop check audits LoRA adapters")
    known = lora_config_keys()
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)} is not a key of peft.LoraConfig "
                          f"(expected keys such as r, lora_alpha, target_modules, target_parameters, rank_pattern)")
    return AdapterSpec(
        "peft", source, target_modules=_targets(data.get("target_modules"), "target_modules"),
        target_parameters=_list(data.get("target_parameters"), "target_parameters"),
        r=_number(data, "r", 8), lora_alpha=_number(data, "lora_alpha", 8, float),
        lora_dropout=_number(data, "lora_dropout", 0.0, float),
        rank_pattern=_pattern(data, "rank_pattern"), alpha_pattern=_pattern(data, "alpha_pattern"),
        modules_to_save=_list(data.get("modules_to_save"), "modules_to_save"),
        layers_to_transform=_layers(data.get("layers_to_transform"), "layers_to_transform"),
        layers_pattern=data.get("layers_pattern"), exclude_modules=_targets(data.get("exclude_modules"), "exclude_modules"),
        use_dora=bool(data.get("use_dora")), use_rslora=bool(data.get("use_rslora")), bias=data.get("bias") or "none",
        base_model=data.get("base_model_name_or_path"))


# -- axolotl ---------------------------------------------------------------------------------
def read_axolotl(data: Mapping, source: str) -> AdapterSpec:
    """axolotl-ai-cloud/axolotl src/axolotl/loaders/adapter.py, _build_peft_lora_config (main,
    2025): ``lora_target_modules`` (list or regex string) and ``lora_target_parameters`` go to
    ``peft.LoraConfig`` as they are; ``lora_target_linear: true`` adds every module whose class
    name holds "Linear" by its last name component, minus the output embedding
    (find_all_linear_names); ``peft_layers_to_transform``/``peft_layers_pattern``,
    ``lora_modules_to_save``, ``lora_exclude_modules``, ``lora_rank_pattern``/``lora_alpha_pattern``,
    ``peft_use_dora``/``peft_use_rslora``; bias is always "none"."""
    if data.get("adapter") not in (None, "lora", "qlora"):
        raise ConfigError(f"{source}: adapter {data.get('adapter')!r} is not LoRA; plop check audits lora/qlora")
    return AdapterSpec(
        "axolotl", source, target_modules=_targets(data.get("lora_target_modules"), "lora_target_modules") or [],
        target_parameters=_list(data.get("lora_target_parameters"), "lora_target_parameters"),
        r=_number(data, "lora_r", 8), lora_alpha=_number(data, "lora_alpha", 16, float),
        lora_dropout=_number(data, "lora_dropout", 0.0, float),
        rank_pattern=_pattern(data, "lora_rank_pattern"), alpha_pattern=_pattern(data, "lora_alpha_pattern"),
        modules_to_save=_list(data.get("lora_modules_to_save"), "lora_modules_to_save") or None,
        layers_to_transform=_layers(data.get("peft_layers_to_transform"), "peft_layers_to_transform"),
        layers_pattern=data.get("peft_layers_pattern"),
        exclude_modules=_targets(data.get("lora_exclude_modules"), "lora_exclude_modules") or None,
        use_dora=bool(data.get("peft_use_dora")), use_rslora=bool(data.get("peft_use_rslora")),
        base_model=data.get("base_model"), expand="axolotl-linear" if data.get("lora_target_linear") else None)


# -- LLaMA-Factory ---------------------------------------------------------------------------
def read_llama_factory(data: Mapping, source: str) -> AdapterSpec:
    """hiyouga/LLaMA-Factory src/llamafactory/hparams/finetuning_args.py (LoraArguments:
    lora_rank 8, lora_alpha None = 2 x rank, lora_dropout 0, lora_target "all" split on commas,
    additional_target = modules_to_save, freeze_vision_tower and freeze_multi_modal_projector
    true) and src/llamafactory/model/adapter.py: ``all`` becomes find_all_linear_modules, and on
    a multimodal model every target goes through patch_target_modules (model_utils/visual.py)."""
    if data.get("finetuning_type", "lora") != "lora":
        raise ConfigError(f"{source}: finetuning_type {data.get('finetuning_type')!r}; plop check audits LoRA")
    rank = _number(data, "lora_rank", 8)
    targets = _list(data.get("lora_target", "all"), "lora_target") or ["all"]
    return AdapterSpec(
        "llama-factory", source, target_modules=targets, r=rank,
        lora_alpha=_number(data, "lora_alpha", rank * 2, float), lora_dropout=_number(data, "lora_dropout", 0.0, float),
        modules_to_save=_list(data.get("additional_target"), "additional_target"),
        use_dora=bool(data.get("use_dora")), use_rslora=bool(data.get("use_rslora")),
        base_model=data.get("model_name_or_path"), expand="llama-factory-all" if "all" in targets else "llama-factory",
        stack={"freeze_vision_tower": data.get("freeze_vision_tower", True) is not False,
               "freeze_multi_modal_projector": data.get("freeze_multi_modal_projector", True) is not False})


# -- TRL -------------------------------------------------------------------------------------
def read_trl(data: Mapping, source: str) -> AdapterSpec:
    """huggingface/trl trl/trainer/model_config.py (ModelConfig: lora_r 16, lora_alpha 32,
    lora_dropout 0.05; __post_init__ turns a one-element ``lora_target_modules`` list into its
    string, which PEFT then full-matches as a regex) and trl/trainer/utils.py get_peft_config
    (bias "none"; ``lora_target_modules`` None leaves PEFT's default for the model type)."""
    targets = _targets(data.get("lora_target_modules"), "lora_target_modules")
    notes = []
    if isinstance(targets, list) and len(targets) == 1:
        notes.append(f"TRL turns the one-element lora_target_modules {targets} into the string "
                     f"{targets[0]!r}, which PEFT full-matches as a regex against whole module names")
        targets = targets[0]
    return AdapterSpec(
        "trl", source, target_modules=targets,
        target_parameters=_list(data.get("lora_target_parameters"), "lora_target_parameters"),
        r=_number(data, "lora_r", 16), lora_alpha=_number(data, "lora_alpha", 32, float),
        lora_dropout=_number(data, "lora_dropout", 0.05, float),
        modules_to_save=_list(data.get("lora_modules_to_save"), "lora_modules_to_save"),
        use_dora=bool(data.get("use_dora")), use_rslora=bool(data.get("use_rslora")),
        base_model=data.get("model_name_or_path"), notes=notes)


# -- torchtune -------------------------------------------------------------------------------
TORCHTUNE_ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}


def read_torchtune(data: Mapping, source: str) -> AdapterSpec:
    """pytorch/torchtune torchtune/models/llama3/_component_builders.py (lora_llama3:
    ``lora_attn_modules`` from LORA_ATTN_MODULES q_proj, k_proj, v_proj, output_proj, one
    ``apply_lora_to_mlp`` switch for w1/w2/w3, ``apply_lora_to_output``, every layer; lora_rank,
    lora_alpha, lora_dropout 0, use_dora). torchtune builds its own modules: the names here are
    the Hugging Face ones that its checkpoint converter maps them to (output_proj -> o_proj)."""
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{source}: a torchtune config needs a model: block with lora_attn_modules")
    attention = _list(model.get("lora_attn_modules"), "model.lora_attn_modules") or []
    unknown = [a for a in attention if a not in TORCHTUNE_ATTENTION]
    if unknown:
        raise ConfigError(f"{source}: lora_attn_modules {unknown} are not torchtune's "
                          f"(expected some of {', '.join(TORCHTUNE_ATTENTION)})")
    checkpoint = data.get("checkpointer") if isinstance(data.get("checkpointer"), Mapping) else {}
    return AdapterSpec(
        "torchtune", source, target_modules=[TORCHTUNE_ATTENTION[a] for a in attention],
        r=_number(model, "lora_rank", 8), lora_alpha=_number(model, "lora_alpha", 16, float),
        lora_dropout=_number(model, "lora_dropout", 0.0, float), use_dora=bool(model.get("use_dora")),
        base_model=checkpoint.get("checkpoint_dir"), expand="torchtune",
        stack={"mlp": bool(model.get("apply_lora_to_mlp")), "output": bool(model.get("apply_lora_to_output")),
               "component": str(model.get("_component_", ""))})


# -- mlx-lm ----------------------------------------------------------------------------------
MLX_DEFAULT_LAYERS = 16


def read_mlx_lm(data: Mapping, source: str) -> AdapterSpec:
    """ml-explore/mlx-lm mlx_lm/lora.py CONFIG_DEFAULTS (fine_tune_type lora, num_layers 16,
    lora_parameters rank 8, scale 20.0, dropout 0.0) and mlx_lm/tuner/utils.py
    linear_to_lora_layers: LoRA goes on the last ``num_layers`` blocks (-1: all), on the block-
    relative paths in ``keys``, or without keys on every linear layer of those blocks."""
    if data.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise ConfigError(f"{source}: fine_tune_type {data.get('fine_tune_type')!r}; plop check audits lora/dora")
    params = data.get("lora_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    rank = _number(params, "rank", 8)
    return AdapterSpec(
        "mlx-lm", source, target_modules=_list(params.get("keys"), "lora_parameters.keys"), r=rank,
        lora_alpha=_number(params, "scale", 20.0, float) * rank, lora_dropout=_number(params, "dropout", 0.0, float),
        use_dora=data.get("fine_tune_type") == "dora", base_model=data.get("model"), expand="mlx-lm",
        stack={"num_layers": _number(data, "num_layers", MLX_DEFAULT_LAYERS)})


# -- unsloth (a Python snippet: parsed, never run) ---------------------------------------------
def read_unsloth(text: str, source: str) -> AdapterSpec:
    """The keyword arguments of the ``get_peft_model(...)`` call in an unsloth script, read with
    :func:`ast.literal_eval` (literals only); unslothai/unsloth unsloth/models/llama.py
    FastLlamaModel.get_peft_model hands target_modules, r, lora_alpha, lora_dropout, bias to PEFT."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ConfigError(f"{source}: not valid Python (line {e.lineno}); plop parses it and never runs it") from None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
             getattr(n.func, "attr", getattr(n.func, "id", None)) == "get_peft_model"]
    if not calls:
        raise ConfigError(f"{source}: no get_peft_model(...) call to read")
    kwargs: dict[str, Any] = {}
    for kw in calls[0].keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            continue  # a variable or an expression: unsloth's own default stands in for it
    return AdapterSpec(
        "unsloth", source, target_modules=_targets(kwargs.get("target_modules"), "target_modules"),
        r=_number(kwargs, "r", 16), lora_alpha=_number(kwargs, "lora_alpha", 16, float),
        lora_dropout=_number(kwargs, "lora_dropout", 0.0, float), bias=kwargs.get("bias") or "none",
        use_rslora=bool(kwargs.get("use_rslora")), modules_to_save=_list(kwargs.get("modules_to_save"), "modules_to_save"))


# -- which stack -------------------------------------------------------------------------------
READERS: dict[str, Callable[[Any, str], AdapterSpec]] = {
    "peft": read_peft, "axolotl": read_axolotl, "llama-factory": read_llama_factory, "trl": read_trl,
    "torchtune": read_torchtune, "mlx-lm": read_mlx_lm, "unsloth": read_unsloth,
}
# the keys that say which stack wrote a config, checked in this order (axolotl and TRL share
# lora_target_modules; axolotl names the model base_model, TRL model_name_or_path)
SIGNATURES = (
    ("peft", ("peft_type", "base_model_name_or_path")),
    ("llama-factory", ("lora_target", "finetuning_type", "additional_target")),
    ("axolotl", ("adapter", "base_model", "lora_target_linear", "peft_layers_to_transform")),
    ("mlx-lm", ("lora_parameters", "fine_tune_type")),
    ("trl", ("use_peft", "lora_target_modules", "lora_r", "lora_task_type")),
)


def detect_flavour(data: Any, source: str) -> str:
    """The stack that wrote ``data``, from the keys only it uses."""
    if isinstance(data, str):
        return "unsloth"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, not {type(data).__name__}")
    model = data.get("model")
    if isinstance(model, Mapping) and ("lora_attn_modules" in model or "apply_lora_to_mlp" in model):
        return "torchtune"
    for flavour, keys in SIGNATURES:
        if any(k in data for k in keys):
            return flavour
    if "target_modules" in data and "r" in data:
        return "peft"
    raise ConfigError(
        f"{source}: not a LoRA config plop knows: expected a PEFT adapter_config.json (peft_type, target_modules), "
        "or an axolotl (lora_target_modules / lora_target_linear), LLaMA-Factory (lora_target), TRL "
        "(lora_target_modules, use_peft), torchtune (model.lora_attn_modules) or mlx-lm (lora_parameters) YAML")


def read_config(path: str | Path, flavour: str | None = None) -> AdapterSpec:
    """The :class:`AdapterSpec` of a config file or PEFT adapter folder; ``flavour`` forces the stack."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_config.json"
    data = _load_text(path)
    flavour = flavour or detect_flavour(data, str(path))
    if flavour not in READERS:
        raise ConfigError(f"unknown flavour {flavour!r}; choose from {', '.join(READERS)}")
    if flavour != "unsloth" and not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings, not {type(data).__name__}")
    return READERS[flavour](data, str(path))


def inline_spec(target_modules: list[str] | str | None, target_parameters: list[str] | str | None = None,
                rank_pattern: list[str] | str | None = None, rank: int = 8) -> AdapterSpec:
    """``--target-modules a,b`` (text as :func:`plop.config.targets` reads it), ``--target-parameters``,
    ``--rank-pattern key=r,key=r``: as typed, or as the command line parsed them."""
    targets = parse_targets(target_modules) if isinstance(target_modules, str) else target_modules
    pattern = {}
    for item in _list(rank_pattern, "--rank-pattern") or []:
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.isdigit():
            raise ConfigError(f"--rank-pattern takes KEY=RANK pairs, not {item!r}")
        pattern[key] = int(value)
    if targets is None and target_parameters is None:
        raise ConfigError("give a CONFIG file, or --target-modules / --target-parameters")
    return AdapterSpec("inline", "command line", target_modules=targets,
                       target_parameters=_list(target_parameters, "--target-parameters"),
                       r=rank, lora_alpha=default_alpha(rank), rank_pattern=pattern)
