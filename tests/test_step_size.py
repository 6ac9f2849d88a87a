"""How far a run moved the model from its base: each figure equals a direct computation on the same
real PEFT model, is 0 where every B is 0, and is recorded per run by ``plop compare``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_grpo import grpo_config
from tiny_lm import examples, make_model, make_tokenizer

from plop import TrainConfig, compare, diagnose
from plop.finetune.step_size import policy_kl, relative_output_change

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _lora(seed: int = 0, perturbed: bool = True):
    torch.manual_seed(seed)
    model = get_peft_model(make_model(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.1))
    if perturbed:  # a trained adapter: B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def _batch():
    ids = torch.randint(3, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: its last positions must not count
    return {"input_ids": ids, "attention_mask": mask}


def test_relative_output_change_is_the_adapters_share_computed_directly():
    model, batch = _lora(), _batch()
    inputs = {}

    def keep(name):
        def hook(module, args, output) -> None:
            inputs[name] = (args[0], output)
        return hook

    hooks = [m.base_layer.register_forward_hook(keep(n))
             for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    model.eval()
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    delta_sq = base_sq = 0.0
    for name, (x, base) in inputs.items():
        layer = model.get_submodule(name)
        delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        delta_sq += delta.reshape(-1, delta.shape[-1])[real].double().square().sum()
        base_sq += base.reshape(-1, base.shape[-1])[real].double().square().sum()
    model.train()
    # float32 outputs: "output - base" and "B(A x) s" agree to about 1e-9
    assert relative_output_change(model, [batch]) == pytest.approx(float((delta_sq / base_sq).sqrt()), rel=1e-6)
    assert model.training  # the mode it was in comes back
    assert relative_output_change(_lora(perturbed=False), [batch]) == 0.0


def test_policy_kl_is_the_kl_to_a_copy_of_the_base_model():
    base = make_model()
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    sequences = [(torch.randint(3, 90, (11,)), 4), (torch.randint(3, 90, (7,)), 3)]
    total = count = 0.0
    with torch.no_grad():
        for ids, n in sequences:
            p = base(input_ids=ids[None]).logits[0, n - 1:-1].double().log_softmax(-1)
            q = model(input_ids=ids[None]).logits[0, n - 1:-1].double().log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            count += p.shape[0]
    assert policy_kl(model, sequences) == pytest.approx(total / count, rel=1e-9)
    assert policy_kl(_lora(perturbed=False), sequences) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.heavy
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_compare_records_each_run_s_step_size_after_its_first_steps(method, tmp_path):
    tokenizer = make_tokenizer()
    report = diagnose(make_model(), examples(16), tokenizer, n_bootstrap=10)
    config = grpo_config(tmp_path, steps=2) if method == "grpo" else \
        TrainConfig(steps=2, lr=1e-2, batch_size=8, output_dir=str(tmp_path))
    result = compare(make_model(), tokenizer, examples(24), report, seeds=[0], rank=2,
                     placements=["all-linear"], config=config, step_size_steps=1)
    key = "policy_kl" if method == "grpo" else "relative_output_change"
    for row in result.rows:
        assert row.step_size["steps"] == 1 and row.step_size[key] > 0, row.step_size
