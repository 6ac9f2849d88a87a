"""unsloth Python snippet, both ways. Arguments: unslothai/unsloth unsloth/models/llama.py
FastLlamaModel.get_peft_model (r, target_modules, lora_alpha, lora_dropout, bias,
use_gradient_checkpointing, random_state, target_parameters; other keyword arguments such as
use_dora, rank_pattern and alpha_pattern are passed on to peft.LoraConfig). It iterates over
target_modules, so a regex string cannot be given; the exact list of module names can. A script
is parsed with :mod:`ast` and never run: constants, names bound once, and + - * // on them.
Source lines cited are unsloth 2026.10.9 and unsloth_zoo 2026.10.9 (PyPI)."""

from __future__ import annotations

import ast
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, layers, names, number, pattern, targets
from .result import ExportResult, finish
from .target import Target

NAME = "unsloth"


def claims(data: Any) -> bool:
    return isinstance(data, str)  # a Python file; every other stack's config is a mapping


def write(t: Target) -> ExportResult:
    dropout, zeroed = t.dropout("unsloth")
    kwargs = {
        "r": t.rank,
        "target_modules": t.list_targets(),
        "lora_alpha": t.alpha,
        "lora_dropout": dropout,
        "bias": "none",  # anything else disables unsloth's fused kernels
        "use_gradient_checkpointing": "unsloth",
        "random_state": 3407,
    }
    optional = {"use_dora": t.settings.use_dora or None, "use_rslora": t.settings.use_rslora or None, "rank_pattern": t.rank_pattern,
                "alpha_pattern": t.alpha_pattern, "target_parameters": t.target_parameters}
    kwargs.update({k: v for k, v in optional.items() if v})
    arguments = "".join(f"    {k}={v!r},\n" for k, v in kwargs.items())
    lines = [
        "from unsloth import FastLanguageModel",
        "",
        f"model, tokenizer = FastLanguageModel.from_pretrained({t.report.model.get('id')!r}, max_seq_length=2048)",
        f"model = FastLanguageModel.get_peft_model(\n    model,\n{arguments})",
    ]
    if t.settings.loraplus:  # no config key anywhere: LoRA+ is an optimizer (peft.optimizers.create_loraplus_optimizer)
        lines += [
            "",
            "import torch",
            "from peft.optimizers import create_loraplus_optimizer",
            "",
            "optimizer = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=2e-4,",
            f"                                      loraplus_lr_ratio={t.settings.loraplus_ratio!r})",
            "# trainer = SFTTrainer(model=model, ..., optimizers=(optimizer, None))",
        ]
    exact = t.is_exact(kwargs["target_modules"])
    result = finish(t, NAME, kwargs, "unsloth_lora.py", zeroed, exact, body="")
    header = "".join(f"# warning: {w}\n" for w in result.warnings)
    result.text = header + "\n".join(lines) + "\n"
    return result


# the arguments that decide what trains (unsloth/models/llama.py FastLlamaModel.get_peft_model and
# unsloth/models/vision.py FastBaseModel.get_peft_model, unsloth 2026.10.9); the rest (random_state,
# max_seq_length, use_gradient_checkpointing, ...) plop never needs
READ = ("r", "target_modules", "lora_alpha", "lora_dropout", "bias", "modules_to_save", "target_parameters",
        "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "ensure_weight_tying", "finetune_vision_layers",
        "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules", "finetune_audio_layers",
        "layers_to_transform", "layers_pattern", "finetune_last_n_layers")
# llama.py _DEFAULT_TARGET_MODULES: FastLanguageModel's target_modules when none is given
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# unsloth/models/_utils.py EMBEDDING_MODULES / _redirect_embedding_targets: LoRA on these never
# trains (its fused loss reads lm_head.weight), so they move into modules_to_save, full copies
EMBEDDINGS = ("embed_tokens", "lm_head")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b}


def _bound_once(tree: ast.AST) -> dict[str, ast.expr]:
    """Names the script binds exactly once, by a plain ``name = value``: those plop may read."""
    stores: dict[str, int] = {}
    for node in ast.walk(tree):
        bound = [node.id] if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load) else \
            [node.arg] if isinstance(node, ast.arg) else \
            [(a.asname or a.name).split(".")[0] for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else \
            [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []
        for name in bound:
            stores[name] = stores.get(name, 0) + 1
    return {n.targets[0].id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name) and stores.get(n.targets[0].id) == 1}


def _value(node: ast.expr, bound: dict[str, ast.expr], seen: tuple[str, ...] = ()) -> Any:
    """A constant, a list/tuple/dict of them, a name bound once to one, or + - * // on numbers;
    anything else raises ValueError: plop never guesses what a script computes."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, bound, seen) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_value(k, bound, seen): _value(v, bound, seen) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in bound and node.id not in seen:
        return _value(bound[node.id], bound, (*seen, node.id))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(_value(node.operand, bound, seen))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_number(_value(node.left, bound, seen)), _number(_value(node.right, bound, seen)))
    raise ValueError(ast.unparse(node))


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(repr(value))
    return value


def _arguments(call: ast.Call, bound: dict[str, ast.expr], source: str) -> dict[str, Any]:
    if any(kw.arg is None for kw in call.keywords):
        raise ConfigError(f"{source}: get_peft_model(**...) hides its arguments; plop cannot know what it trains")
    kwargs = {}
    for kw in call.keywords:
        if kw.arg in READ:
            try:
                kwargs[kw.arg] = _value(kw.value, bound)
            except (ValueError, ZeroDivisionError):
                raise ConfigError(f"{source}, line {kw.value.lineno}: plop cannot know {kw.arg}="
                                  f"{ast.unparse(kw.value)[:60]} (it reads constants, names bound once, "
                                  "and + - * // on them; it never runs the script)") from None
    return kwargs


def _embeddings_moved(kwargs: dict[str, Any]) -> list[str]:
    """llama.py get_peft_model -> _redirect_embedding_targets (unsloth/models/_utils.py): list
    entries whose last name is embed_tokens or lm_head leave target_modules for modules_to_save."""
    listed = kwargs.get("target_modules")
    if not isinstance(listed, list):
        return []
    moved = [t for t in dict.fromkeys(listed) if isinstance(t, str) and t.rsplit(".", 1)[-1] in EMBEDDINGS]
    kwargs["target_modules"] = [t for t in dict.fromkeys(listed) if t not in moved]
    saved = kwargs.get("modules_to_save")
    saved = [saved] if isinstance(saved, str) else list(saved or [])
    kwargs["modules_to_save"] = saved + [t for t in moved if t not in saved] if moved or saved else None
    return moved


def read(text: str, source: str) -> StackConfig:
    """The arguments of the script's ``get_peft_model(...)`` call, its names resolved where they
    are bound once, and unsloth's own rewriting of them before PEFT (the ones that need the
    model, :mod:`plop.audit.unsloth`)."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ConfigError(f"{source}: not valid Python (line {e.lineno}); plop parses it and never runs it") from None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
             getattr(n.func, "attr", getattr(n.func, "id", None)) == "get_peft_model"]
    if not calls:
        raise ConfigError(f"{source}: no get_peft_model(...) call to read")
    kwargs = _arguments(calls[0], _bound_once(tree), source)
    if kwargs.get("finetune_last_n_layers") is not None:  # llama.py 4666: counts the model's own blocks
        raise ConfigError(f"{source}: finetune_last_n_layers picks blocks by unsloth's own layer count, which plop "
                          "does not model: give layers_to_transform")
    owner = getattr(getattr(calls[0].func, "value", None), "id", None)
    # FastVisionModel / FastModel (vision.py) turn no list, or "all-linear", into get_peft_regex's
    # regex; FastLanguageModel (llama.py) has its seven projections as the default
    regex = owner in ("FastVisionModel", "FastModel") and kwargs.get("target_modules") in (None, "all-linear")
    if owner not in ("FastVisionModel", "FastModel", "FastLanguageModel") and "target_modules" not in kwargs:
        raise ConfigError(f"{source}: {owner or 'get_peft_model'}.get_peft_model without target_modules: "
                          "plop cannot know which unsloth class sets the default")
    kwargs.setdefault("target_modules", None if regex else list(DEFAULT_TARGETS))
    moved = _embeddings_moved(kwargs)
    placement = Placement(target_modules=None if regex else targets(kwargs.get("target_modules"), "target_modules"),
                          target_parameters=names(kwargs.get("target_parameters"), "target_parameters"),
                          rank_pattern=pattern(kwargs, "rank_pattern"), alpha_pattern=pattern(kwargs, "alpha_pattern"),
                          layers_to_transform=layers(kwargs.get("layers_to_transform"), "layers_to_transform"),
                          layers_pattern=kwargs.get("layers_pattern"))
    settings = LoraSettings(number(kwargs, "r", 16), number(kwargs, "lora_alpha", 16, float),
                            number(kwargs, "lora_dropout", 0.0, float), use_dora=bool(kwargs.get("use_dora")),
                            use_rslora=bool(kwargs.get("use_rslora")))
    flags = {k: bool(kwargs.get(k, k != "finetune_audio_layers")) for k in READ if k.startswith("finetune_") and
             k != "finetune_last_n_layers"}
    notes = [f"unsloth moved {', '.join(moved)} from target_modules to modules_to_save: trained in full, "
             "not by LoRA (unsloth/models/_utils.py _redirect_embedding_targets)"] if moved else []
    return StackConfig(NAME, source, placement, settings,
                       modules_to_save=names(kwargs.get("modules_to_save"), "modules_to_save"),
                       bias=kwargs.get("bias") or "none", expand="unsloth", notes=notes,
                       rules={"regex": regex, "flags": flags, "ensure_weight_tying": kwargs.get("ensure_weight_tying")})
