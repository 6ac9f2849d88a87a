"""unsloth scripts as unsloth rewrites them before PEFT: names bound once, its default targets, the
expert parameters it adds on MoE models, get_peft_regex for vision notebooks, and embed_tokens /
lm_head moved into full copies. unsloth needs a GPU, so PEFT itself, on the arguments the cited
unsloth source hands it, is the truth here (plop.audit.unsloth cites each rule)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from torch import nn

from plop.audit import check
from plop.errors import ConfigError
from plop.stacks import read
from test_check import codes, fixture, module_names, peft_truth

pytestmark = pytest.mark.heavy  # trains several runs or builds large meta models: `make test`, not the fast tier

CALL = "from unsloth import {cls}\nmodel = {cls}.get_peft_model(model, {args})\n"


def script(tmp_path: Path, args: str, cls: str = "FastLanguageModel", before: str = "") -> Path:
    path = tmp_path / "train.py"
    path.write_text(before + CALL.format(cls=cls, args=args))
    return path


def test_names_bound_once_are_resolved():
    spec = read("lora_rank = 32\nmodules = ['q_proj', 'v_proj']\n" + CALL.format(
        cls="FastLanguageModel", args="r = lora_rank, lora_alpha = lora_rank*2, target_modules = modules,"
        " max_seq_length = max_seq_length"), "train.py", "unsloth")
    assert (spec.settings.r, spec.settings.alpha) == (32, 64.0)
    assert spec.placement.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("before, args", [
    ("lora_rank = 16\nlora_rank = 32\n", "r = lora_rank"),           # bound twice
    ("", "r = int(input())"),                                        # a call
    ("", "r = 2 ** 40"),                                             # an operator plop does not evaluate
    ("", "**settings"),
])
def test_what_plop_cannot_evaluate_is_one_line(before, args):
    with pytest.raises(ConfigError, match="plop cannot know") as e:
        read(before + CALL.format(cls="FastLanguageModel", args=args), "train.py", "unsloth")
    assert "\n" not in str(e.value)


def test_fast_language_model_defaults_to_its_seven_projections(tmp_path):
    result = check(script(tmp_path, "r = 8"), fixture("Llama-3.1-8B"))
    names = module_names("Llama-3.1-8B", lambda n, m: n.endswith(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    assert result.trainable == peft_truth("Llama-3.1-8B", names, r=8)[1]


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "gpt-oss-20b"])
def test_gate_up_proj_becomes_the_expert_parameters(tmp_path, name):
    """unsloth's get_moe_target_parameters: gate_up_proj / down_proj in the list add the fused
    expert weights, so no "matches nothing" and the experts count."""
    listed = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    result = check(script(tmp_path, f"r = 8, lora_alpha = 16, target_modules = {listed}"), fixture(name))
    assert "target-miss" not in codes(result)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert result.trainable == peft_truth(name, listed, experts, r=8, lora_alpha=16)[1]
    assert any(m.endswith("experts.gate_up_proj") for m in result.modules)


def _language_block_linear(n: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and re.fullmatch(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+", n) is not None


def test_vision_notebook_without_targets_uses_get_peft_regex(tmp_path):
    """FastVisionModel without target_modules: get_peft_regex, here on the language model only."""
    args = "finetune_vision_layers = False, finetune_language_layers = True, r = 16, lora_alpha = 16"
    result = check(script(tmp_path, args, "FastVisionModel"), fixture("Qwen2.5-VL-7B-Instruct"))
    assert "peft-refuses" not in codes(result)
    names = module_names("Qwen2.5-VL-7B-Instruct", _language_block_linear)
    assert set(result.modules) == set(names) and result.trainable == peft_truth("Qwen2.5-VL-7B-Instruct", names, r=16)[1]


def test_vision_layers_join_by_default(tmp_path):
    result = check(script(tmp_path, "r = 16", "FastVisionModel"), fixture("Qwen2.5-VL-7B-Instruct"))
    vision = module_names("Qwen2.5-VL-7B-Instruct", lambda n, m: isinstance(m, nn.Linear) and
                          re.fullmatch(r"model\.visual\.blocks\.\d+\.(attn|mlp)\.\w+", n) is not None)
    names = module_names("Qwen2.5-VL-7B-Instruct", _language_block_linear) + vision
    assert set(result.modules) == set(names) and len(vision) == 32 * 5


CPT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def test_continued_pretraining_trains_embeddings_as_full_copies(tmp_path):
    result = check(script(tmp_path, f"r = 128, lora_alpha = 32, target_modules = {CPT}"), fixture("Llama-3.1-8B"))
    names = module_names("Llama-3.1-8B", lambda n, m: n.endswith(tuple(CPT[:7])))
    assert result.saved_params == 2 * 128_256 * 4096
    assert result.trainable == peft_truth("Llama-3.1-8B", names, r=128, lora_alpha=32,
                                          modules_to_save=["embed_tokens", "lm_head"])[1]
    assert "stack-rule" in codes(result) and "head-or-embeddings" not in codes(result)


def test_a_tied_head_is_one_trained_matrix(tmp_path):
    result = check(script(tmp_path, f"r = 8, target_modules = {CPT}"), fixture("Qwen3-VL-4B-Instruct"))
    assert result.saved_params == 151_936 * 2560 and "save-miss" not in codes(result)


CORPUS = Path(__file__).parent / "corpus" / "unsloth"
ENTRIES = json.loads((CORPUS / "index.json").read_text())


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_published_notebooks_raise_no_false_error(entry):
    """unslothai/notebooks' get_peft_model cells on their base models: nothing the notebook asks
    for is reported missing or refused (the false errors of issue 34)."""
    result = check(CORPUS / entry["config"], CORPUS / entry["model"])
    assert result.exit_code == 0, [f.message for f in result.errors]


def test_the_moe_notebook_trains_its_experts_at_its_own_rank():
    """Qwen3_MoE.ipynb: r = lora_rank (32), lora_alpha = lora_rank*2, gate_up_proj listed."""
    result = check(CORPUS / "snippets" / "Qwen3_MoE.py", fixture("Qwen3-30B-A3B"))
    listed = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"]
    truth = peft_truth("Qwen3-30B-A3B", listed, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=32,
                       lora_alpha=64)
    assert result.trainable == truth[1] and result.lora_config["r"] == 32 and result.lora_config["lora_alpha"] == 64


def test_layers_to_transform_reaches_peft(tmp_path):
    result = check(script(tmp_path, "r = 8, target_modules = ['q_proj'], layers_to_transform = [0, 1]"),
                   fixture("Llama-3.1-8B"))
    assert result.modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
