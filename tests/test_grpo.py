"""``--method grpo``: TRL's real GRPOTrainer on a tiny real LLaMA, through plop's placement, LoRA+,
checkpoints and summary; reward functions resolved from MODULE:FUNCTION and checked up front."""

from __future__ import annotations

import json

import pytest
import torch

from plop import LoraSettings, TrainConfig, train
from plop.errors import ConfigError, PlopError
from plop.finetune.config import SUMMARY_FILE
from plop.files.reward import RewardError, load_reward
from tiny_lm import examples, make_model, make_tokenizer

pytestmark = pytest.mark.heavy  # trains several runs or builds large meta models: `make test`, not the fast tier

torch.set_num_threads(1)


def digits(completions, response, **kwargs) -> list[float]:
    """Share of the completion's characters that are digits, plus 1 when it starts with the answer:
    a dense signal a tiny random model can climb."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) + float(c.strip().startswith(r))
            for c, r in zip(completions, response)]


def grpo_config(tmp_path, **fields) -> TrainConfig:
    defaults = {"method": "grpo", "reward": digits, "steps": 3, "lr": 1e-2, "batch_size": 8, "num_generations": 4,
                "max_new_tokens": 6, "logging_steps": 1, "output_dir": str(tmp_path / "run")}
    return TrainConfig(**{**defaults, **fields})


def adapted(model) -> set[str]:
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_grpo_trains_the_plan_through_trl_and_records_method_and_reward(tmp_path):
    from trl import GRPOTrainer

    result = train(make_model(), make_tokenizer(), examples(24), grpo_config(tmp_path, eval_steps=1),
                   placement="mlp", progress=False)
    assert isinstance(result.trainer, GRPOTrainer)
    assert adapted(result.model) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                                     for p in ("gate_proj", "up_proj", "down_proj")}
    # LoRA+ reached the GRPO optimizer: B's learning rate is 16 x A's
    rates = sorted({group["lr"] for group in result.trainer.optimizer.param_groups if group["params"]})
    assert rates[-1] == pytest.approx(16 * rates[0])
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)  # B starts at 0

    saved = json.loads((result.adapter_path / SUMMARY_FILE).read_text())
    assert saved["method"] == "grpo" and saved["reward"] == f"{__name__}:digits"
    assert saved["config"]["reward"] == f"{__name__}:digits" and saved["steps"] == 3
    assert [p["step"] for p in saved["reward_curve"]] == [1, 2, 3]
    assert all(0 <= p["reward"] <= 2 for p in saved["reward_curve"])
    assert [p["step"] for p in saved["eval_reward_curve"]] == [1, 2, 3]
    assert saved["eval_reward_curve"][-1]["reward"] == pytest.approx(saved["eval_after"]["reward"])
    assert 0 <= saved["eval_before"]["reward"] <= 2
    assert (result.adapter_path / "adapter_model.safetensors").is_file()


def test_grpo_resumes_from_its_checkpoint(tmp_path):
    first = train(make_model(), make_tokenizer(), examples(24), grpo_config(tmp_path, steps=2, save_steps=2),
                  placement="qv", progress=False)
    assert (first.adapter_path / "checkpoint-2").is_dir()
    again = train(make_model(), make_tokenizer(), examples(24), grpo_config(tmp_path, steps=4, save_steps=2,
                                                                            resume=True), placement="qv", progress=False)
    assert again.summary["resumed_from"].endswith("checkpoint-2") and again.summary["steps"] == 4
    assert [p["step"] for p in again.summary["reward_curve"]] == [1, 2, 3, 4]  # the log history resumes too


def test_grpo_settings_fail_in_one_line_before_training(tmp_path):
    with pytest.raises(ConfigError, match="--method grpo needs a reward"):
        TrainConfig(method="grpo")
    with pytest.raises(ConfigError, match="a reward is for --method grpo"):
        TrainConfig(reward=digits)
    with pytest.raises(ConfigError, match=r"batch_size x grad_accum \(6\) must be a multiple of num_generations \(4\)"):
        TrainConfig(method="grpo", reward=digits, batch_size=6, num_generations=4)
    with pytest.raises(PlopError, match="needs a prompt in every row"):
        train(make_model(), make_tokenizer(), [e.__class__("", e.response) for e in examples(8)],
              grpo_config(tmp_path), placement="qv", progress=False)


def test_reward_specs_resolve_or_fail_in_one_line(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text("def ok(completions, **kwargs):\n    return [1.0] * len(completions)\n"
                      "def positional_only(texts):\n    return []\n"
                      "def wrong_length(completions, **kwargs):\n    return [1.0]\n"
                      "NOT_A_FUNCTION = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward("my_rewards:ok")(completions=["a", "b"], prompts=["p", "q"]) == [1.0, 1.0]
    assert load_reward(f"{module}:ok").__name__ == "ok"  # a .py path works as well
    with pytest.raises(ConfigError, match="reward must be MODULE:FUNCTION, got 'my_rewards.ok'"):
        load_reward("my_rewards.ok")
    with pytest.raises(RewardError, match="no reward module 'no_such_rewards'"):
        load_reward("no_such_rewards:ok")
    with pytest.raises(RewardError, match="reward module 'my_rewards' has no 'missing'"):
        load_reward("my_rewards:missing")
    with pytest.raises(RewardError, match="reward 'my_rewards:NOT_A_FUNCTION' is not a function"):
        load_reward("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(RewardError, match=r"reward positional_only does not take TRL's arguments .*\(define it as "
                                          r"f\(completions, \*\*kwargs\) -> list\[float\]\)"):
        load_reward("my_rewards:positional_only")
    with pytest.raises(RewardError, match="must return one finite number .* per completion, 2 here; it returned "
                                          "a list of 1"):
        load_reward("my_rewards:wrong_length")(completions=["a", "b"])


REWARDS = '''def digits(completions, response, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def no_kwargs(completions):
    return [0.0] * len(completions)
'''


@pytest.mark.spawns
def test_cli_grpo_under_torchrun_one_writer_tensorboard_resume(tmp_path):
    from test_distributed import ok, plop
    from tiny_lm import save_tiny, write_jsonl

    (tmp_path / "rewards.py").write_text(REWARDS)
    common = [save_tiny(tmp_path / "model"), "--data", write_jsonl(tmp_path / "d.jsonl", 24), "--method", "grpo",
              "--reward", f"{tmp_path / 'rewards.py'}:digits", "--placement", "attention", "--rank", "2",
              "--batch-size", "4", "--num-generations", "4", "--max-new-tokens", "4", "--output-dir", tmp_path / "run"]
    first = ok(plop("train", *common, "--steps", "2", "--report-to", "tensorboard", processes=2))
    assert first.stdout.count("adapter written to") == 1 and "GRPO (" in first.stdout
    assert "held-out greedy reward" in first.stdout
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert (summary["method"], summary["world_size"], summary["global_batch"]) == ("grpo", 2, 8)
    assert summary["reward"].endswith("rewards.py:digits")
    assert sorted(summary["types"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))

    ok(plop("train", *common, "--steps", "3", "--resume", processes=2))
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("checkpoint-2")

    bad = plop("train", *common, "--steps", "1", "--overwrite", "--reward", f"{tmp_path / 'rewards.py'}:no_kwargs")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "plop: error: reward no_kwargs does not take TRL's arguments (got an unexpected keyword argument 'prompts') "
        "(define it as f(completions, **kwargs) -> list[float])"]


def test_compare_grpo_reports_held_out_reward_at_a_matched_budget(tmp_path):
    from rich.console import Console

    from plop import compare, diagnose

    tokenizer = make_tokenizer()
    report = diagnose(make_model(), examples(16), tokenizer, n_bootstrap=10)
    result = compare(make_model(), tokenizer, examples(24), report, placements=["recommended", "mlp"], seeds=[0],
                     rank=2, config=grpo_config(tmp_path, steps=2, eval_steps=2))
    rows = {r.placement: r for r in result.rows}
    assert set(rows) == {"recommended", "mlp"}
    assert all(r.eval_reward_after is not None and r.eval_loss_after is None for r in rows.values())
    assert rows["mlp"].eval_reward_curve == [{"step": 2, "reward": rows["mlp"].eval_reward_after}]
    saved = json.loads(result.save(tmp_path / "c.json").read_text())
    assert saved["settings"]["method"] == "grpo" and saved["settings"]["reward"] == f"{__name__}:digits"
    console = Console(width=100, record=True)
    console.print(result)
    text = console.export_text()
    assert "reward after" in text and "held-out greedy reward before training" in text
    result.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_the_curve_s_last_point_is_the_after_reward_not_a_second_measurement(tmp_path):
    """Greedy completions of unchanged weights: the reward after training is the curve's point at
    the last step, taken once (held-out prompts are scored before, then at steps 1, 2, 3)."""
    held_out = examples(24)[-4:]
    asked = []

    def counting(prompts, completions, response, **kwargs) -> list[float]:
        asked.append(list(prompts))
        return digits(completions, response)

    result = train(make_model(), make_tokenizer(), examples(24)[:-4], grpo_config(tmp_path, reward=counting,
                   eval_steps=1), placement="mlp", eval_examples=held_out, progress=False)
    assert sum(p == [e.prompt for e in held_out] for p in asked) == 4
    assert result.summary["eval_after"]["reward"] == result.summary["eval_reward_curve"][-1]["reward"]


def test_train_takes_the_method_and_reward_as_keywords(tmp_path):
    """``plop.train(..., method="grpo", reward=fn)``: keywords replace the config's fields."""
    result = train(make_model(), make_tokenizer(), examples(12), method="grpo", reward=digits, steps=1, batch_size=4,
                   num_generations=4, max_new_tokens=4, output_dir=str(tmp_path / "run"), placement="mlp",
                   progress=False)
    assert result.summary["method"] == "grpo" and result.summary["reward"] == f"{__name__}:digits"
    with pytest.raises(ConfigError, match="must be a multiple of num_generations"):  # the config's own checks
        train(make_model(), make_tokenizer(), examples(12), method="grpo", reward=digits, num_generations=3,
              batch_size=4, output_dir=str(tmp_path / "bad"), progress=False)


def test_one_seed_pairs_every_placement_by_its_samples(tmp_path):
    """At step 1 every B is zero, so every placement is the same policy: at one seed they sample the
    same completions (the same mean reward) and have the same loss, whatever their adapters draw
    from the global random stream (LoRA dropout 0.05 here, on 3 and on 7 module types)."""
    from plop import compare, diagnose

    tokenizer = make_tokenizer()
    report = diagnose(make_model(), examples(16), tokenizer, n_bootstrap=10)
    result = compare(make_model(), tokenizer, examples(24), report, seeds=[0], rank=2,
                     placements=["mlp", "all-linear"], config=grpo_config(tmp_path, steps=1,
                                                                          lora=LoraSettings(dropout=0.05)))
    first = {(r.reward_curve[0]["reward"], r.loss_curve[0]["loss"]) for r in result.rows}
    assert len(result.rows) == 2 and len(first) == 1, first


def test_the_lr_choice_never_scores_the_held_out_prompts(tmp_path):
    """Under an lr_grid the held-out prompts are scored only by the reported runs, before and after
    each; the choice is made on a validation split of the training rows."""
    from plop import compare, diagnose

    held_out = examples(28)[24:]
    seen: list[list[str]] = []

    def counting(prompts, completions, response, **kwargs) -> list[float]:
        seen.append(list(prompts))
        return digits(completions, response)

    tokenizer = make_tokenizer()
    report = diagnose(make_model(), examples(16), tokenizer, n_bootstrap=10)
    result = compare(make_model(), tokenizer, examples(24), report, seeds=[0], rank=2, placements=["mlp"],
                     config=grpo_config(tmp_path, steps=1, reward=counting), eval_examples=held_out,
                     lr_grid=[1.0, 2.0], select_seeds=[5])
    held = [e.prompt for e in held_out]  # scored in one call, in this order
    assert sum(p == held for p in seen) == 2 * len(result.rows)  # before and after each reported run
    assert len(result.settings["lr_selection"]) == 2
    assert all(len(r.eval_items_after) == len(held_out) for r in result.rows)
