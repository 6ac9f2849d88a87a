"""The bundled trainer on a tiny real LLaMA: loss, LoRA+, DoRA, placement, saving, resuming, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from plop import LoraSettings, TrainConfig, diagnose, train
from plop.files.data import Example
from plop.errors import ConfigError, PlopError
from plop.finetune.config import SUMMARY_FILE
from plop.finetune.sft import SFTCollator, split_examples, tokenize_examples
from tiny_lm import examples, make_model, make_tokenizer

torch.set_num_threads(1)


def config(tmp_path, **fields) -> TrainConfig:
    defaults = {"steps": 3, "lr": 1e-2, "batch_size": 8, "output_dir": str(tmp_path / "run")}
    return TrainConfig(**{**defaults, **fields})


def adapted(model) -> set[str]:
    """Names of the base model's linear modules that carry a LoRA adapter."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def logits(model, tokenizer, text: str = "Q: 1+2?\nA: 3") -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt").to(model.device)).logits.cpu()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def report(tokenizer):
    return diagnose(make_model(), [e.text for e in examples(16)], tokenizer)


@pytest.mark.heavy
def test_loss_falls_and_summary_records_the_run(tmp_path, tokenizer):
    result = train(make_model(), tokenizer, examples(64), config(tmp_path, steps=30, logging_steps=1),
                   placement="all-linear", progress=False)
    curve = [p["loss"] for p in result.summary["loss_curve"]]
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < curve[0] - 0.2
    assert result.eval_after["loss"] < result.eval_before["loss"]
    assert result.eval_after["ppl"] == pytest.approx(torch.tensor(result.eval_after["loss"]).exp().item())

    saved = json.loads((result.adapter_path / SUMMARY_FILE).read_text())
    assert saved["placement"] == "all-linear" and saved["steps"] == 30
    assert saved["rank"] == 16 and saved["alpha"] == 32 and saved["loraplus_ratio"] == 16 and saved["dora"] is False
    assert saved["trainable_params"] == sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert saved["seconds_per_step"] > 0
    assert set(saved["versions"]) == {"plop", "torch", "transformers", "peft"}
    assert saved["eval_before"] == result.eval_before and saved["train_examples"] + saved["eval_examples"] == 64
    assert (result.adapter_path / "adapter_model.safetensors").is_file()


def test_saved_adapter_reloads_with_identical_outputs(tmp_path, tokenizer):
    from peft import PeftModel

    result = train(make_model(), tokenizer, examples(), config(tmp_path), placement="qv", progress=False)
    before = logits(result.model, tokenizer)
    reloaded = PeftModel.from_pretrained(make_model(), result.adapter_path).to(result.model.device)
    assert torch.equal(logits(reloaded, tokenizer), before)
    assert not torch.equal(logits(make_model(), tokenizer), before)  # the adapter does change the model


def test_only_the_recommended_modules_carry_adapters(tmp_path, tokenizer, report):
    result = train(make_model(), tokenizer, examples(), config(tmp_path), report=report, progress=False)
    assert adapted(result.model) == set(report.recommendation.modules)
    assert result.summary["placement"] == "recommended"
    assert result.summary["types"] == report.recommendation.types


@pytest.mark.heavy
def test_an_allocate_report_trains_each_type_at_its_own_rank(tmp_path, tokenizer):
    """What the README advises at a tight budget: diagnose --allocate, then train on that report."""
    report = diagnose(make_model(), [e.text for e in examples(16)], tokenizer, strategy="allocate")
    ranks = report.recommendation.rank_pattern
    result = train(make_model(), tokenizer, examples(), config(tmp_path), report=report, progress=False)
    wrapped = [(name.rsplit(".", 1)[-1], m) for name, m in result.model.named_modules() if hasattr(m, "lora_A")]
    assert {t for t, _ in wrapped} == set(ranks) and len(set(ranks.values())) > 1
    for t, module in wrapped:
        assert module.lora_A["default"].out_features == ranks[t]
        assert module.scaling["default"] == pytest.approx(2.0)
    assert result.summary["trainable_params"] == report.recommendation.trainable_params
    assert result.summary["rank_pattern"] == ranks  # the summary says the ranks trained, not config.rank


def test_named_placement_without_a_report(tmp_path, tokenizer):
    result = train(make_model(), tokenizer, examples(), config(tmp_path), placement="mlp", progress=False)
    assert {name.rsplit(".", 1)[1] for name in adapted(result.model)} == {"gate_proj", "up_proj", "down_proj"}
    assert result.summary["target_modules"] == ["down_proj", "gate_proj", "up_proj"]


@pytest.mark.heavy
def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tmp_path, tokenizer):
    def initial_lrs(ratio: float) -> dict[str, list[float]]:
        run = config(tmp_path / str(ratio), steps=1, lr=1e-3, lora=LoraSettings(loraplus_ratio=ratio))
        result = train(make_model(), tokenizer, examples(), run, placement="qv", progress=False)
        names = {id(p): n for n, p in result.model.named_parameters()}
        lrs: dict[str, set[float]] = {"lora_A": set(), "lora_B": set()}  # initial_lr: before the schedule
        for group in result.trainer.optimizer.param_groups:
            for p in group["params"]:
                lrs["lora_A" if "lora_A" in names[id(p)] else "lora_B"].add(group["initial_lr"])
        return {kind: sorted(values) for kind, values in lrs.items()}

    lrs = initial_lrs(16)
    assert lrs["lora_A"] == pytest.approx([1e-3]) and lrs["lora_B"] == pytest.approx([16e-3])
    lrs = initial_lrs(1)  # plain LoRA: one learning rate
    assert lrs["lora_A"] == lrs["lora_B"] == pytest.approx([1e-3])


def test_dora_trains_saves_and_reloads(tmp_path, tokenizer):
    from peft import PeftModel

    result = train(make_model(), tokenizer, examples(), config(tmp_path, lora=LoraSettings(use_dora=True, loraplus_ratio=16)), placement="qv", progress=False)
    assert json.loads((result.adapter_path / "adapter_config.json").read_text())["use_dora"] is True
    magnitudes = [n for n, p in result.model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == 4  # q_proj and v_proj in 2 layers
    assert result.summary["dora"] is True
    reloaded = PeftModel.from_pretrained(make_model(), result.adapter_path).to(result.model.device)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(result.model, tokenizer))


@pytest.mark.heavy
def test_resume_continues_from_the_last_checkpoint(tmp_path, tokenizer):
    first = train(make_model(), tokenizer, examples(), config(tmp_path, steps=4, logging_steps=1), placement="qv",
                  progress=False)
    assert (first.adapter_path / "checkpoint-4").is_dir()
    second = train(make_model(), tokenizer, examples(), config(tmp_path, steps=8, logging_steps=1, resume=True),
                   placement="qv", progress=False)
    assert second.trainer.state.global_step == 8 and second.summary["steps"] == 8
    assert second.summary["resumed_from"].endswith("checkpoint-4")
    curve = second.summary["loss_curve"]
    assert [p["step"] for p in curve] == list(range(1, 9))
    assert curve[:4] == first.summary["loss_curve"]  # the first 4 steps come from the checkpoint, not a rerun


@pytest.mark.heavy
def test_without_a_placement_train_diagnoses_first_as_plop_train_does(tmp_path, tokenizer):
    """``plop.train(model, tokenizer, examples)`` places the adapters by a diagnosis of its own data,
    saved in the run directory and kept on resume; ``plop train`` on the same model and data trains
    the same modules on the same saved recommendation."""
    from peft import PeftModel

    from plop import load_examples
    from plop.cli import main
    from plop.finetune.config import REPORT_FILE
    from tiny_lm import save_tiny, write_jsonl

    folder, data, cli = save_tiny(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl"), tmp_path / "cli"
    assert main(["train", str(folder), "--data", str(data), "--steps", "2", "--output-dir", str(cli)]) == 0
    rows, _ = load_examples(str(data), tokenizer=tokenizer)  # read as plop train reads them
    api = train(make_model(), tokenizer, rows, TrainConfig(steps=2, output_dir=str(tmp_path / "api")), progress=False)
    saved = api.adapter_path / REPORT_FILE
    recommendation = json.loads(saved.read_text())["recommendation"]
    assert recommendation == json.loads((cli / REPORT_FILE).read_text())["recommendation"]
    assert api.summary["placement"] == "recommended" and api.report.recommendation.types == recommendation["types"]
    assert adapted(api.model) == adapted(PeftModel.from_pretrained(make_model(), cli))

    written = saved.stat().st_mtime_ns
    resumed = train(make_model(), tokenizer, rows, TrainConfig(steps=3, output_dir=str(tmp_path / "api"),
                                                                     resume=True), progress=False)
    assert saved.stat().st_mtime_ns == written and resumed.summary["steps"] == 3  # no second diagnosis
    assert resumed.report.recommendation == api.report.recommendation


@pytest.mark.heavy
def test_an_occupied_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path, tokenizer):
    train(make_model(), tokenizer, examples(), config(tmp_path, steps=2), placement="qv", progress=False)
    with pytest.raises(PlopError, match="already holds a training run"):
        train(make_model(), tokenizer, examples(), config(tmp_path, steps=2), placement="qv", progress=False)
    again = train(make_model(), tokenizer, examples(), config(tmp_path, steps=2, overwrite=True), placement="qv",
                  progress=False)
    assert again.summary["resumed_from"] is None and again.summary["steps"] == 2
    with pytest.raises(PlopError, match="no checkpoint to resume"):
        train(make_model(), tokenizer, examples(), config(tmp_path / "empty", resume=True), placement="qv",
              progress=False)


def test_a_report_for_another_model_is_refused(tmp_path, tokenizer, report):
    with pytest.raises(PlopError, match="another model.*modules differ"):
        train(make_model(hidden=48), tokenizer, examples(), config(tmp_path), report=report, progress=False)


def test_target_modules_matching_nothing_list_the_types(tmp_path, tokenizer):
    with pytest.raises(PlopError, match=r"match no linear module.*q_proj.*v_proj"):
        train(make_model(), tokenizer, examples(), config(tmp_path), target_modules=["c_attn"], progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"r": 0}, "rank"), ({"lr": 0}, "lr"), ({"lr": 2.0}, "lr"), ({"loraplus_ratio": 0.5}, "loraplus_ratio"),
    ({"eval_fraction": 1.0}, "eval_fraction"), ({"dropout": 1.0}, "dropout"), ({"steps": 5, "epochs": 1}, "not both"),
    ({"resume": True, "overwrite": True}, "exclude"), ({"adapter_name": "a/b"}, "plain name"),
])
def test_config_ranges_are_checked(fields, message):
    lora = {k: fields.pop(k) for k in ("r", "loraplus_ratio", "dropout") if k in fields}  # LoraSettings checks them
    with pytest.raises(ValueError, match=message):
        TrainConfig(lora=LoraSettings(**lora), **fields)


def test_loss_goes_on_the_response_only(tokenizer):
    [feature] = tokenize_examples([Example("Q: 1?\nA: ", "2")], tokenizer, max_length=64)
    n_prompt = len(tokenizer("Q: 1?\nA: ")["input_ids"])
    assert feature["input_ids"][-1] == tokenizer.eos_token_id
    assert feature["labels"][:n_prompt] == [-100] * n_prompt
    assert feature["labels"][n_prompt:] == feature["input_ids"][n_prompt:]
    [whole] = tokenize_examples([Example("", "some text")], tokenizer, max_length=64)
    assert whole["labels"] == whole["input_ids"]
    # a prompt that fills max_length leaves nothing to learn: dropped
    assert tokenize_examples([Example("x" * 80, "y")], tokenizer, max_length=64) == []

    batch = SFTCollator(tokenizer.pad_token_id)([feature, whole])
    width = max(len(feature["input_ids"]), len(whole["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    pad = width - len(whole["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * len(whole["input_ids"]) + [0] * pad
    assert batch["labels"][1].tolist()[-pad:] == [-100] * pad


def test_eval_split_is_seeded_and_disjoint():
    data = [Example(str(i), "x") for i in range(20)]
    train_a, eval_a = split_examples(data, 0.25, seed=3)
    assert (train_a, eval_a) == split_examples(data, 0.25, seed=3)
    assert len(eval_a) == 5 and sorted(e.prompt for e in train_a + eval_a) == sorted(e.prompt for e in data)
    assert split_examples(data, 0.0, seed=3) == (data, [])


def test_tensorboard_gets_the_loss_placement_and_heatmap(tmp_path, tokenizer, report, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # a writer opened in the working directory would show up here
    result = train(make_model(), tokenizer, examples(32), config(tmp_path, steps=4, logging_steps=1,
                                                                report_to="tensorboard"),
                   report=report, progress=False)
    events = sorted(result.adapter_path.rglob("events.out.tfevents.*"))
    assert events and {e.parent for e in events} == {result.adapter_path / "runs"}  # nothing written elsewhere
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "tensors": 0, "scalars": 0}).Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 4 and losses == pytest.approx([p["loss"] for p in result.summary["loss_curve"]])
    image = acc.Images("plop/nfn")
    assert [e.step for e in image] == [0] and image[0].encoded_image_string.startswith(b"\x89PNG")
    text = acc.Tensors("plop/placement/text_summary")
    assert [e.step for e in text] == [0]
    logged = text[0].tensor_proto.string_val[0].decode()
    assert "recommended" in logged and all(t in logged for t in report.recommendation.types)
    assert not (tmp_path / "runs").exists()


def test_report_to_needs_a_known_installed_logger(tmp_path):
    with pytest.raises(PlopError, match="report_to"):
        config(tmp_path, report_to="mlflow")


def test_nfn_is_remeasured_after_training_adapted_against_frozen(tmp_path, tokenizer):
    texts = [e.text for e in examples(16)]
    result = train(make_model(), tokenizer, examples(48), config(tmp_path, steps=12), placement="qv",
                   remeasure=texts, progress=False)
    change = result.summary["nfn_change"]
    assert {t for t, c in change.items() if c["has_adapter"]} == {"q_proj", "v_proj"}
    # frozen: exactly the untrained model's diagnosis on the same rows
    frozen = {t.type: t.nfn_mean for t in diagnose(make_model(), texts, tokenizer, n_bootstrap=1).types}
    assert {t: c["frozen"] for t, c in change.items()} == pytest.approx(frozen, rel=1e-9)
    # the adapted types moved
    assert all(abs(change[t]["delta"]) > 1e-6 for t in ("q_proj", "v_proj"))
    for t, c in change.items():
        assert c["delta"] == pytest.approx(c["adapted"] - c["frozen"])
    # the trained model itself was not merged or changed by the re-measure
    assert any("lora_A" in n for n, _ in result.model.named_modules())
    assert json.loads((result.adapter_path / SUMMARY_FILE).read_text())["nfn_change"] == change


@pytest.mark.heavy
def test_a_constant_schedule_holds_the_rate_after_its_warm_up(tmp_path):
    """lr_schedule="constant" with warmup_steps=2: the logged rate rises over the warm-up, then stays
    at lr to the last step (the default decays linearly to 0)."""
    tokenizer = make_tokenizer()
    config = TrainConfig(steps=5, lr=1e-2, batch_size=4, logging_steps=1, lr_schedule="constant", warmup_steps=2,
                         output_dir=str(tmp_path / "c"))
    rates = [p["lr"] for p in train(make_model(), tokenizer, examples(24), config, placement="mlp",
                                    progress=False).summary["loss_curve"]]
    assert rates[0] < rates[1] <= 1e-2 and rates[2:] == pytest.approx([1e-2] * 3)
    decayed = train(make_model(), tokenizer, examples(24), replace(config, lr_schedule="linear", warmup_steps=0,
                                                                   output_dir=str(tmp_path / "l")), placement="mlp",
                    progress=False).summary["loss_curve"]
    assert decayed[-1]["lr"] < decayed[0]["lr"]
    with pytest.raises(ConfigError, match="lr_schedule must be one of linear, constant"):
        TrainConfig(lr_schedule="cosine")
