"""Quantized bases as QLoRA trains on them: bitsandbytes 8-bit and 4-bit NF4 layers on the CPU.

The collector reads ``‖W z‖`` from the quantized layer's own output and the baseline from its
dequantized weight, so the weight plop dequantizes must be the one the layer computes with, also
after the first forward (which moves 8-bit scales to the layer's state and repacks 4-bit codes for
the CPU kernel). The tiny LLaMA's NFN then stays within the quantization's own error of float32.
Skipped without bitsandbytes, except the verdict logic, which needs no model.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import plop
from plop.cli import main
from plop.errors import ConfigError, ModelError
from plop.model.layers import dense_weight, find_linear_modules
from plop.model.loading import load_model
from plop.ranking.precision import compare_precision, quantization_pair
from tiny_lm import examples, make_model, make_tokenizer

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
TEXTS = [e.prompt + e.response for e in examples(16)]
NFN_TOLERANCE = {"bnb-8bit": 0.01, "bnb-4bit": 0.03}  # relative, per module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA wide enough for 4-bit blocks (64 inputs) and the CPU kernel's 32-row tiles."""
    path = tmp_path_factory.mktemp("tiny64")
    make_model(seed=3, hidden=64).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reports(model_dir) -> dict[str, plop.Report]:
    out = {}
    for quantize in ("none", *NFN_TOLERANCE) if importlib.util.find_spec("bitsandbytes") else ("none",):
        model, tokenizer, model_id = load_model(str(model_dir), device="cpu", quantize=quantize)
        out[quantize] = plop.diagnose(model, TEXTS, tokenizer, model_id=model_id, n_bootstrap=50)
    return out


@needs_bnb
@pytest.mark.parametrize("quantize", list(NFN_TOLERANCE))
def test_dense_weight_is_what_the_layer_computes(model_dir, quantize):
    model, _, _ = load_model(str(model_dir), device="cpu", quantize=quantize)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    for name, layer in find_linear_modules(model).items():
        if not name.endswith(("q_proj", "gate_proj")):
            continue
        before = dense_weight(layer).float()
        with torch.no_grad():
            y = layer(x).float()  # the first forward moves 8-bit scales and repacks 4-bit codes
        after = dense_weight(layer).float()
        assert torch.allclose(after, before, rtol=0, atol=2e-2 * before.abs().max()), name
        reference = x @ after.T
        # 8-bit also quantizes the activations (LLM.int8), 4-bit computes with bfloat16 block scales
        assert (y - reference).norm() / reference.norm() < 0.02, name


@needs_bnb
@pytest.mark.parametrize("quantize", list(NFN_TOLERANCE))
def test_quantized_nfn_stays_close_to_full_precision(reports, quantize):
    full, quantized = reports["none"], reports[quantize]
    assert full.model["quantization"] is None and quantized.model["quantization"] == quantize
    nfn = {m.name: m.nfn for m in full.modules}
    for m in quantized.modules:
        assert m.nfn == pytest.approx(nfn[m.name], rel=NFN_TOLERANCE[quantize]), m.name
    check = compare_precision(full, quantized)
    assert check.max_relative_change < NFN_TOLERANCE[quantize]
    assert quantization_pair(quantized, full) == (full, quantized)


def test_verdict_reads_the_bootstrap(reports):
    """A swapped type is within noise when either bootstrap was unsure of it, beyond noise when both were sure."""
    full = reports["none"]
    quantized = copy.deepcopy(full)
    quantized.model["quantization"] = "bnb-4bit"
    assert compare_precision(full, quantized).verdict == "same"
    out_type = next(t for t in quantized.types if t.type not in full.recommendation.types)
    quantized.recommendation.types = [*full.recommendation.types[:-1], out_type.type]
    dropped = next(t for t in full.types if t.type == full.recommendation.types[-1])
    for t in (*full.types, *quantized.types):
        t.selection_probability = 1.0 if t.type in full.recommendation.types else 0.0
    assert compare_precision(full, quantized).verdict == "beyond noise"
    dropped.selection_probability = 0.55
    out_type.selection_probability = 0.45
    check = compare_precision(full, quantized)
    assert check.verdict == "within noise" and set(check.changed) == {dropped.type, out_type.type}
    assert "within noise" in check.summary()


def test_quantization_pair_needs_the_same_rows(reports):
    full = reports["none"]
    other = copy.deepcopy(full)
    other.model["quantization"] = "bnb-8bit"
    assert quantization_pair(full, other) == (full, other)
    other.data["token_count"] += 1
    assert quantization_pair(full, other) is None
    assert quantization_pair(full, copy.deepcopy(full)) is None  # neither is quantized


def test_quantize_errors(model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="quantize must be one of"):
        load_model(str(model_dir), quantize="gptq")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelError, match="needs bitsandbytes"):
        load_model(str(model_dir), quantize="bnb-4bit")


@needs_bnb
def test_cli_diff_says_whether_quantization_moved_the_advice(model_dir, tmp_path, capsys):
    for quantize in ("none", "bnb-8bit"):
        assert main(["diagnose", str(model_dir), "--quantize", quantize, "--device", "cpu", "--samples", "8",
                     "--out", str(tmp_path / f"{quantize}.json")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "none.json"), str(tmp_path / "bnb-8bit.json"), "--json"]) == 0
    out = capsys.readouterr()
    assert "bnb-8bit vs full precision" in out.err
    assert '"verdict"' in out.out
