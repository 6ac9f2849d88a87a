"""unsloth Python snippet, both ways. Arguments: unslothai/unsloth unsloth/models/llama.py
FastLlamaModel.get_peft_model (r, target_modules, lora_alpha, lora_dropout, bias,
use_gradient_checkpointing, random_state, target_parameters; other keyword arguments such as
use_dora, rank_pattern and alpha_pattern are passed on to peft.LoraConfig). It iterates over
target_modules, so a regex string cannot be given; the exact list of module names can. A script
is read with :func:`ast.literal_eval` (literals only), never run."""

from __future__ import annotations

import ast
from typing import Any

from ..errors import ConfigError
from ..placement import LoraSettings, Placement
from .reading import StackConfig, names, number, pattern, targets
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


def read(text: str, source: str) -> StackConfig:
    """The keyword arguments of the script's ``get_peft_model(...)`` call: unsloth hands
    target_modules, target_parameters, r, lora_alpha, lora_dropout and bias to PEFT, and passes
    the others it does not name (use_dora, rank_pattern, alpha_pattern, ...) on to ``LoraConfig``."""
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
    placement = Placement(target_modules=targets(kwargs.get("target_modules"), "target_modules"),
                          target_parameters=names(kwargs.get("target_parameters"), "target_parameters"),
                          rank_pattern=pattern(kwargs, "rank_pattern"), alpha_pattern=pattern(kwargs, "alpha_pattern"))
    settings = LoraSettings(number(kwargs, "r", 16), number(kwargs, "lora_alpha", 16, float),
                            number(kwargs, "lora_dropout", 0.0, float), use_dora=bool(kwargs.get("use_dora")),
                            use_rslora=bool(kwargs.get("use_rslora")))
    return StackConfig(NAME, source, placement, settings, modules_to_save=names(kwargs.get("modules_to_save"),
                                                                                 "modules_to_save"),
                       bias=kwargs.get("bias") or "none")
