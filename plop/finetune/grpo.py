"""``plop train --method grpo``: TRL's ``GRPOTrainer`` on the same placement, adapter, LoRA+ optimizer,
checkpoints and summary as supervised fine-tuning (:mod:`plop.finetune.trainer` runs both).

What differs from SFT is confined here: the data are the prompts alone (each row's reference
response goes to the reward as ``response=[...]``, where a verifiable reward needs it), the
trainer samples ``num_generations`` completions per prompt with the model's own generation
settings (those ``plop diagnose --generate`` reads), and a run is judged by the mean reward of
greedy completions of held-out prompts instead of an eval loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import PlopError
from ..files.data import Example
from ..measure.generate import complete, sampling_settings
from .config import TrainConfig
from ..files.reward import DATA_FIELDS, load_reward
from .sft import split_examples


class GRPO:
    """GRPO's parts of a run (:class:`plop.finetune.method.Method`)."""

    @staticmethod
    def datasets(examples: Sequence[Example], tokenizer, config: TrainConfig,
                 eval_examples: Sequence[Example] | None = None, seq2seq: bool = False) -> tuple[list, list]:
        """Train and held-out rows ``{"prompt", "response"}`` (the same seeded split as SFT's)."""
        if seq2seq:
            raise PlopError("--method grpo trains decoder-only models", "TRL's GRPOTrainer generates with a causal LM")
        parts = (examples, eval_examples) if eval_examples is not None else \
            split_examples(examples, config.eval_fraction, config.seed)
        train_set, eval_set = ([{"prompt": e.prompt, **{f: getattr(e, f) for f in DATA_FIELDS}} for e in part]
                               for part in parts)
        if not train_set or any(not row["prompt"] for row in train_set + eval_set):
            raise PlopError("--method grpo needs a prompt in every row",
                            "give prompt/response data (a prompt field, a template or --chat)")
        return train_set, eval_set

    @staticmethod
    def arguments(config: TrainConfig, model) -> dict[str, Any]:
        """``GRPOConfig`` on top of the run's ``TrainingArguments``: sampling as the model's
        generation settings say, no Trainer eval (the held-out reward is measured here)."""
        from trl import GRPOConfig

        return {"args_class": GRPOConfig, "num_generations": config.num_generations,
                "max_completion_length": config.max_new_tokens, "eval_strategy": "no",
                # TRL's own defaults turn on bf16 mixed precision and gradient checkpointing; plop's
                # SFT runs use neither (the Trainer's defaults), and the two methods should differ
                # only in their objective
                "bf16": False, "activation_checkpointing": False, **sampling_settings(model)}

    @staticmethod
    def trainer(peft_model, tokenizer, args, datasets: tuple[list, list], callbacks: list, config: TrainConfig):
        from datasets import Dataset

        from .hf_trainer import grpo_trainer_class

        reward = load_reward(config.reward)
        trainer = grpo_trainer_class()(model=peft_model, reward_funcs=reward, args=args,
                                       train_dataset=Dataset.from_list(datasets[0]), processing_class=tokenizer,
                                       callbacks=callbacks, loraplus_ratio=config.lora.loraplus_ratio or 1.0)
        trainer.plop_reward = reward
        if config.eval_steps and datasets[1]:
            from .hf_trainer import EveryNSteps

            trainer.add_callback(EveryNSteps(config.eval_steps, lambda: _curve_point(trainer, datasets[1], config)))
        trainer.plop_eval_curve = []
        return trainer

    @staticmethod
    def evaluate(trainer, eval_set: list[dict], config: TrainConfig) -> dict[str, float]:
        curve = trainer.plop_eval_curve
        if curve and curve[-1]["step"] == trainer.state.global_step:  # the curve ended on this step
            return dict(curve[-1]["measured"])  # greedy and unchanged since: no second measurement
        items = held_out_rewards(trainer.model, trainer.processing_class, eval_set, trainer.plop_reward,
                                 max_new_tokens=config.max_new_tokens, max_length=config.max_length, state=trainer.state)
        scored = [v for v in items if v is not None]
        return {"reward": sum(scored) / len(scored) if scored else float("nan"), "items": items}

    @staticmethod
    def step_size(trainer, eval_set: list[dict], config: TrainConfig) -> dict[str, float]:
        """The policy's mean per-token KL to the base along the base's greedy held-out completions."""
        from .step_size import policy_kl

        model, tokenizer = trainer.model, trainer.processing_class
        sequences, training = [], model.training
        model.eval()
        with model.disable_adapter():
            for row in eval_set:
                prompt = tokenizer(row["prompt"], return_tensors="pt", truncation=True, max_length=config.max_length)
                ids = model.generate(**prompt.to(model.device), do_sample=False, max_new_tokens=config.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)[0]
                if ids.numel() > prompt["input_ids"].shape[1]:
                    sequences.append((ids, prompt["input_ids"].shape[1]))
        model.train(training)
        return {"policy_kl": policy_kl(model, sequences)}

    @staticmethod
    def summary(trainer) -> dict[str, Any]:
        """The mean sampled reward per logged step, and the held-out greedy reward every ``eval_steps``."""
        return {"reward_curve": [{"step": h["step"], "reward": h["reward"]}
                                 for h in trainer.state.log_history if "reward" in h],
                "eval_reward_curve": [{"step": p["step"], "reward": p["reward"]} for p in trainer.plop_eval_curve]}


def held_out_rewards(model, tokenizer, rows: list[dict], reward: Callable, *, max_new_tokens: int = 128,
                     max_length: int = 256, state=None) -> list[float | None]:
    """The reward of the model's greedy completion of each row's prompt, the reward called as TRL
    calls it (rows' other fields as keyword lists); ``None`` where the reward gives none."""
    prompts = [row["prompt"] for row in rows]
    completions = [group[0] for group in complete(model, tokenizer, prompts, sample=False,
                                                  max_new_tokens=max_new_tokens, max_length=max_length)]
    fields = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    return list(reward(prompts=prompts, completions=completions,
                       completion_ids=[tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
                       trainer_state=state, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **fields))


def _curve_point(trainer, eval_set: list[dict], config: TrainConfig) -> None:
    measured = GRPO.evaluate(trainer, eval_set, config)
    trainer.plop_eval_curve.append({"step": trainer.state.global_step, "reward": measured["reward"], "measured": measured})
