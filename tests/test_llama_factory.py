"""LLaMA-Factory as its own code reads a config: both YAML forms, its freeze table, and its
target-resolving functions run on the meta model beside plop check's.

The tests marked ``stacks`` load llamafactory 0.9.5's own modules (``make test-stacks`` installs it
with --no-deps; its package ``__init__`` files pull a training stack plop does not need, so only the
files that hold the rules are loaded, under their real names)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

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


# -- against llamafactory's own code ---------------------------------------------------------------
@pytest.fixture(scope="module")
def lf():
    """llamafactory's visual.py, misc.py and finetuning_args.py, loaded under their own names
    without the package ``__init__`` files; removed from sys.modules afterwards."""
    found = importlib.util.find_spec("llamafactory")
    if found is None:
        pytest.skip("llamafactory is not installed (make test-stacks installs it)")
    root = Path(found.origin).parent
    before = set(sys.modules)
    for package in ("llamafactory", "llamafactory.extras", "llamafactory.hparams", "llamafactory.model",
                    "llamafactory.model.model_utils"):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = stub
    try:
        yield types.SimpleNamespace(
            root=root,
            visual=importlib.import_module("llamafactory.model.model_utils.visual"),
            misc=importlib.import_module("llamafactory.model.model_utils.misc"),
            args=importlib.import_module("llamafactory.hparams.finetuning_args"))
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


@pytest.mark.stacks
def test_composite_table_is_llama_factorys_own_registry(lf):
    """Fails when LLaMA-Factory registers a model type (or changes one) that plop's table lacks."""
    from importlib.metadata import version

    assert version("llamafactory") == VERSION
    theirs = {t: (tuple(c.vision_model_keys), tuple(c.projector_keys), tuple(c.language_model_keys),
                  tuple(c.lora_conflict_keys)) for t, c in lf.visual.COMPOSITE_MODELS.items()}
    assert {t: tuple(c) for t, c in COMPOSITE.items()} == theirs


def _their_targets(lf, model, config: dict) -> list[str]:
    """adapter.py _setup_lora_tuning's two steps, with FinetuningArguments parsing the YAML."""
    fields = {f.name for f in dataclasses.fields(lf.args.FinetuningArguments)}
    args = lf.args.FinetuningArguments(**{k: v for k, v in config.items() if k in fields})
    targets = args.lora_target
    if len(targets) == 1 and targets[0] == "all":
        targets = lf.misc.find_all_linear_modules(model, args.freeze_vision_tower)
    return lf.visual.patch_target_modules(model, args, targets)


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
]


@pytest.mark.stacks
@pytest.mark.parametrize("name, config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_targets_equal_llama_factorys_own_functions(lf, name, config):
    config = {"finetuning_type": "lora", **config}
    model = meta_model(fixture(name))
    ours = lora_kwargs(read(config, "lf.yaml"), model)["target_modules"]
    assert sorted(ours) == sorted(_their_targets(lf, model, config))


def _plugin_find_all(lf):
    """v1/plugins/model_plugins/peft.py's own _find_all_linear_modules, compiled from its source
    (its module imports the whole v1 engine)."""
    path = lf.root / "v1" / "plugins" / "model_plugins" / "peft.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_find_all_linear_modules")
    namespace: dict = {}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace["_find_all_linear_modules"]


@pytest.mark.stacks
@pytest.mark.parametrize("name", ["Qwen3-VL-4B-Instruct", "Llama-3.1-8B", "bert-base-uncased"])
def test_v1_all_equals_the_plugins_own_function(lf, name):
    model = meta_model(fixture(name))
    spec = read(yaml.safe_load("peft_config: {name: lora, target_modules: all}"), "v1.yaml")
    assert sorted(lora_kwargs(spec, model)["target_modules"]) == sorted(_plugin_find_all(lf)(model))
