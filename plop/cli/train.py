"""``plop train``: fine-tune LoRA / LoRA+ / DoRA where the diagnosis says."""

from __future__ import annotations

import sys

from ..config import targets
from ..finetune.config import TrainConfig
from ..ranking.placements import TRAIN_PLACEMENTS
from ..utils.untrusted import plain_safe, terminal_safe
from .inputs import is_main, load_model_and_data, model_command
from .options import build

EXAMPLES = """examples:
  plop train --steps 100                          # embedded SmolLM2-135M, demo data: diagnose, then train there
  plop train ./my-model --data train.jsonl --report report.json --output-dir runs/math
  plop train --placement all-linear --rank 8 --loraplus-ratio 1 --epochs 2
  plop train --target-modules q_proj,v_proj --dora --lr 1e-4
  plop train --output-dir runs/math --steps 200 --resume     # continue from the last checkpoint
  plop train --method grpo --reward rewards.py:exact_match --placement all-linear --rank 1 --steps 100
  plop train --output-dir runs/tasks --adapter-name math     # a named adapter in runs/tasks/math/
  accelerate launch -m plop.cli train ./my-model --data train.jsonl   # several processes (docs/big-models/data-parallel.md)
"""


def register(sub) -> None:
    p = model_command(sub, "train", "fine-tune LoRA / LoRA+ / DoRA where the diagnosis says",
                      "Fine-tune adapters with transformers' Trainer. Without --report, --target-modules or "
                      "--placement, the model is diagnosed on the same data first.", EXAMPLES,
                      train_config=TrainConfig).parser
    where = p.add_argument_group("where the adapters go").add_mutually_exclusive_group()
    where.add_argument("--report", help="a report from plop diagnose: train on its recommendation")
    where.add_argument("--target-modules", type=targets, metavar="A,B",
                       help="module types or names, e.g. q_proj,v_proj, or one PEFT regex")
    where.add_argument("--placement", choices=TRAIN_PLACEMENTS, help="a named placement")
    p.set_defaults(func=run)


def say_diagnosed(report) -> None:
    """Where a run's own diagnosis puts LoRA, before the run starts (once, in a launched job)."""
    from rich.console import Console

    types = terminal_safe(", ".join(report.recommendation.types))
    Console(stderr=True, quiet=not is_main()).print(f"diagnosed: LoRA goes on [bold]{types}[/] "
                                                    f"(lowest NFN of {len(report.types)} module types)")


def checked_config(args) -> TrainConfig:
    """The run's settings, and under GRPO its reward resolved and checked: a reward that is missing or
    cannot take TRL's arguments fails before the slow loading too."""
    config = build(TrainConfig, args)
    if config.method == "grpo":
        from ..files.reward import load_reward

        load_reward(config.reward)
    return config


def run(args) -> int:
    from rich.console import Console

    from ..finetune.run_report import diagnosed_rows, run_report
    from ..finetune.trainer import TrainingInterrupted, check_output_dir, train
    from ..ranking.render import nfn_change_table, train_summary_text
    from ..ranking.report import Report

    config = checked_config(args)  # bad values fail before the slow loading
    check_output_dir(config)  # so does an occupied directory
    report = Report.load(args.report) if args.report else None
    model, tokenizer, model_id, examples, info = load_model_and_data(args, args.samples)
    where = {"target_modules": args.target_modules, "placement": args.placement}
    report, fresh = run_report(model, tokenizer, examples, config, report=report, model_id=model_id, data_info=info,
                               **where)
    if fresh:
        say_diagnosed(report)
    try:  # NFN is measured again after training on the rows the placement came from: what changed, where
        result = train(model, tokenizer, examples, config, report=report, model_id=model_id, data_info=info,
                       progress=True, remeasure=diagnosed_rows(examples, report, config.seed), **where)
    except TrainingInterrupted as stop:
        print(plain_safe(f"plop: {stop}"), file=sys.stderr)
        return 130
    if is_main():  # rank 0 wrote the adapter and the summary, and says so
        Console().print(train_summary_text(result.summary, str(result.adapter_path)))
        if result.summary["nfn_change"] is not None:  # not re-measured where the weights were partitioned
            Console().print(nfn_change_table(result.summary["nfn_change"]))
    return 0
