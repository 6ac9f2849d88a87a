"""The sweep of tiny architectures itself: every model builds, runs on its inputs, and exposes
its projections (3-D expert weights included)."""

from __future__ import annotations

import pytest
import torch

import archs
from conftest import make_batches

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "jamba"}


def test_the_sweep_covers_the_families():
    kinds = [a.kind for a in archs.ARCHS.values()]
    assert len(archs.ARCHS) >= 30 and kinds.count("vlm") >= 2 and {"seq2seq", "encoder"} <= set(kinds)


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_builds_runs_and_lists_its_projections(name):
    model = archs.build(name)
    batch = make_batches(2, 8, 2, vocab=archs.SAFE_VOCAB, lengths=[8, 5])[0]
    with torch.no_grad():
        model(**archs.inputs(name, batch))
    kinds = [kind for kind, _ in archs.projections(model).values()]
    assert kinds.count("linear") + kinds.count("conv1d") >= 4
    assert ("experts" in kinds) == (name in MOE)
