"""The sweep of tiny architectures itself: every model builds, runs on its inputs, and exposes
its projections (3-D expert weights included)."""

from __future__ import annotations

import pytest
import torch

import archs
from conftest import make_batches

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "jamba", "llama4_text"}


def test_the_sweep_builds_the_families_it_claims():
    """The built models themselves, not the table: vision towers beside a language model, encoder-
    decoders with cross-attention, encoders without a causal head, and MoE blocks with 3-D experts."""
    families = {"vlm": 0, "seq2seq": 0, "encoder": 0}
    for name, arch in archs.ARCHS.items():
        model = archs.build(name)
        names = [n for n, _ in model.named_modules()]
        if any(tower in n for n in names for tower in ("vision_tower", "visual", "vision_model")):
            families["vlm"] += 1
        if getattr(model.config, "is_encoder_decoder", False) and any("encoder" in n for n in names):
            families["seq2seq"] += 1
        if arch.kind == "encoder" and not getattr(model.config, "is_decoder", False):
            families["encoder"] += 1
    assert len(archs.ARCHS) >= 30 and families["vlm"] >= 2 and families["seq2seq"] >= 1 and families["encoder"] >= 1


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_builds_runs_and_lists_its_projections(name):
    model = archs.build(name)
    batch = make_batches(2, 8, 2, vocab=archs.SAFE_VOCAB, lengths=[8, 5])[0]
    with torch.no_grad():
        model(**archs.inputs(name, batch))
    kinds = [kind for kind, _ in archs.projections(model).values()]
    assert kinds.count("linear") + kinds.count("conv1d") >= 4
    assert ("experts" in kinds) == (name in MOE)
