"""plop check against axolotl's own code (the stack-axolotl extra, ``make test-stacks``): its
``load_lora`` on the meta model, run as benchmarks/stack_agreement.py runs it for the corpus
(tests/corpus/axolotl), and its output-embedding table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import archs
from conftest import stack_agreement
from plop.stacks.axolotl import OUTPUT_EMBEDDING

CORPUS = Path(__file__).resolve().parent / "corpus" / "axolotl"
CAUSAL = [name for name, arch in archs.ARCHS.items() if arch.kind == "causal"]


def test_corpus_pairs_every_config_with_a_base_config():
    """Every entry names a published example and a config.json that are both in the corpus."""
    index = json.loads((CORPUS / "index.json").read_text())
    assert len(index) >= 50
    for entry in index:
        assert (CORPUS / entry["config"]).is_file() and (CORPUS / entry["model"]).is_file(), entry["name"]
        assert yaml.safe_load((CORPUS / entry["config"]).read_text())["adapter"] in ("lora", "qlora")


@pytest.fixture(scope="module")
def agreement():
    return stack_agreement("axolotl")


@pytest.mark.stacks
def test_output_embedding_is_axolotls_own_table(agreement):
    """Fails when axolotl leaves out another name for any model type transformers registers."""
    from axolotl.loaders.utils import get_linear_embedding_layers
    from transformers import CONFIG_MAPPING

    assert {get_linear_embedding_layers(t)[1] for t in CONFIG_MAPPING} == {OUTPUT_EMBEDDING}


@pytest.mark.stacks
@pytest.mark.parametrize("name", CAUSAL)
def test_target_linear_equals_axolotl_on_every_causal_architecture(tmp_path, agreement, name):
    """lora_target_linear through axolotl's own find_all_linear_names and get_peft_model: the same
    modules and count as plop check (Llama-4's router, an nn.Linear by class, included as axolotl includes it)."""
    archs.config(name).save_pretrained(tmp_path)
    config = tmp_path / "axolotl.yml"
    config.write_text(yaml.safe_dump({"base_model": "tiny", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
                                      "lora_target_linear": True}))
    own = agreement.axolotl_build(config, tmp_path / "config.json")
    ours = agreement.plop_side(config, tmp_path / "config.json", "axolotl")
    assert agreement.compare(ours, own) == (True, None)
    if name == "llama4_text":
        assert "model.layers.0.feed_forward.router" in own["modules"]


@pytest.mark.stacks
@pytest.mark.parametrize("model, config", [
    # explicit expert parameters with dropout: its schema refuses, and so does plop
    ("Qwen3-30B-A3B", {"lora_dropout": 0.05, "lora_target_modules": ["q_proj"],
                       "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}),
    # PEFT converts w1/w3/w2 into expert parameters: load_lora drops their dropout and trains them
    ("Mixtral-8x7B-v0.1", {"lora_dropout": 0.05, "lora_target_modules": ["q_proj", "w1", "w2", "w3"]}),
])
def test_dropout_beside_expert_parameters_is_axolotls(tmp_path, agreement, model, config):
    from peft.tuners.lora.layer import ParamWrapper

    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump({"base_model": model, "adapter": "lora", "lora_r": 8, "lora_alpha": 16, **config}))
    fixture = Path(__file__).resolve().parent / "fixtures" / "model_configs" / f"{model}.json"
    own = agreement.axolotl_build(path, fixture)
    assert not hasattr(ParamWrapper, "_axolotl_dropout_patched")  # plop's side runs on PEFT as shipped
    ours = agreement.plop_side(path, fixture, "axolotl")
    assert agreement.compare(ours, own) == (True, None)
    assert ("error" in own) == ("lora_target_parameters" in config)


@pytest.mark.stacks
@pytest.mark.parametrize("missing", ["lora_r", "lora_alpha"])
def test_a_missing_rank_or_alpha_fails_in_axolotl_and_plop_says_so(tmp_path, agreement, missing):
    """axolotl's schema leaves both None and load_lora hands that to PEFT, which fails."""
    path = tmp_path / "axolotl.yml"
    config = {"base_model": "m", "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj"]}
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != missing}))
    fixture = Path(__file__).resolve().parent / "fixtures" / "model_configs" / "Llama-3.1-8B.json"
    own, ours = agreement.axolotl_build(path, fixture), agreement.plop_side(path, fixture, "axolotl")
    assert "error" in own and f"set {missing}" in ours["error"]


@pytest.mark.stacks
def test_the_published_examples_agree_with_axolotl(agreement):
    """tests/corpus/axolotl: axolotl's LoRA examples whose base config.json the corpus holds."""
    summary = agreement.STACKS["axolotl"]()
    assert summary["configs"] >= 50
    assert summary["agree"] == summary["configs"], summary["disagree"]
