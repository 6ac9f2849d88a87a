"""plop check against mlx-lm's own code: mlx-lm builds its own model (random weights, mlx on the
CPU) from the same config.json, its ``linear_to_lora_layers`` converts it, and plop must name the
same wrapped modules and count the same trainable parameters. Skips without the stack-mlx extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from archs import ARCHS
from plop.audit import EXIT_ERRORS, check
from plop.audit.meta import meta_model
from plop.errors import ConfigError
from plop.stacks import mlx_lm as stack

pytestmark = pytest.mark.stacks
mlx_lm = pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402  (after the skip: mlx comes with mlx-lm)
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import _get_classes  # noqa: E402  (what mlx_lm.utils.load_model builds with)

# what mlx-lm's ModelArgs require beyond plop's tiny architecture sizes (tests/archs.py)
_MLX_ARGS = dict(n_shared_experts=1, rms_norm_eps=1e-6, layer_norm_eps=1e-5, rope_theta=10000.0, norm_topk_prob=True,
                 partial_rotary_factor=0.5, sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def config_json(model_type: str, tie: bool = False) -> dict:
    return {**ARCHS[model_type].sizes, **_MLX_ARGS, "model_type": model_type, "tie_word_embeddings": tie}


def mlx_model(config: dict):
    model_cls, args_cls = _get_classes(config)
    return model_cls(args_cls.from_dict(config))


def _mlx_shapes(model) -> dict[str, tuple[int, int, int]]:
    """mlx-lm's wrappable modules as (experts, fan_in, fan_out)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SwitchLinear):
            out[name] = tuple(int(x) for x in (m.weight.shape[0], m.weight.shape[2], m.weight.shape[1]))
        elif isinstance(m, nn.Linear):
            out[name] = (1, int(m.weight.shape[1]), int(m.weight.shape[0]))
        elif isinstance(m, nn.Embedding):
            out[name] = (1, int(m.weight.shape[1]), int(m.weight.shape[0]))
    return out


def mlx_missed(config: dict, mlx_config: dict) -> list[str]:
    """The keys that equal no path inside mlx-lm's blocks and no full path of its model."""
    model = mlx_model(config)
    paths = {name for name, _ in model.named_modules()}
    paths |= {name for block in model.layers for name, _ in block.named_modules()}
    return [k for k in mlx_config.get("lora_parameters", {}).get("keys") or () if k not in paths]


def mlx_truth(config: dict, mlx_config: dict) -> tuple[list[str], int]:
    """What mlx_lm.lora's train does before training: freeze, convert, count trainable parameters."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear

    from mlx_lm.lora import CONFIG_DEFAULTS

    model = mlx_model(config)
    model.freeze()
    params = {**CONFIG_DEFAULTS, **mlx_config}["lora_parameters"]  # lora.py main: the config's mapping, whole
    linear_to_lora_layers(model, mlx_config.get("num_layers", 16), params,
                          use_dora=mlx_config.get("fine_tune_type") == "dora")
    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, kinds))
    return wrapped, sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def plop_result(tmp_path: Path, config: dict, mlx_config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(mlx_config))
    return check(tmp_path / "lora.yaml", tmp_path / "config.json", flavour="mlx-lm")


@pytest.mark.parametrize("model_type", sorted(stack.TREES))
@pytest.mark.parametrize("tie", [False, True])
def test_module_tree_is_mlx_lm_s_own(model_type, tie):
    """TREES, read on the transformers meta model, gives mlx-lm's own modules and shapes."""
    config = config_json(model_type, tie)
    ours = {m.name: (m.experts, m.fan_in, m.fan_out)
            for m in stack.native_modules(meta_model_of(config), model_type)}
    assert ours == _mlx_shapes(mlx_model(config))


def meta_model_of(config: dict):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))
        return meta_model(path)


_RANK = {"rank": 4, "scale": 2.0, "dropout": 0.0}
VARIANTS = {
    "defaults": {"num_layers": 1},
    "all-layers": {"num_layers": -1, "lora_parameters": _RANK},
    "zero-layers": {"num_layers": 0, "lora_parameters": {**_RANK, "keys": None}},
    "keys": {"num_layers": 2, "lora_parameters": {**_RANK, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}},
    "dora": {"num_layers": 2, "fine_tune_type": "dora", "lora_parameters": {**_RANK, "keys": ["self_attn.o_proj"]}},
    "full-path": {"num_layers": 1, "lora_parameters": {**_RANK, "keys": ["model.layers.0.self_attn.k_proj",
                                                                        "model.embed_tokens"]}},
}


@pytest.mark.parametrize("model_type", sorted(stack.TREES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_check_equals_mlx_lm_s_conversion(tmp_path, model_type, variant):
    config, mlx_config = config_json(model_type), VARIANTS[variant]
    wrapped, trainable = mlx_truth(config, mlx_config)
    result = plop_result(tmp_path, config, mlx_config)
    assert (result.stack_modules, result.trainable) == (wrapped, trainable)
    missed = mlx_missed(config, mlx_config)
    assert [f.code for f in result.errors] == (["target-miss"] if missed else []) + ([] if wrapped else ["nothing-trained"])
    assert all(repr(k) in result.errors[0].message for k in missed)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_expert_keys_in_transformers_names_match_nothing(tmp_path, model_type):
    """mlx-lm #571: Hugging Face expert names as keys; mlx-lm trains attention only, plop says which keys miss."""
    keys = ["self_attn.q_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"]
    mlx_config = {"num_layers": -1, "lora_parameters": {"keys": keys, "rank": 8, "scale": 2.0, "dropout": 0.0}}
    config = config_json(model_type)
    wrapped, trainable = mlx_truth(config, mlx_config)
    result = plop_result(tmp_path, config, mlx_config)
    assert (result.stack_modules, result.trainable) == (wrapped, trainable)
    assert all(name.endswith("self_attn.q_proj") for name in wrapped)
    (miss,) = [f for f in result.findings if f.code == "target-miss"]
    assert "'mlp.experts.0.up_proj', 'mlp.experts.0.down_proj'" in miss.message and result.exit_code == EXIT_ERRORS


def test_default_keys_wrap_the_router_and_say_so(tmp_path):
    config = config_json("qwen3_moe")
    wrapped, trainable = mlx_truth(config, {"num_layers": 2})
    result = plop_result(tmp_path, config, {"num_layers": 2})
    assert "model.layers.0.mlp.gate" in wrapped and (result.stack_modules, result.trainable) == (wrapped, trainable)
    assert "router-wrapped" in [f.code for f in result.findings]


def test_more_layers_than_blocks_is_refused_as_mlx_lm_refuses(tmp_path):
    """mlx_lm/lora.py train: num_layers above the block count raises before any conversion."""
    result = plop_result(tmp_path, config_json("llama"), {"num_layers": 16})
    (refusal,) = [f for f in result.findings if f.severity == "error"]
    assert refusal.code == "stack-refuses" and "only has 2 layers" in refusal.message


def _registered(model_type: str) -> bool:
    """mlx_lm.utils._get_classes: MODEL_REMAPPING, then mlx_lm/models/<type>.py."""
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.util.find_spec(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}") is not None


def test_every_architecture_plop_sweeps_that_mlx_lm_builds_is_in_the_table():
    """A model type plop supports (tests/archs.py) that mlx-lm registers is mapped or named
    unmapped with its reason; a type in plop's tables is one mlx-lm registers."""
    assert sorted(a.model_type for a in ARCHS.values()
                  if _registered(a.model_type) and a.model_type not in {*stack.TREES, *stack.UNMAPPED}) == []
    assert sorted(t for t in {*stack.TREES, *stack.UNMAPPED} if not _registered(t)) == []


def test_an_unmapped_model_type_is_one_line(tmp_path):
    config = {**config_json("llama"), "model_type": "gpt_neox"}
    with pytest.raises(ConfigError, match=r"^plop does not know mlx-lm's own module tree for model_type 'gpt_neox' \("):
        plop_result(tmp_path, config, {"num_layers": 1})


def test_a_partial_lora_parameters_mapping_is_refused_as_mlx_lm_fails(tmp_path):
    """The Phi-3 cookbook's older form gives alpha, not scale: mlx-lm stops with KeyError 'scale'."""
    params = {"keys": ["self_attn.o_proj"], "rank": 64, "alpha": 64, "dropout": 0.1}
    with pytest.raises(KeyError, match="scale"):
        linear_to_lora_layers(mlx_model(config_json("phi3")), 1, params)
    with pytest.raises(ConfigError, match=r"lora_parameters lacks scale: .* KeyError 'scale'"):
        plop_result(tmp_path, config_json("phi3"), {"num_layers": 1, "lora_parameters": params})


def test_the_mlx_lm_571_config_on_qwen3_30b_a3b(tmp_path):
    """The issue's config, on the published Qwen3-30B-A3B config.json, both sides at full size
    (mlx never evaluates the random weights): attention only, and the three expert keys named."""
    corpus = Path(__file__).parent / "corpus" / "mlx_lm"
    model = Path(__file__).parent / "fixtures" / "model_configs" / "Qwen3-30B-A3B.json"
    mlx_config = yaml.safe_load((corpus / "configs" / "mlx-lm-571.yaml").read_text())
    wrapped, trainable = mlx_truth(json.loads(model.read_text()), mlx_config)
    result = check(corpus / "configs" / "mlx-lm-571.yaml", model)
    assert (result.stack_modules, result.trainable) == (wrapped, trainable)
    assert result.exit_code == EXIT_ERRORS and [f.code for f in result.errors] == ["target-miss"]
    assert all(repr(f"mlp.experts.0.{p}") in result.errors[0].message for p in ("up_proj", "down_proj", "gate_proj"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "llama"])
def test_an_export_holds_mlx_lm_s_own_keys(tmp_path, model_type):
    """plop export --to mlx-lm on a diagnosed model: every key is a path of mlx-lm's model (its
    SwitchLinear experts by their own names), and plop check of the export counts what mlx-lm builds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_batches
    from plop import diagnose
    from plop.audit.verify import resolve_export
    from plop.stacks import export

    config = config_json(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    report = diagnose(model, make_batches(8, 16, vocab=240), rank=4, n_bootstrap=20, top_k=99)  # every type
    exported = export(report, "mlx-lm")
    mlx_config = yaml.safe_load(exported.text)
    assert mlx_missed(config, mlx_config) == [] and exported.exact
    assert resolve_export(exported.text, "mlx-lm", report) == set(report.recommendation.modules)  # plop's read-back
    wrapped, trainable = mlx_truth(config, mlx_config)
    result = plop_result(tmp_path, config, mlx_config)
    assert (result.stack_modules, result.trainable, result.exit_code) == (wrapped, trainable, 0)


def test_numbers_are_read_as_mlx_lm_reads_them():
    """mlx-lm's loader adds a float resolver, so scale 2e1 (no dot: a string in YAML 1.1) is 20.0
    to mlx-lm; plop reads it the same (as alpha = scale x rank)."""
    from mlx_lm.lora import yaml_loader

    from plop.utils.untrusted import parse_yaml

    text = "num_layers: 2\nlora_parameters:\n  rank: 8\n  scale: 2e1\n  dropout: 5e-2\n  keys: [self_attn.q_proj]\n"
    theirs = yaml.load(text, yaml_loader)["lora_parameters"]
    assert (theirs["scale"], theirs["dropout"]) == (20.0, 0.05)
    spec = stack.read(parse_yaml(text, "lora.yaml"), "lora.yaml")
    assert (spec.settings.alpha, spec.settings.dropout) == (8 * theirs["scale"], theirs["dropout"])
