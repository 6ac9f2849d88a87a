"""``plop check`` on torchtune recipes resolves what torchtune's builders build.

The first tests need no torchtune: they check the builder tree against the published model
(Phi-3-mini's dimensions from its Hugging Face config) and torchtune's refusals. The ``stacks``
tests run torchtune's own code (the ``stack-torchtune`` extra): its registered builders against
plop's table, and every LoRA recipe torchtune ships, instantiated on the meta device and trained
as its recipes do, against ``plop check``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plop.audit import check
from plop.errors import ConfigError
from plop.stacks import torchtune

CORPUS = Path(__file__).parent / "corpus" / "torchtune"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PHI3 = CORPUS / "phi3" / "mini_lora_single_device.yaml"
VISION = CORPUS / "llama3_2_vision" / "11B_lora_single_device.yaml"


def recipe(tmp_path: Path, base: Path, **model) -> Path:
    """``base`` with its ``model:`` block changed by ``model``."""
    data = yaml.safe_load(base.read_text(encoding="utf-8"))
    data["model"].update(model)
    path = tmp_path / base.name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_phi3_mini_recipe_trains_separate_q_v_and_the_whole_mlp():
    """torchtune's Phi-3 keeps q/k/v and w1/w3 apart (transformers fuses qkv_proj, gate_up_proj):
    its recipe adapts q_proj, v_proj, output_proj, w1, w2, w3 in every layer at rank 8."""
    hf = json.loads((Path(__file__).parent / "fixtures" / "model_configs" / "Phi-3.5-mini-instruct.json").read_text())
    h, i, n, r = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], 8
    result = check(PHI3)
    assert result.exit_code == 0 and result.findings == []
    assert result.trainable == n * r * (3 * (h + h) + 2 * (h + i) + (i + h))
    assert set(result.modules) == {f"layers.{k}.{m}" for k in range(n)
                                   for m in ("attn.q_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")}
    assert result.model["architecture"] == "lora_phi3_mini"


@pytest.mark.spawns
def test_the_cli_takes_the_model_from_the_builder():
    """No MODEL: the recipe names no Hugging Face config, its builder defines the model."""
    from test_cli import ENV, PLOP

    proc = subprocess.run([*PLOP, "check", str(PHI3)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on lora_phi3_mini," in proc.stdout and f"trains {check(PHI3).trainable:,}" in proc.stdout


def test_a_model_given_beside_a_recipe_is_named_unused():
    hf = Path(__file__).parent / "fixtures" / "model_configs" / "Phi-3.5-mini-instruct.json"
    result = check(PHI3, hf)
    assert result.trainable == check(PHI3).trainable
    assert any(f.code == "stack-rule" and f.message.startswith("MODEL is not used") for f in result.findings)


@pytest.mark.heavy
def test_vision_trainable_flags_choose_the_parts(tmp_path):
    """decoder_trainable / encoder_trainable / fusion_trainable: a frozen part gets no adapter."""
    shipped = check(VISION)
    assert not any(m.startswith("decoder.layers.") and ".fusion_layer." not in m for m in shipped.modules)
    assert any(m.startswith("encoder.clip.") for m in shipped.modules)
    frozen_encoder = check(recipe(tmp_path, VISION, encoder_trainable="frozen"))
    assert not any(m.startswith("encoder.clip.") for m in frozen_encoder.modules)
    assert 0 < frozen_encoder.trainable < shipped.trainable
    with pytest.raises(ConfigError, match="encoder_trainable 'full'.*refuses 'full'"):
        check(recipe(tmp_path, VISION, encoder_trainable="full"))


def test_what_torchtune_refuses_is_one_line(tmp_path):
    qwen = CORPUS / "qwen2" / "0.5B_lora_single_device.yaml"
    with pytest.raises(ConfigError, match="torchtune refuses apply_lora_to_output here: lora_qwen2_0_5b()"):
        check(recipe(tmp_path, qwen, apply_lora_to_output=True))
    with pytest.raises(ConfigError, match="torchtune refuses an empty lora_attn_modules"):
        check(recipe(tmp_path, PHI3, lora_attn_modules=[]))


def test_a_builder_plop_has_no_tree_for_is_refused_not_guessed(tmp_path):
    with pytest.raises(ConfigError, match=r"'my_models.lora_custom' is not a LoRA builder of torchtune 0\.6\.1"):
        check(recipe(tmp_path, PHI3, _component_="my_models.lora_custom"))
    with pytest.raises(ConfigError, match="names no builder"):
        check(recipe(tmp_path, PHI3, _component_=None))


def test_a_phi3_export_names_torchtune_s_split_projections():
    """plop export from a report of transformers' Phi-3 (fused qkv_proj, gate_up_proj): torchtune's
    switches for them, flagged as not exact (an adapter on each of q/k/v), and read back to the
    same modules."""
    import copy

    import archs
    from conftest import make_batches

    from plop import diagnose
    from plop.audit.verify import export_difference, resolve_export
    from plop.stacks import export

    phi3 = archs.build("phi3")
    report = diagnose(phi3, make_batches(8, 8, vocab=phi3.config.vocab_size), n_bootstrap=5)
    chosen = copy.deepcopy(report)
    rec = chosen.recommendation
    rec.types = rec.target_modules = ["qkv_proj", "gate_up_proj", "down_proj"]
    rec.modules = [m.name for m in chosen.modules if m.type in rec.types]
    result = export(chosen, "torchtune")
    model = yaml.safe_load(result.text)["model"]
    assert model["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj"] and model["apply_lora_to_mlp"] is True
    assert not result.exact and any("keeps q_proj, k_proj, v_proj apart" in w for w in result.warnings)
    assert resolve_export(result.text, "torchtune", chosen) == set(rec.modules)
    assert export_difference(result.text, "torchtune", chosen) is None


# -- against torchtune's own code ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tt():
    """benchmarks/torchtune_builders.py: torchtune's registered builders, derived entries and recipe truth."""
    pytest.importorskip("torchtune")
    sys.path.insert(0, str(BENCHMARKS))
    import torchtune_builders

    return torchtune_builders


@pytest.mark.stacks
def test_table_holds_every_lora_builder_torchtune_registers(tt):
    assert torchtune.table()["torchtune"] == tt._installed_version()
    assert sorted(tt.lora_builders()) == sorted(torchtune.table()["builders"])


@pytest.mark.stacks
@pytest.mark.parametrize("component", ["torchtune.models.phi3.lora_phi3_mini", "torchtune.models.qwen2.lora_qwen2_0_5b",
                                       "torchtune.models.llama3_2_vision.lora_llama3_2_vision_11b"])
def test_table_entries_are_what_the_builders_build(tt, component):
    assert tt.derive(tt.lora_builders()[component]) == torchtune.table()["builders"][component]


def _agree(tt, path: Path) -> None:
    truth_modules, truth_trainable = tt.recipe_truth(yaml.safe_load(path.read_text(encoding="utf-8"))["model"])
    result = check(path)
    assert set(result.modules) == truth_modules
    assert result.trainable == truth_trainable


@pytest.mark.stacks
@pytest.mark.parametrize("path", sorted(CORPUS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_shipped_recipe_agrees_with_torchtune(tt, path):
    _agree(tt, path)


@pytest.mark.stacks
@pytest.mark.parametrize("base, change", [
    (PHI3, {"use_dora": True}),
    (PHI3, {"lora_attn_modules": ["k_proj"], "apply_lora_to_mlp": False, "apply_lora_to_output": True}),
    (VISION, {"encoder_trainable": "frozen", "decoder_trainable": "lora", "apply_lora_to_output": True}),
    (VISION, {"fusion_trainable": "frozen", "lora_attn_modules": ["q_proj", "k_proj"]}),
], ids=["phi3-dora", "phi3-k-and-output", "vision-decoder-only", "vision-no-fusion"])
def test_switch_and_part_variants_agree_with_torchtune(tt, tmp_path, base, change):
    _agree(tt, recipe(tmp_path, base, **change))
