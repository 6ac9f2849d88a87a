"""The support matrix, tested: every architecture of ``tests/archs.py`` is diagnosed, every
weight-bearing projection is either diagnosed or named by the report's coverage (a VLM's vision
tower is not run on text data), PEFT accepts the exported ``adapter_config.json`` and wraps exactly
the recommended modules and expert weights at the cost the report states, and one backward step
reaches every LoRA parameter."""

from __future__ import annotations

import pytest

import archs
import sweep

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "jamba"}
# Mamba's mixer reads dt_proj.weight directly (MambaMixer.slow_forward), never calling the module:
# no hook sees it, and its 1-3 % of the block weights stay under the coverage list's 5 %.
NEVER_CALLED = {"mamba": "mixer.dt_proj", "jamba": "mamba.dt_proj"}


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_diagnose_export_wrap_and_train(name):
    row = sweep.run(name)
    assert row.wrapped == row.chosen, f"PEFT wrapped {sorted(row.wrapped ^ row.chosen)} unlike the recommendation"
    assert row.trainable == row.costed
    assert not row.no_grad
    if row.kind == "vlm":
        assert row.unseen and all(any(v in n for v in sweep.VISION) for n in row.unseen)
    else:
        assert all(n.endswith(NEVER_CALLED.get(name, "-")) for n in row.unseen), row.unseen
        assert row.coverage >= (0.8 if name in ("mamba", "jamba") else 0.9), row.undiagnosed
    assert set(row.recommended).isdisjoint(row.excluded)
    if name in MOE:
        assert {"experts.gate_up_proj", "experts.down_proj"} <= set(row.types)


def test_refused_types_are_named_with_peft_s_reason():
    mamba = sweep.run("mamba")
    assert "out_proj" in mamba.excluded and "incompatible with Mamba" in mamba.excluded["out_proj"]
    deepseek = sweep.run("deepseek_v3")
    assert "shared_experts.down_proj" in deepseek.excluded and "rewrites" in deepseek.excluded[
        "shared_experts.down_proj"]


def test_coverage_gives_each_undiagnosed_weight_a_reason():
    from plop.model.coverage import coverage
    from plop.model.layers import find_linear_modules
    from plop.model.loading import model_layout

    reasons = {u["role"]: u["reason"] for u in coverage(archs.build("mamba"), [], (), threshold=0)["undiagnosed"]}
    assert "convolution" in reasons["backbone.layers.*.mixer.conv1d.weight"]
    assert "not called" in reasons["backbone.layers.*.mixer.in_proj"]
    assert "not a linear projection" in reasons["backbone.layers.*.mixer.A_log"]
    model = archs.build("mixtral")
    params = model_layout(model).params
    found = coverage(model, find_linear_modules(model), params)  # as if a hub kernel bypassed the hook
    assert found["share"] < 0.5
    assert {u["role"] for u in found["undiagnosed"]} == {"model.layers.*.mlp.experts.gate_up_proj",
                                                         "model.layers.*.mlp.experts.down_proj"}
    assert all("experts' hook" in u["reason"] for u in found["undiagnosed"])
