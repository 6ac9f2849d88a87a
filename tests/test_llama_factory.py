"""LLaMA-Factory as its own code reads a config: both YAML forms, its freeze table, and its
target-resolving functions run on the meta model beside plop check's.

The tests marked ``stacks`` run llamafactory 0.9.5's own code (``make test-stacks`` installs it with
--no-deps), loaded as benchmarks/stack_agreement.py loads it for the corpus."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from conftest import stack_agreement
from plop.audit import check
from plop.audit.meta import meta_model
from plop.audit.resolve import lora_kwargs
from plop.errors import ConfigError
from plop.stacks import read
from plop.stacks.llama_factory import COMPOSITE, VERSION

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
CORPUS = Path(__file__).parent / "corpus" / "llama_factory"


def fixture(name: str) -> str:
    return str(FIXTURES / f"{name}.json")


@pytest.mark.heavy
def test_the_qwen3_vl_example_trains_the_text_model_only():
    """LLaMA-Factory's own examples/train_lora/qwen3vl_lora_sft.yaml: ``lora_target: all`` on
    Qwen3-VL-4B leaves the vision tower and merger frozen: 36 blocks x 7 projections at rank 8."""
    result = check(CORPUS / "examples" / "train_lora" / "qwen3vl_lora_sft.yaml", fixture("Qwen3-VL-4B-Instruct"))
    assert result.trainable == 16_515_072
    assert not any("visual" in m for m in result.modules) and len(result.modules) == 36 * 7
    assert result.findings == []


def test_the_newer_vlm_types_are_in_the_freeze_table():
    assert {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"} <= set(COMPOSITE)


def test_the_v1_peft_config_form_is_read_with_its_plugin_defaults():
    spec = read({"model": "Qwen/Qwen3-4B", "peft_config": {"name": "lora", "target_modules": "q_proj"}}, "v1.yaml")
    assert (spec.settings.r, spec.settings.alpha, spec.settings.dropout) == (8, 16.0, 0.05)
    assert spec.placement.target_modules == ["q_proj"] and spec.base_model == "Qwen/Qwen3-4B"
    with pytest.raises(ConfigError, match="method 'freeze'; plop check audits LoRA"):
        read({"peft_config": {"name": "freeze"}}, "v1.yaml")


def test_the_classic_form_doubles_the_rank_for_a_missing_or_zero_alpha():
    for alpha in (None, 0):
        spec = read({"finetuning_type": "lora", "lora_rank": 4, "lora_alpha": alpha}, "lf.yaml")
        assert spec.settings.alpha == 8.0 and spec.placement.target_modules == ["all"]
    with pytest.raises(ConfigError, match="resumes the adapter"):
        read({"finetuning_type": "lora", "adapter_name_or_path": "saves/lora"}, "lf.yaml")


# -- against llamafactory's own code (loaded by benchmarks/stack_agreement.py) -----------------------
@pytest.fixture(scope="module")
def lf():
    agreement = stack_agreement("llamafactory")
    with agreement.llama_factory_code() as code:
        yield types.SimpleNamespace(code=code, lora=agreement.llama_factory_lora, agreement=agreement.STACKS["llama_factory"])


@pytest.mark.stacks
def test_composite_table_is_llama_factorys_own_registry(lf):
    """Fails when LLaMA-Factory registers a model type (or changes one) that plop's table lacks."""
    from importlib.metadata import version

    assert version("llamafactory") == VERSION
    theirs = {t: (tuple(c.vision_model_keys), tuple(c.projector_keys), tuple(c.language_model_keys),
                  tuple(c.lora_conflict_keys)) for t, c in lf.code.visual.COMPOSITE_MODELS.items()}
    assert {t: tuple(c) for t, c in COMPOSITE.items()} == theirs


CASES = [
    ("Qwen3-VL-4B-Instruct", {"lora_target": "all"}),
    ("Qwen3-VL-4B-Instruct", {"lora_target": "all", "freeze_vision_tower": False}),
    ("Qwen3-VL-4B-Instruct", {"lora_target": "q_proj,v_proj,linear_fc1", "freeze_multi_modal_projector": False}),
    ("Qwen2.5-VL-7B-Instruct", {"lora_target": "all"}),
    ("gemma-3-4b-it", {"lora_target": "all", "freeze_vision_tower": False, "freeze_language_model": True}),
    ("gemma-3-4b-it", {"lora_target": "q_proj,o_proj"}),
    ("Llama-3.1-8B", {"lora_target": "all"}),
    ("Qwen3-30B-A3B", {"lora_target": "all"}),
    ("Phi-3.5-mini-instruct", {"lora_target": "qkv_proj,gate_up_proj"}),
    ("Qwen3-VL-4B-Instruct", {"peft_config": {"name": "lora", "target_modules": "all"}}),
    ("Llama-3.1-8B", {"peft_config": {"name": "lora", "target_modules": "all"}}),
    ("bert-base-uncased", {"peft_config": {"name": "lora", "target_modules": "all"}}),
]


@pytest.mark.stacks
@pytest.mark.parametrize("name, config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_targets_equal_llama_factorys_own_functions(lf, name, config):
    """find_all_linear_modules and patch_target_modules (v1: the plugin's _find_all_linear_modules)
    pick the same targets as plop check, with the same rank, alpha and dropout."""
    config = config if "peft_config" in config else {"finetuning_type": "lora", **config}
    model = meta_model(fixture(name))
    spec = read(config, "lf.yaml")
    ours, theirs = lora_kwargs(spec, model), lf.lora(lf.code, model, config)
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert (ours["r"], ours["lora_alpha"], ours["lora_dropout"]) == (theirs["r"], theirs["lora_alpha"], theirs["lora_dropout"])


@pytest.mark.stacks
def test_the_published_examples_agree_with_llama_factory(lf):
    """tests/corpus/llama_factory: every examples/**/*lora*.yaml of 0.9.5 with a base config.json."""
    summary = lf.agreement()
    assert summary["configs"] >= 20 and summary["disagree"] == []
