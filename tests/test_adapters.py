"""Named task adapters on one base model: train into one directory, list, load side by side, merge."""

from __future__ import annotations

import pytest
import torch

from plop import TrainConfig, train
from plop.finetune.adapters import list_adapters, load_adapters, merge_adapter
from plop.files.data import Example
from plop.errors import PlopError
from tiny_lm import examples, make_model, make_tokenizer

torch.set_num_threads(1)
PROBE = "Q: 2+1?\nA: 3"


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt").to(model.device)).logits.cpu()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """Three adapters in one directory: ``default`` (at the root), ``add`` (qv) and ``shout`` (mlp)."""
    directory = tmp_path_factory.mktemp("adapters")
    shout = [Example(e.prompt, e.response + "!!") for e in examples()]
    for name, data, placement in (("default", examples(), "attention"), ("add", examples(), "qv"),
                                  ("shout", shout, "mlp")):
        config = TrainConfig(steps=4, lr=2e-2, batch_size=8, output_dir=str(directory), adapter_name=name)
        train(make_model(), tokenizer, data, config, placement=placement, progress=False)
    return directory


@pytest.mark.heavy
def test_named_adapters_land_in_their_own_folders(trained):
    assert (trained / "adapter_model.safetensors").is_file()
    assert (trained / "add" / "adapter_model.safetensors").is_file()
    assert (trained / "shout" / "plop_train_summary.json").is_file()


def test_list_adapters_reads_the_summaries(trained):
    rows = {r["name"]: r for r in list_adapters(trained)}
    assert list(rows) == ["default", "add", "shout"]  # checkpoint-N folders are not adapters
    assert rows["add"]["placement"] == "qv" and sorted(rows["add"]["target_modules"]) == ["q_proj", "v_proj"]
    assert rows["shout"]["placement"] == "mlp" and rows["shout"]["rank"] == 16 and rows["shout"]["steps"] == 4
    assert all(r["eval_loss_after"] < r["eval_loss_before"] for r in rows.values())


def test_load_adapters_side_by_side_and_switch(trained, tokenizer):
    from peft import PeftModel

    model = load_adapters(make_model(), trained, ["add", "shout"])
    assert set(model.peft_config) == {"add", "shout"} and model.active_adapter == "add"
    with_add = logits(model, tokenizer)
    model.set_adapter("shout")
    with_shout = logits(model, tokenizer)
    assert not torch.allclose(with_add, with_shout)
    alone = PeftModel.from_pretrained(make_model(), trained / "shout")
    torch.testing.assert_close(with_shout, logits(alone, tokenizer))
    assert set(load_adapters(make_model(), trained).peft_config) == {"default", "add", "shout"}


def test_merge_adapter_saves_a_plain_model_with_the_same_outputs(trained, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = logits(PeftModel.from_pretrained(make_model(), trained / "add"), tokenizer)
    out = merge_adapter(make_model(), trained, "add", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, AutoTokenizer.from_pretrained(out)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(PlopError, match="already holds a model"):
        merge_adapter(make_model(), trained, "add", out)


def test_unknown_adapter_names_are_refused(trained, tmp_path):
    with pytest.raises(PlopError, match="no adapter named 'mul'.*available: default, add, shout"):
        load_adapters(make_model(), trained, ["mul"])
    with pytest.raises(PlopError, match="holds no adapters"):
        merge_adapter(make_model(), tmp_path, "add", tmp_path / "out")
    assert list_adapters(tmp_path) == []
