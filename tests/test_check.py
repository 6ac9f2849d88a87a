"""``plop check`` against real components: published model configs built on the meta device,
each stack's config files, and PEFT's own get_peft_model as the truth for what is wrapped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper

from plop.audit import EXIT_ERRORS, check, inline_spec
from plop.audit.meta import meta_model

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
# total parameters published on each model card, in billions (the fixtures must rebuild them)
PUBLISHED_BILLIONS = {
    "Llama-3.1-8B": 8.03, "Qwen3-30B-A3B": 30.5, "Qwen3-235B-A22B": 235.0, "gpt-oss-20b": 20.9,
    "Mixtral-8x7B-v0.1": 46.7, "DeepSeek-V3": 671.0, "Qwen2.5-VL-7B-Instruct": 8.29, "gemma-3-4b-it": 4.3,
    "Qwen3-VL-4B-Instruct": 4.44, "Llama-4-Scout-17B-16E": 109.0,
    "Phi-3.5-mini-instruct": 3.82, "t5-base": 0.223, "bert-base-uncased": 0.110,
}


def fixture(name: str) -> str:
    return str(FIXTURES / f"{name}.json")


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_configs_build_on_meta_at_their_published_size(name):
    model = meta_model(fixture(name))
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


# -- the truth: PEFT wrapping exactly the modules a stack's documented rule names ---------------
def peft_truth(name: str, target_modules, target_parameters=None, **kwargs) -> tuple[set[str], int]:
    """What a real get_peft_model wraps on a fresh meta model, and PEFT's trainable count."""
    model = meta_model(fixture(name))
    with init_empty_weights():
        wrapped = get_peft_model(model, LoraConfig(target_modules=target_modules,
                                                   target_parameters=target_parameters, **kwargs))
    names = set()
    for n, m in wrapped.base_model.model.named_modules():
        if isinstance(m, LoraLayer):
            base = re.sub(r"\.base_layer\b", "", n)
            names.add(f"{base}.{m.parameter_name}" if isinstance(m, ParamWrapper) else base)
    return names, wrapped.get_nb_trainable_parameters()[0]


def module_names(name: str, keep) -> list[str]:
    """Full names of the meta model's modules that ``keep(name, module)`` selects."""
    return [n for n, m in meta_model(fixture(name)).named_modules() if n and keep(n, m)]


def assert_predicts(result, truth: tuple[set[str], int]) -> None:
    assert set(result.modules) == truth[0]
    assert result.trainable == truth[1]


def write(tmp_path: Path, filename: str, data: dict) -> Path:
    path = tmp_path / filename
    path.write_text(json.dumps(data) if filename.endswith(".json") else yaml.safe_dump(data))
    return path


# -- prediction: each flavour, on ten published models ----------------------------------------
def _suffix(*ends):
    return lambda n, m: n.endswith(tuple(f".{e}" for e in ends))


def test_peft_adapter_config_llama_with_rank_pattern(tmp_path):
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"v_proj": 32}, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write(adapter, "adapter_config.json", config)
    result = check(adapter, fixture("Llama-3.1-8B"))
    names = module_names("Llama-3.1-8B", _suffix("q_proj", "v_proj"))
    assert_predicts(result, peft_truth("Llama-3.1-8B", names, r=16, rank_pattern={"v_proj": 32}))
    assert {r.type: r.ranks for r in result.roles if r.adapted} == {"q_proj": [16], "v_proj": [32]}
    assert result.findings == [] and result.exit_code == 0



def test_lora_config_keys_read_from_source_are_peft_s_own_fields():
    """The adapter_config.json reader refuses unknown keys without importing PEFT: the keys it reads
    off PEFT's source are exactly the installed ``LoraConfig``'s dataclass fields."""
    import dataclasses

    from plop.stacks.peft import lora_config_keys

    assert lora_config_keys() == {f.name for f in dataclasses.fields(LoraConfig)}
    assert {"target_modules", "rank_pattern", "peft_type", "base_model_name_or_path"} <= lora_config_keys()

@pytest.mark.parametrize("name, targets", [
    ("Phi-3.5-mini-instruct", ["qkv_proj", "o_proj"]),
    ("t5-base", ["q", "v"]),
])
def test_peft_list_targets(tmp_path, name, targets):
    path = write(tmp_path, "adapter_config.json", {"peft_type": "LORA", "r": 8, "target_modules": targets})
    result = check(path, fixture(name))
    assert_predicts(result, peft_truth(name, module_names(name, _suffix(*targets))))


def test_peft_regex_on_bert(tmp_path):
    regex = r".*attention\.self\.(query|value)"
    result = check(write(tmp_path, "adapter_config.json", {"r": 8, "target_modules": regex}), fixture("bert-base-uncased"))
    names = module_names("bert-base-uncased", lambda n, m: re.fullmatch(regex, n) is not None)
    assert len(names) == 24
    assert_predicts(result, peft_truth("bert-base-uncased", names))


def test_peft_expert_parameters_on_gpt_oss(tmp_path):
    config = {"r": 8, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    result = check(write(tmp_path, "adapter_config.json", config), fixture("gpt-oss-20b"))
    params = [f"model.layers.{i}.mlp.experts.{p}" for i in range(24) for p in ("gate_up_proj", "down_proj")]
    assert_predicts(result, peft_truth("gpt-oss-20b", module_names("gpt-oss-20b", _suffix("q_proj")), params))
    assert not [f for f in result.findings if f.code == "experts-frozen"]


def test_axolotl_lora_target_linear_on_mixtral(tmp_path):
    """axolotl find_all_linear_names: every Linear by its last name, the output embedding aside."""
    from torch import nn

    config = {"base_model": "mistralai/Mixtral-8x7B-v0.1", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
              "lora_target_linear": True}
    result = check(write(tmp_path, "axolotl.yml", config), fixture("Mixtral-8x7B-v0.1"))
    names = module_names("Mixtral-8x7B-v0.1", lambda n, m: isinstance(m, nn.Linear) and n != "lm_head")
    assert_predicts(result, peft_truth("Mixtral-8x7B-v0.1", names))
    assert [f.code for f in result.findings] == ["experts-frozen"]


@pytest.mark.heavy
def test_llama4_routed_experts_are_seen_frozen_and_then_adapted(tmp_path):
    """Llama-4's experts (Llama4TextExperts, ~97B of Scout's 109B) predate transformers'
    experts decorator: the attention-and-MLP list leaves them frozen, which plop now says, and
    target_parameters on them counts what PEFT wraps."""
    from torch import nn

    name = "Llama-4-Scout-17B-16E"
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {"base_model": "meta-llama/Llama-4-Scout-17B-16E", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
              "lora_target_modules": linear, "lora_target_parameters": None}
    result = check(write(tmp_path, "axolotl.yml", config), fixture(name))
    assert_predicts(result, peft_truth(name, module_names(name, lambda n, m: isinstance(m, nn.Linear)
                                                          and n.rsplit(".", 1)[-1] in linear)))
    (frozen,) = [f for f in result.findings if f.code == "experts-frozen"]
    assert "the routed experts get no adapter: 91 % of the block weights" in frozen.message
    params = [f"language_model.model.layers.{i}.feed_forward.experts.{p}" for i in range(48)
              for p in ("gate_up_proj", "down_proj")]
    config["lora_target_parameters"] = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
    result = check(write(tmp_path, "axolotl.yml", config), fixture(name))
    assert_predicts(result, peft_truth(name, module_names(name, lambda n, m: isinstance(m, nn.Linear)
                                                          and n.rsplit(".", 1)[-1] in linear), params))
    assert not [f for f in result.findings if f.code == "experts-frozen"]


def test_axolotl_expert_parameters_on_qwen3_moe(tmp_path):
    """axolotl's schema refuses dropout beside lora_target_parameters; at dropout 0 it trains them."""
    config = {"base_model": "Qwen/Qwen3-30B-A3B", "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    with pytest.raises(ValueError, match="axolotl refuses lora_dropout 0.05 with lora_target_parameters"):
        check(write(tmp_path, "axolotl.yml", config), fixture("Qwen3-30B-A3B"))
    config["lora_dropout"] = 0.0
    result = check(write(tmp_path, "axolotl.yml", config), fixture("Qwen3-30B-A3B"))
    params = [f"model.layers.{i}.mlp.experts.{p}" for i in range(48) for p in ("gate_up_proj", "down_proj")]
    names = module_names("Qwen3-30B-A3B", _suffix("q_proj", "k_proj", "v_proj", "o_proj"))
    assert_predicts(result, peft_truth("Qwen3-30B-A3B", names, params))
    assert result.findings == []


def test_axolotl_dropout_on_experts_that_peft_converts(tmp_path):
    """Mixtral's w1/w3/w2 in lora_target_modules become expert parameters by PEFT's own conversion;
    axolotl then builds those adapters without dropout (PEFT alone would refuse) and trains them."""
    config = {"base_model": "mistralai/Mixtral-8x7B-v0.1", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
              "lora_dropout": 0.05,
              "lora_target_modules": ["q_proj", "w1", "w2", "w3"]}
    result = check(write(tmp_path, "axolotl.yml", config), fixture("Mixtral-8x7B-v0.1"))
    truth = peft_truth("Mixtral-8x7B-v0.1", config["lora_target_modules"], r=8, lora_dropout=0.0)
    assert {n for n in truth[0] if ".experts." in n} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(32) for p in ("gate_up_proj", "down_proj")}
    assert_predicts(result, truth)
    assert result.exit_code == 0


@pytest.mark.heavy
def test_llama_factory_all_on_qwen2_5_vl_leaves_the_vision_tower_frozen(tmp_path):
    """LLaMA-Factory: lora_target all = every linear module outside the frozen vision tower and
    projector (freeze_vision_tower, freeze_multi_modal_projector default true), lm_head aside."""
    from torch import nn

    config = {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "finetuning_type": "lora", "lora_target": "all"}
    result = check(write(tmp_path, "lf.yaml", config), fixture("Qwen2.5-VL-7B-Instruct"))
    names = module_names("Qwen2.5-VL-7B-Instruct",
                         lambda n, m: isinstance(m, nn.Linear) and "visual" not in n and n != "lm_head")
    assert_predicts(result, peft_truth("Qwen2.5-VL-7B-Instruct", names, lora_alpha=16))
    assert not [f for f in result.findings if f.code == "vision-hit"]


def test_llama_factory_names_on_gemma3_skip_the_vision_tower(tmp_path):
    config = {"model_name_or_path": "google/gemma-3-4b-it", "finetuning_type": "lora", "lora_target": "q_proj,v_proj"}
    result = check(write(tmp_path, "lf.yaml", config), fixture("gemma-3-4b-it"))
    names = module_names("gemma-3-4b-it", lambda n, m: n.endswith((".q_proj", ".v_proj")) and "vision_tower" not in n)
    assert_predicts(result, peft_truth("gemma-3-4b-it", names))


def _trl_config(path: Path):
    from trl import ModelConfig, TrlParser
    from trl.trainer.utils import get_peft_config

    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(["--config", str(path)])
    return get_peft_config(model_args)


@pytest.mark.heavy
def test_trl_through_trl_itself_on_qwen3_235b(tmp_path):
    config = {"model_name_or_path": "Qwen/Qwen3-235B-A22B", "use_peft": True, "lora_r": 8,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    path = write(tmp_path, "trl.yaml", config)
    trl = _trl_config(path)
    result = check(path, fixture("Qwen3-235B-A22B"))
    assert_predicts(result, peft_truth("Qwen3-235B-A22B", trl.target_modules, r=trl.r, lora_alpha=trl.lora_alpha,
                                       lora_dropout=trl.lora_dropout))
    assert [f.code for f in result.findings] == ["experts-frozen"]


def test_torchtune_switches_on_llama(tmp_path):
    """torchtune: the chosen attention projections and, with apply_lora_to_mlp, all of w1/w2/w3, in
    every layer of the model the builder builds (tests/test_torchtune_stack.py checks it against torchtune)."""
    config = {"model": {"_component_": "torchtune.models.llama3_1.lora_llama3_1_8b",
                        "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                        "apply_lora_to_output": False, "lora_rank": 8, "lora_alpha": 16}}
    result = check(write(tmp_path, "tt.yaml", config))
    hf = json.loads(Path(fixture("Llama-3.1-8B")).read_text())
    h, i = hf["hidden_size"], hf["intermediate_size"]
    kv = hf["num_key_value_heads"] * h // hf["num_attention_heads"]
    assert result.exit_code == 0
    assert set(result.modules) == {f"layers.{n}.{m}" for n in range(hf["num_hidden_layers"])
                                   for m in ("attn.q_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")}
    assert result.trainable == hf["num_hidden_layers"] * 8 * (2 * (h + h) + (h + kv) + 3 * (h + i))


@pytest.mark.parametrize("name, keys, num_layers, n_layers", [
    ("Llama-3.1-8B", ["self_attn.q_proj", "self_attn.v_proj"], 16, 32),
    ("Phi-3.5-mini-instruct", None, 8, 32),
])
def test_mlx_lm_keys_on_the_last_num_layers(tmp_path, name, keys, num_layers, n_layers):
    """mlx-lm: keys (paths inside a block; none = every linear layer of the block) on the last num_layers blocks."""
    from torch import nn

    params = {"rank": 8, "scale": 2.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    result = check(write(tmp_path, "mlx.yaml", {"model": "x", "num_layers": num_layers, "lora_parameters": params}),
                   fixture(name))
    last = {str(i) for i in range(n_layers - num_layers, n_layers)}
    names = module_names(name, lambda n, m: isinstance(m, nn.Linear) and n.startswith("model.layers.")
                         and n.split(".")[2] in last and (keys is None or n.endswith(tuple(keys))))
    assert_predicts(result, peft_truth(name, names))
    left_out = [f for f in result.findings if f.code == "layers-left-out"]
    assert len(left_out) == 1 and f"layers 0-{n_layers - num_layers - 1} get no adapter" in left_out[0].message


def test_mlx_lm_571_hugging_face_expert_keys_match_nothing_in_mlx_lm(tmp_path):
    """ml-explore/mlx-lm#571: mlx-lm's Qwen3-MoE holds its experts as mlp.switch_mlp.*, so keys with
    transformers' expert names reach nothing and it trains attention only, "6.685M" in the issue's
    log (tests/test_mlx_lm_native.py checks the count against mlx-lm's own build)."""
    keys = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.experts.0.{p}_proj" for p in ("up", "down", "gate")]
    config = {"fine_tune_type": "lora", "num_layers": -1,
              "lora_parameters": {"keys": keys, "rank": 8, "scale": 2.0, "dropout": 0.0}}
    result = check(write(tmp_path, "mlx.yaml", config), fixture("Qwen3-30B-A3B"))
    assert result.trainable == 6_684_672 and result.exit_code == EXIT_ERRORS
    (miss,) = result.errors
    assert miss.code == "target-miss" and all(repr(k) in miss.message for k in keys[4:])
    assert "mlp.switch_mlp.up_proj" in miss.message


# -- traps: each flagged, a clean config raises nothing -----------------------------------------
def codes(result) -> list[str]:
    return [f.code for f in result.findings]


def test_clean_config_raises_nothing():
    result = check(inline_spec("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"), fixture("Llama-3.1-8B"))
    assert result.findings == [] and result.exit_code == 0
    assert result.adapted_share == pytest.approx(1.0)


def test_silent_miss_is_an_error(tmp_path):
    """LLaMA-Factory #43: W_pack exists on Baichuan, not on Llama; PEFT trains q_proj alone."""
    config = {"model_name_or_path": "x", "finetuning_type": "lora", "lora_target": "q_proj,W_pack"}
    result = check(write(tmp_path, "lf.yaml", config), fixture("Llama-3.1-8B"))
    assert codes(result) == ["target-miss"] and "'W_pack'" in result.findings[0].message
    assert result.exit_code == EXIT_ERRORS
    assert result.trainable == peft_truth("Llama-3.1-8B", ["q_proj"])[1]  # what PEFT really trains


def test_frozen_experts_say_how_much_stays_untouched():
    result = check(inline_spec("q_b_proj,kv_b_proj,o_proj"), fixture("DeepSeek-V3"))
    (frozen,) = [f for f in result.findings if f.code == "experts-frozen"]
    model = meta_model(fixture("DeepSeek-V3"))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3)
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.ndim >= 2)
    assert f"{100 * experts / blocks:.0f} % of the block weights" in frozen.message
    assert result.exit_code == 0


@pytest.mark.heavy
def test_router_wrapped_by_all_linear_on_qwen3_moe(tmp_path):
    result = check(write(tmp_path, "adapter_config.json", {"r": 8, "target_modules": "all-linear"}), fixture("Qwen3-30B-A3B"))
    assert "router-wrapped" in codes(result) and "peft-conversion" in codes(result)
    assert any(m.endswith("mlp.gate.weight") for m in result.modules)
    assert_predicts(result, peft_truth("Qwen3-30B-A3B", "all-linear"))


@pytest.mark.parametrize("name, targets", [("Qwen2.5-VL-7B-Instruct", "v_proj,up_proj,down_proj"),
                                           ("gemma-3-4b-it", "q_proj,v_proj")])
def test_vision_tower_hit_by_suffixes(name, targets):
    result = check(inline_spec(targets), fixture(name))
    (hit,) = [f for f in result.findings if f.code == "vision-hit"]
    vision = [m for m in result.modules if "visual" in m or "vision_tower" in m]
    assert vision and f"{len(vision)} modules of the vision tower" in hit.message


def test_rank_pattern_key_that_matches_nothing():
    result = check(inline_spec("q_proj,v_proj", rank_pattern="qkv_proj=32,v_proj=16"), fixture("Llama-3.1-8B"))
    assert codes(result) == ["pattern-miss"] and "'qkv_proj'" in result.findings[0].message


def test_trl_one_element_collapse(tmp_path):
    path = write(tmp_path, "trl.yaml", {"model_name_or_path": "x", "use_peft": True, "lora_target_modules": ["v_proj"]})
    trl = _trl_config(path)
    assert trl.target_modules == "v_proj"  # TRL itself collapsed it
    with pytest.raises(ValueError, match="not found in the base model"):
        peft_truth("Llama-3.1-8B", trl.target_modules)
    result = check(path, fixture("Llama-3.1-8B"))
    assert codes(result) == ["peft-refuses", "stack-rule"] and result.exit_code == EXIT_ERRORS
    assert "one-element" in result.findings[1].message


def test_modules_to_save_copy_is_sized(tmp_path):
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    result = check(write(tmp_path, "adapter_config.json", config), fixture("Llama-3.1-8B"))
    assert_predicts(result, peft_truth("Llama-3.1-8B", ["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    (saved,) = [f for f in result.findings if f.code == "modules-to-save"]
    assert f"{128256 * 4096:,} parameters" in saved.message


def test_peft_refusal_is_an_error():
    """Mixtral w1 without w3: PEFT's MoE conversion refuses the half of a fused pair."""
    with pytest.raises(ValueError, match="without also targeting"):
        peft_truth("Mixtral-8x7B-v0.1", ["q_proj", "w1"])
    result = check(inline_spec("q_proj,w1"), fixture("Mixtral-8x7B-v0.1"))
    assert codes(result) == ["peft-refuses"] and "without also targeting w3" in result.findings[0].message


# -- unsloth scripts are parsed, never run; a report weighs the placement by NFN ---------------
def test_unsloth_script_is_parsed_not_run(tmp_path):
    script = tmp_path / "train.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom unsloth import FastLanguageModel\n"
                      "model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0,\n"
                      "    target_modules=['q_proj', 'v_proj', 'gate_proj', 'up_proj', 'down_proj'], bias='none')\n")
    result = check(script, fixture("Llama-3.1-8B"))
    assert not marker.exists()
    assert result.flavour == "unsloth" and codes(result) == ["unsloth-slow-path"]
    assert "fused QKV kernel needs LoRA on all of q_proj, k_proj, v_proj, not only q_proj, v_proj" in result.findings[0].message
    names = module_names("Llama-3.1-8B", _suffix("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    assert_predicts(result, peft_truth("Llama-3.1-8B", names, r=16))


def test_report_weighs_the_budget_by_nfn(tmp_path):
    from conftest import make_batches, make_llama
    from plop import diagnose

    model = make_llama()
    report = diagnose(model, make_batches(16, 16), rank=8, n_bootstrap=50, top_k=2)
    model.config.save_pretrained(tmp_path / "model")
    ranked = sorted(report.types, key=lambda t: t.position)
    worst = ranked[-1].type  # the highest-NFN type: all of the budget lands off plop's choice
    result = check(inline_spec(worst, rank=8), tmp_path / "model", report=report)
    b = result.by_nfn
    assert b["budget"] == ranked[-1].lora_params_per_rank * 8 == result.adapter_params
    assert b["share_on_recommended"] == 0.0 and b["share_on_low_nfn_half"] == 0.0
    affordable = [t.type for t in ranked if t.lora_params_per_rank * 8 <= b["budget"]]
    assert b["same_budget_types"][0] == affordable[0]  # the lowest-NFN type the budget buys
    best = check(inline_spec(",".join(report.recommendation.types), rank=8), tmp_path / "model", report=report)
    assert best.by_nfn["share_on_recommended"] == 1.0


def test_head_adapted_and_a_copy_of_nothing(tmp_path):
    config = {"r": 8, "target_modules": ["q_proj", "lm_head"], "modules_to_save": ["score"]}
    result = check(write(tmp_path, "adapter_config.json", config), fixture("Llama-3.1-8B"))
    assert codes(result) == ["save-miss", "head-or-embeddings"]
    assert "lm_head" in result.findings[1].message and "'score'" in result.findings[0].message
    assert_predicts(result, peft_truth("Llama-3.1-8B", ["q_proj", "lm_head"], modules_to_save=["score"]))
