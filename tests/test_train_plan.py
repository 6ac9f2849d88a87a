"""``plop train`` stops before training when PEFT builds another adapter than planned."""

from __future__ import annotations

import copy

import pytest

from plop import TrainConfig, diagnose, train
from plop.errors import PlopError
from plop.finetune.config import SUMMARY_FILE
from plop.finetune.trainer import train_on_placement
from plop.placement import Placement
from tiny_lm import examples, make_model, make_tokenizer


def _config(tmp_path) -> TrainConfig:
    return TrainConfig(steps=1, lr=1e-2, batch_size=8, output_dir=str(tmp_path / "run"))


def test_a_plan_peft_cannot_match_is_refused_before_training(tmp_path):
    """The plan names up_proj and down_proj; the target_modules PEFT gets reach up_proj only."""
    plan, config = Placement(name="mlp", target_modules=["up_proj"], types=["up_proj", "down_proj"]), _config(tmp_path)
    with pytest.raises(PlopError, match=r"PEFT built a different adapter than planned: 2 planned not wrapped "
                                        r"\(e\.g\. model\.layers\.0\.mlp\.down_proj\); nothing was trained"):
        train_on_placement(make_model(), make_tokenizer(), examples(), config, plan, progress=False)
    assert not (config.run_dir / SUMMARY_FILE).exists()


def test_a_hand_edited_report_is_refused(tmp_path):
    """A report whose recommendation lists layer 0 only while its suffix targets reach every layer."""
    tokenizer = make_tokenizer()
    report = diagnose(make_model(), [e.text for e in examples(16)], tokenizer)
    edited = copy.deepcopy(report)
    edited.recommendation.modules = [m for m in edited.recommendation.modules if ".layers.0." in m]
    with pytest.raises(PlopError, match=r"wrapped outside the plan \(e\.g\. model\.layers\.1\."):
        train(make_model(), tokenizer, examples(), _config(tmp_path), report=edited, progress=False)
    result = train(make_model(), tokenizer, examples(), _config(tmp_path / "ok"), report=report, progress=False)
    adapted = {n.removeprefix("base_model.model.") for n, m in result.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(report.recommendation.modules)  # the unedited plan trains
    assert (result.adapter_path / SUMMARY_FILE).is_file()  # the file a refused run must not leave
