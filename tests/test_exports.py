"""plop.stacks, writing: each stack's config, read back by the real package where it installs on a CPU
(PEFT, TRL), otherwise checked against the key names and types of the stack's documented schema
and replayed through PEFT with the stack's documented mapping; one test per lint trap."""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_batches, make_llama

from plop import diagnose
from plop.placement import LoraSettings
from plop.stacks import FORMATS, export, merge_into

peft = pytest.importorskip("peft")
# get_peft_model on a model built in memory, not the one the report names
pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path`:UserWarning")

# key -> type, from the sources cited in each plop/stacks/<stack>.py
SCHEMAS = {
    "axolotl": {"adapter": str, "lora_r": int, "lora_alpha": int, "lora_dropout": float,
                "lora_target_modules": (str, list), "lora_target_linear": bool, "peft_use_dora": bool,
                "peft_use_rslora": bool,
                "loraplus_lr_ratio": float, "lora_rank_pattern": dict, "lora_alpha_pattern": dict,
                "lora_target_parameters": (str, list)},
    "llama-factory": {"finetuning_type": str, "lora_rank": int, "lora_alpha": int, "lora_dropout": float,
                      "lora_target": str, "use_dora": bool, "use_rslora": bool, "loraplus_lr_ratio": float},
    "trl": {"use_peft": bool, "lora_r": int, "lora_alpha": int, "lora_dropout": float,
            "lora_target_modules": (str, list), "use_dora": bool, "use_rslora": bool, "lora_task_type": str,
            "lora_target_parameters": list},
    "mlx-lm": {"fine_tune_type": str, "num_layers": int, "lora_parameters": dict},
    "spectrum": {"unfrozen_parameters": list},
    "torchtune": {"model": dict},
}
NESTED = {"mlx-lm": ("lora_parameters", {"keys": list, "rank": int, "scale": float, "dropout": float}),
          "torchtune": ("model", {"lora_attn_modules": list, "apply_lora_to_mlp": bool, "apply_lora_to_output": bool,
                                  "lora_rank": int, "lora_alpha": int, "lora_dropout": float, "use_dora": bool})}


def _diagnose(**kwargs):
    return diagnose(make_llama(), make_batches(16, 16), rank=8, n_bootstrap=50, **kwargs)


@pytest.fixture(scope="module")
def report():
    return _diagnose(top_k=3)


@pytest.fixture(scope="module")
def per_layer():
    return _diagnose(top_k=1, strategy="per_layer")


def _with(report, target_modules, **extra):
    """A copy of ``report`` recommending ``target_modules`` (suffixes) on every layer, plus ``extra``
    recommendation attributes (the future rank_pattern / target_parameters)."""
    out = copy.deepcopy(report)
    rec = out.recommendation
    rec.target_modules = list(target_modules)
    rec.modules = [m.name for m in out.modules if m.type in target_modules]
    rec.types = list(target_modules)
    for key, value in extra.items():
        setattr(rec, key, value)
    return out


def wrapped(config) -> set[str]:
    """Module names PEFT really puts LoRA on in a fresh tiny llama."""
    model = peft.get_peft_model(make_llama(), config)
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _yaml(result):
    data = yaml.safe_load(result.text)
    assert data == result.settings
    return data


# -- import ------------------------------------------------------------------------------------
@pytest.mark.spawns
def test_package_imports_without_torch():
    code = ("import sys\nimport plop.stacks as stacks\n"
            "assert not {'torch', 'transformers', 'peft'} & set(sys.modules), 'heavy import'\n"
            "print(sorted(stacks.FORMATS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "axolotl" in out.stdout


def test_unknown_format(report):
    with pytest.raises(ValueError, match="unknown export format"):
        export(report, "deepspeed")


# -- PEFT and TRL: the real packages consume the files ----------------------------------------
@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_peft_adapter_config_wraps_exactly_the_recommendation(which, request, tmp_path):
    rep = request.getfixturevalue(which)
    result = export(rep, "peft", LoraSettings(4, alpha=8, dropout=0.1, use_dora=True))
    (tmp_path / result.filename).write_text(result.text)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (4, 8, 0.1, True)
    assert wrapped(config) == set(rep.recommendation.modules)
    assert result.exact
    # written without PEFT, read by PEFT: the very LoraConfig plop builds, field for field
    built = rep.to_peft_config(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True)
    built.base_model_name_or_path = config.base_model_name_or_path  # PEFT's own reading of the id
    assert config.to_dict() == built.to_dict()
    assert json.loads(result.text).get("base_model_name_or_path") == rep.model.get("id")


@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_trl_yaml_through_trl_parser(which, request, tmp_path):
    trl = pytest.importorskip("trl")
    from trl import ModelConfig, TrlParser
    from trl.trainer.utils import get_peft_config

    rep = request.getfixturevalue(which)
    result = export(rep, "trl", LoraSettings(4, alpha=16, dropout=0.0, use_dora=True))
    path = tmp_path / result.filename
    path.write_text(result.text)
    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(["--config", str(path)])
    config = get_peft_config(model_args)
    assert (config.r, config.lora_alpha, config.use_dora) == (4, 16, True), trl.__version__
    assert wrapped(config) == set(rep.recommendation.modules)


def test_trl_one_element_list_survives_the_collapse(report, tmp_path):
    """Lint trap: TRL turns ["v_proj"] into the regex "v_proj", which matches no module."""
    from trl import ModelConfig, TrlParser
    from trl.trainer.utils import get_peft_config

    single = _with(report, ["v_proj"])
    naive = ModelConfig(use_peft=True, lora_target_modules=["v_proj"])
    assert naive.lora_target_modules == "v_proj"  # the trap, in TRL itself
    assert not any(peft.tuners.tuners_utils.check_target_module_exists(get_peft_config(naive), name)
                   for name in single.recommendation.modules)

    result = export(single, "trl")
    assert isinstance(result.settings["lora_target_modules"], str)
    assert any("one-element" in w for w in result.warnings)
    path = tmp_path / result.filename
    path.write_text(result.text)
    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(["--config", str(path)])
    config = get_peft_config(model_args)
    for module in report.modules:
        hit = bool(peft.tuners.tuners_utils.check_target_module_exists(config, module.name))
        assert hit == (module.type == "v_proj"), module.name
    assert wrapped(config) == set(single.recommendation.modules)


# -- stacks that do not install on this CPU: schema + replay through PEFT as the stack maps it --
@pytest.mark.parametrize("fmt", sorted(SCHEMAS))
@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_yaml_keys_and_types_match_the_stack(fmt, which, request):
    rep = request.getfixturevalue(which)
    result = export(rep, fmt, LoraSettings(rep.recommendation.rank, loraplus_ratio=16.0))
    data = _yaml(result)
    schema = SCHEMAS[fmt]
    assert set(data) <= set(schema), set(data) - set(schema)
    for key, value in data.items():
        assert isinstance(value, schema[key]), (key, value)
    if fmt in NESTED:
        block, nested = NESTED[fmt]
        assert set(data[block]) <= set(nested)
        for key, value in data[block].items():
            assert isinstance(value, nested[key]), (key, value)


@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_axolotl_as_its_adapter_loader_builds_the_lora_config(which, request):
    rep = request.getfixturevalue(which)
    data = _yaml(export(rep, "axolotl", LoraSettings(4, loraplus_ratio=16.0)))
    assert data["loraplus_lr_ratio"] == 16.0 and data["lora_target_linear"] is False
    config = peft.LoraConfig(r=data["lora_r"], lora_alpha=data["lora_alpha"], lora_dropout=data["lora_dropout"],
                             target_modules=data["lora_target_modules"], use_dora=data["peft_use_dora"])
    assert wrapped(config) == set(rep.recommendation.modules)


@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_llama_factory_comma_list_is_exact(which, request):
    rep = request.getfixturevalue(which)
    result = export(rep, "llama-factory", LoraSettings(rep.recommendation.rank, loraplus_ratio=16.0))
    data = _yaml(result)
    targets = [item.strip() for item in data["lora_target"].split(",")]  # LLaMA-Factory's split_arg
    assert wrapped(peft.LoraConfig(r=data["lora_rank"], target_modules=targets)) == set(rep.recommendation.modules)
    assert result.exact and data["loraplus_lr_ratio"] == 16.0


@pytest.mark.parametrize("which", ["report", "per_layer"])
def test_unsloth_snippet_arguments(which, request):
    rep = request.getfixturevalue(which)
    result = export(rep, "unsloth", LoraSettings(rep.recommendation.rank, dropout=0.0, loraplus_ratio=4.0))
    tree = ast.parse(result.text)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "get_peft_model")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs == result.settings
    assert "create_loraplus_optimizer" in result.text and "loraplus_lr_ratio=4.0" in result.text
    peft_kwargs = {k: v for k, v in kwargs.items() if k not in ("use_gradient_checkpointing", "random_state")}
    assert wrapped(peft.LoraConfig(**peft_kwargs)) == set(rep.recommendation.modules)


def test_torchtune_is_a_superset_with_its_own_names(report, per_layer):
    result = export(_with(report, ["q_proj", "o_proj", "up_proj"]), "torchtune")
    model = _yaml(result)["model"]
    assert model["lora_attn_modules"] == ["q_proj", "output_proj"]
    assert model["apply_lora_to_mlp"] is True and model["apply_lora_to_output"] is False
    assert not result.exact and any("apply_lora_to_mlp covers all" in w for w in result.warnings)

    whole = export(_with(report, ["k_proj", "gate_proj", "up_proj", "down_proj"]), "torchtune")
    assert whole.exact and not any("NOT exact" in line for line in whole.text.splitlines())
    layered = export(per_layer, "torchtune")
    assert not layered.exact and any("every layer" in w for w in layered.warnings)


def test_mlx_lm_keys_layers_and_scale(report):
    result = export(_with(report, ["q_proj", "down_proj"]), "mlx-lm", LoraSettings(8, alpha=32, use_dora=True))
    data = _yaml(result)
    assert data["fine_tune_type"] == "dora" and data["num_layers"] == 2
    assert data["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj"]
    assert data["lora_parameters"]["scale"] == 4.0 and result.exact

    bottom = copy.deepcopy(report)
    bottom.recommendation.modules = ["model.layers.0.self_attn.v_proj"]
    bottom.recommendation.target_modules = r"model\.layers\.0\.self_attn\.v_proj"
    low = export(bottom, "mlx-lm")
    assert _yaml(low)["num_layers"] == 2 and not low.exact  # counted from the top: layer 1 comes along


def test_spectrum_patterns_unfreeze_exactly_the_modules(per_layer, report):
    for rep in (report, per_layer):
        patterns = _yaml(export(rep, "spectrum"))["unfrozen_parameters"]
        # axolotl's freeze.py: re.match, and "." not followed by "+" is a literal dot
        compiled = [re.compile(re.sub(r"\.(?!\+)", r"\\.", p)) for p in patterns]
        names = {n for n, _ in make_llama().named_parameters() if any(c.match(n) for c in compiled)}
        assert names == {m + ".weight" for m in rep.recommendation.modules}


# -- future recommendation fields ---------------------------------------------------------------
def test_rank_pattern_carried_or_flagged(report, tmp_path):
    allocated = _with(report, ["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4})
    (tmp_path / "adapter_config.json").write_text(export(allocated, "peft", LoraSettings(8)).text)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    built = allocated.to_peft_config(r=8, lora_dropout=0.05)
    built.base_model_name_or_path = config.base_model_name_or_path
    assert config.to_dict() == built.to_dict()
    model = peft.get_peft_model(make_llama(), config)
    ranks = {n.rsplit(".", 1)[-1]: m.r["default"] for n, m in model.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {"q_proj": 2, "v_proj": 8}
    assert _yaml(export(allocated, "axolotl"))["lora_rank_pattern"] == {"q_proj": 2}
    assert export(allocated, "unsloth").settings["rank_pattern"] == {"q_proj": 2}
    for fmt in ("llama-factory", "trl", "torchtune", "mlx-lm"):
        result = export(allocated, fmt)
        assert not result.exact and any("per-module rank" in w for w in result.warnings), fmt


def test_target_parameters_carried_or_flagged(report):
    moe = _with(report, ["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    assert json.loads(export(moe, "peft").text)["target_parameters"] == ["mlp.experts.gate_up_proj"]
    axolotl = export(moe, "axolotl", LoraSettings(moe.recommendation.rank, dropout=0.05)).settings
    assert axolotl["lora_target_parameters"] == ["mlp.experts.gate_up_proj"] and axolotl["lora_dropout"] == 0.0
    assert export(moe, "trl").settings["lora_target_parameters"] == ["mlp.experts.gate_up_proj"]
    assert "^.+.mlp.experts.gate_up_proj$" in export(moe, "spectrum").settings["unfrozen_parameters"]
    for fmt in ("llama-factory", "torchtune", "mlx-lm"):
        result = export(moe, fmt)
        assert not result.exact and any("MoE experts" in w for w in result.warnings), fmt


# -- lint traps ---------------------------------------------------------------------------------
def test_unsloth_fused_kernels_lint(report):
    rank = report.recommendation.rank
    partial = export(_with(report, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]), "unsloth",
                     LoraSettings(rank, dropout=0.0))
    assert [w for w in partial.warnings if "fused" in w] == [
        "unsloth's fused QKV kernel needs LoRA on all of q_proj, k_proj, v_proj, not only q_proj, v_proj; "
        "these layers run on the slower PEFT path"]
    qkv = _with(report, ["q_proj", "k_proj", "v_proj"])
    full = export(qkv, "unsloth", LoraSettings(rank, dropout=0.05))
    assert [w for w in full.warnings if "fused" in w] == [
        "unsloth's fused kernels need lora_dropout=0 and no DoRA (got dropout=0.05, dora=False); "
        "training runs on the slower path"]
    assert not [w for w in export(qkv, "unsloth", LoraSettings(rank, dropout=0.0)).warnings if "fused" in w]


def test_vllm_lint_only_what_vllm_refuses(report):
    """vLLM loads adapters on part of a packed group (q/v only, up/down only: set_lora skips the
    None slices), so those export quietly; it refuses DoRA at load time, which is flagged."""
    from plop.stacks.lint import VLLM_DORA

    def vllm(types, **options):
        settings = LoraSettings(report.recommendation.rank, **options)
        return [w for w in export(_with(report, types), "axolotl", settings).warnings if "vLLM" in w]

    for types in (["v_proj", "up_proj", "down_proj"], ["q_proj", "v_proj"], ["v_proj", "down_proj"]):
        assert vllm(types) == [], types
    assert vllm(["q_proj", "v_proj"], use_dora=True) == [VLLM_DORA]
    dora = LoraSettings(report.recommendation.rank, use_dora=True)
    assert not [w for w in export(_with(report, ["v_proj"]), "spectrum", dora).warnings if "vLLM" in w]


def test_vlm_suffix_lint_and_peft_exclude(report):
    from plop.stacks.peft import VISION_EXCLUDE

    vlm = _with(report, ["q_proj", "k_proj", "v_proj"])
    vlm.model.update(architecture="Qwen2VLForConditionalGeneration", model_type="qwen2_vl")
    for fmt in ("axolotl", "trl", "llama-factory", "unsloth"):
        assert any("vision tower" in w for w in export(vlm, fmt).warnings), fmt
    config = json.loads(export(vlm, "peft").text)
    assert config["exclude_modules"] == VISION_EXCLUDE
    assert re.fullmatch(VISION_EXCLUDE, "model.visual.blocks.0.attn.qkv")
    assert not re.fullmatch(VISION_EXCLUDE, "model.language_model.layers.0.self_attn.q_proj")
    assert not any("vision tower" in w for w in export(report, "axolotl").warnings)


# -- merge --------------------------------------------------------------------------------------
AXOLOTL_CONFIG = """\
base_model: HuggingFaceTB/SmolLM2-135M
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
adapter: qlora
lora_r: 64
lora_target_linear: true
sequence_len: 2048
learning_rate: 0.0002
"""


def test_merge_into_keeps_every_other_key(report):
    result = export(report, "axolotl", LoraSettings(report.recommendation.rank, loraplus_ratio=16.0))
    before = yaml.safe_load(AXOLOTL_CONFIG)
    merged = yaml.safe_load(merge_into(AXOLOTL_CONFIG, result))
    for key, value in before.items():
        if key not in result.settings:
            assert merged[key] == value, key
    for key, value in result.settings.items():
        assert merged[key] == value, key
    assert list(merged)[:4] == ["base_model", "datasets", "adapter", "lora_r"]  # order kept


def test_merge_into_nested_and_json(report):
    existing = "model:\n  _component_: torchtune.models.llama3_2.lora_llama3_2_1b\n  lora_rank: 64\nepochs: 1\n"
    merged = yaml.safe_load(merge_into(existing, export(report, "torchtune")))
    assert merged["model"]["_component_"] == "torchtune.models.llama3_2.lora_llama3_2_1b"
    assert merged["model"]["lora_rank"] == 8 and merged["epochs"] == 1

    peft_json = json.dumps({"r": 64, "target_modules": ["q_proj"], "custom": 1})
    merged_json = json.loads(merge_into(peft_json, export(report, "peft")))
    assert merged_json["custom"] == 1 and sorted(merged_json["target_modules"]) == sorted(
        report.recommendation.target_modules)
    with pytest.raises(ValueError, match="Python code"):
        merge_into("", export(report, "unsloth"))


def _holds(document, settings) -> bool:
    """Whether ``document`` holds every key of ``settings`` with the same value, at the same nesting."""
    if isinstance(settings, dict):
        return isinstance(document, dict) and all(k in document and _holds(document[k], v) for k, v in settings.items())
    return document == settings


def test_every_format_writes_the_settings_it_owns(report, per_layer):
    import yaml

    for rep in (report, per_layer):
        for fmt in FORMATS:
            result = export(rep, fmt)
            assert result.format == fmt and result.settings
            if result.filename.endswith((".json", ".yaml", ".yml")):  # JSON is YAML: one parser reads both
                assert _holds(yaml.safe_load(result.text), result.settings), fmt
            assert all(t in result.text for t in rep.recommendation.types), fmt
