"""unsloth Python snippet. Arguments: unslothai/unsloth unsloth/models/llama.py
FastLlamaModel.get_peft_model (r, target_modules, lora_alpha, lora_dropout, bias,
use_gradient_checkpointing, random_state, target_parameters; other keyword arguments such as
use_dora, rank_pattern and alpha_pattern are passed on to peft.LoraConfig). It iterates over
target_modules, so a regex string cannot be given; the exact list of module names can."""

from __future__ import annotations

from .result import ExportResult, finish
from .target import Target


def export(t: Target) -> ExportResult:
    kwargs = {
        "r": t.rank,
        "target_modules": t.list_targets(),
        "lora_alpha": t.alpha,
        "lora_dropout": t.settings.dropout,
        "bias": "none",  # anything else disables unsloth's fused kernels
        "use_gradient_checkpointing": "unsloth",
        "random_state": 3407,
    }
    optional = {"use_dora": t.settings.use_dora or None, "rank_pattern": t.rank_pattern,
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
    result = finish(t, "unsloth", kwargs, "unsloth_lora.py", [], exact, body="")
    header = "".join(f"# warning: {w}\n" for w in result.warnings)
    result.text = header + "\n".join(lines) + "\n"
    return result
