"""Configs refuse bad settings at construction, before any model is loaded or any forward runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from plop import ConfigError, DiagnoseConfig, TrainConfig, diagnose
from conftest import make_batches


@pytest.mark.parametrize("fields, message", [
    ({"strategy": "best"}, "strategy must be one of"), ({"estimator": "exact"}, "estimator must be one of"),
    ({"budget": -5}, "budget must be a positive parameter budget"), ({"strategy": "budget"}, "needs a positive"),
    ({"top_k": 0}, "top_k must be a positive integer"), ({"samples": "many"}, "samples must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer")])
def test_diagnose_config_refuses_at_construction(fields, message):
    with pytest.raises(ConfigError, match=message):
        DiagnoseConfig(**fields)


def test_a_bad_strategy_fails_before_the_first_forward():
    class Exploding:  # any forward would raise something else than ConfigError
        training = False

        def __getattr__(self, name):
            raise AssertionError(f"the model was touched ({name})")

    with pytest.raises(ConfigError, match="strategy"):
        diagnose(Exploding(), make_batches(4, 4), strategy="lowest")


def test_train_config_alpha_follows_the_rank_unless_set():
    config = TrainConfig()
    assert config.alpha is None and config.lora_alpha == 32
    assert replace(config, rank=8).lora_alpha == 16
    assert replace(TrainConfig(alpha=10), rank=8).lora_alpha == 10
    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(alpha=-1)


def test_shard_is_a_loading_option_that_feeds_the_diagnosis_too(tmp_path, capsys):
    from plop.cli import build_parser, main
    from plop.cli.options import build, values
    from plop.config import ModelConfig

    with pytest.raises(ConfigError, match="--shard combines with neither --quantize"):
        ModelConfig(shard=True, quantize="bnb-4bit")
    args = build_parser().parse_args(["diagnose", "--shard"])
    assert build(ModelConfig, args).shard and DiagnoseConfig(**values(DiagnoseConfig, args)).shard
    assert not hasattr(build_parser().parse_args(["train"]), "shard")  # train loads whole copies
    assert main(["diagnose", str(tmp_path / "no-model"), "--shard", "--max-memory", "2GiB"]) == 2
    assert "--shard combines with neither" in capsys.readouterr().err  # before any model is looked for
