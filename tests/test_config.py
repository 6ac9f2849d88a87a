"""Configs refuse bad settings at construction, before any model is loaded or any forward runs."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from plop import ConfigError, DiagnoseConfig, LoraSettings, Strategy, TrainConfig, diagnose
from conftest import make_batches


@pytest.mark.parametrize("fields, message", [
    ({"strategy": "best"}, "strategy must be one of"), ({"estimator": "exact"}, "estimator must be one of"),
    ({"budget": -5}, "budget must be a positive parameter budget"), ({"strategy": "budget"}, "needs a positive"),
    ({"top_k": 0}, "top_k must be a positive integer"), ({"samples": "many"}, "samples must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer")])
def test_diagnose_config_refuses_at_construction(fields, message):
    with pytest.raises(ConfigError, match=message):
        DiagnoseConfig().with_overrides(**fields)  # a strategy's parts named as plop.diagnose takes them


def test_a_bad_strategy_fails_before_the_first_forward():
    class Exploding:  # any forward would raise something else than ConfigError
        training = False

        def __getattr__(self, name):
            raise AssertionError(f"the model was touched ({name})")

    with pytest.raises(ConfigError, match="strategy"):
        diagnose(Exploding(), make_batches(4, 4), strategy="lowest")


def test_train_config_alpha_follows_the_rank_unless_set():
    config = TrainConfig()
    assert config.lora.alpha is None and config.lora.lora_alpha == 32 and config.lora.loraplus_ratio == 16
    assert replace(config.lora, r=8).lora_alpha == 16
    assert replace(LoraSettings(alpha=10), r=8).lora_alpha == 10
    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(lora=LoraSettings(alpha=-1))
    with pytest.raises(ConfigError, match="LoraSettings"):
        TrainConfig(lora={"r": 8})


def test_train_config_takes_its_old_lora_keywords_for_one_release_with_a_warning():
    """``TrainConfig(rank=..., dora=...)`` and ``replace(config, rank=...)`` set ``lora``, and say how
    to write them now; they are not fields any more (LoraSettings is their one home)."""
    with pytest.warns(FutureWarning, match=r"lora=LoraSettings\(r=, alpha=, dropout=, use_dora=, loraplus_ratio="):
        config = TrainConfig(rank=8, alpha=16, dropout=0.1, dora=True, loraplus_ratio=1, steps=3)
    assert config.lora == LoraSettings(8, 16, 0.1, use_dora=True, loraplus_ratio=1) and config.steps == 3
    with pytest.warns(FutureWarning, match="replace"):
        assert replace(config, rank=4).lora == replace(config.lora, r=4)
    with pytest.warns(FutureWarning):  # onto the lora given
        assert TrainConfig(lora=LoraSettings(alpha=10), rank=8).lora == LoraSettings(8, 10)
    assert "rank" not in {f.name for f in fields(TrainConfig)}
    assert TrainConfig(lora=LoraSettings(r=4, use_dora=True)).record()["r"] == 4  # the record stays flat


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


@pytest.mark.parametrize("argv, api, expected", [
    ([], {}, Strategy()),
    (["--top-k", "2"], {"top_k": 2}, Strategy("top_k", top_k=2)),
    (["--budget", "1000"], {"budget": 1000}, Strategy("budget", budget=1000)),
    (["--per-layer"], {"strategy": "per_layer"}, Strategy("per_layer")),
    (["--allocate"], {"strategy": "allocate"}, Strategy("allocate")),  # no budget: what the top-k costs
    (["--allocate", "5000"], {"strategy": "allocate", "budget": 5000}, Strategy("allocate", budget=5000)),
])
def test_the_command_line_the_plugin_and_the_api_decode_one_strategy(argv, api, expected):
    from plop.cli import build_parser
    from plop.cli.options import build
    from plop.config import StrategyFlags

    flags = build(StrategyFlags, build_parser().parse_args(["diagnose", *argv])).strategy()
    keys = Strategy.decode(top_k=api.get("top_k"), budget=api.get("budget"),  # the axolotl plugin's plop_* keys
                           allocate=api.get("strategy") == "allocate", per_layer=api.get("strategy") == "per_layer")
    assert flags == keys == DiagnoseConfig().with_overrides(**api).strategy == expected


def test_named_parts_replace_those_of_the_config_strategy():
    allocating = DiagnoseConfig(strategy=Strategy("allocate", budget=9000))
    assert allocating.with_overrides(top_k=2).strategy == Strategy("allocate", top_k=2, budget=9000)
    assert allocating.with_overrides(strategy=Strategy()).strategy == Strategy()
    with pytest.raises(ConfigError, match="two strategies"):
        Strategy.decode("top_k", allocate=True)
    with pytest.raises(ConfigError, match="not both"):
        DiagnoseConfig().with_overrides(strategy=Strategy(), top_k=2)
    with pytest.raises(ConfigError, match="allocate_power must be positive"):
        DiagnoseConfig().with_overrides(allocate_power=0)
    with pytest.raises(ConfigError, match="strategy must be a Strategy"):
        DiagnoseConfig(strategy="allocate")
