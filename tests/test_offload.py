"""A model bigger than its memory cap: ``plop diagnose --max-memory --offload-dir`` keeps most
weights on disk (accelerate's big-model loading) and gives the NFN of a model held in memory."""

from __future__ import annotations

import json
import pytest

from test_distributed import ok, plop
from tiny_lm import save_tiny, write_jsonl

pytestmark = pytest.mark.spawns  # each test here starts plop or a training job as a process


def test_a_disk_offloaded_diagnosis_equals_one_in_memory(tmp_path):
    model, data = save_tiny(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl", 16)
    args = ["diagnose", model, "--data", data, "--samples", "16", "--out"]
    ok(plop(*args, tmp_path / "memory.json"))
    ok(plop(*args, tmp_path / "offload.json", "--max-memory", "20KB", "--offload-dir", tmp_path / "offload"))
    memory, offload = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("memory", "offload"))
    for a, b in zip(memory["modules"], offload["modules"], strict=True):
        assert b["nfn"] == pytest.approx(a["nfn"], rel=1e-9), a["name"]
    assert offload["recommendation"] == memory["recommendation"]


def test_the_cap_puts_weights_on_disk(tmp_path):
    from plop.model.loading import load_model

    model, _, _ = load_model(str(save_tiny(tmp_path / "model")), device="cpu", max_memory="20KB",
                             offload_dir=tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())  # read from the safetensors file, layer by layer
