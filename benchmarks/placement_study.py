"""SFT placement study v2 (issue 32): where should LoRA go for supervised fine-tuning, once every arm
takes its own best learning rate and the runs pair exactly?

SmolLM2-135M-Instruct (plop's embedded default) on two tasks with different token distributions:
GSM8K math (../shared/data/gsm8k) and Python code (benchmarks/data/stdlib_code.jsonl: docstring ->
function body pairs from the standard library, PSF licence; its last rows are held out). Per task the
train rows are diagnosed once, then ``plop.compare`` fine-tunes one arm and seed per run, the loss
on the response tokens. v1 (results/placement_study_{runs.jsonl,summary.json}, kept as they were) gave
every arm one rate and ``alpha = 2 x rank``; v2 follows benchmarks/study_protocol.py:

* **Arms** (:data:`ARMS`, most telling first) at the recommendation's budget at ``--rank``:
  all-linear and mlp (the baselines), recommended, attention. One ``lora_alpha = 2 x --rank``, no dropout.
* **Phase A**: each arm at ``--lr`` x each of ``--grid``, trained on the train rows less a
  :data:`VALIDATION`-row split and judged by its loss there.
* **Phase B**: 5 fresh seeds per arm at its chosen rate, judged by the loss of each of
  :data:`HELD_OUT` held-out rows, with the relative output change ``||dW x|| / ||W x||`` after
  ``--step-size-steps`` steps and the training-loss curve.
* **Decision rule** (:data:`RULE`, printed at start, stored in the summary): a lower held-out loss
  on 4 of 5 seeds and a bootstrap CI below 0, against all-linear and against mlp, per task.
* **Post-hoc rate checks** (``--sensitivity ARM:MULT``, after phase B, on its seeds): judged apart,
  as in the RL study, when an arm's chosen rate rather than its placement looks like its result.
* **Schedule**: constant after a 2-step warm-up (``lr_schedule="constant"``), in both phases.

**Budget** (``--dry-run``): at v1's one-thread seconds a step (:data:`SECONDS_PER_STEP`) 32 phase-A
runs (0.8 h) and 40 phase-B runs (1.7 h): 2.5 CPU h; with the RL study's 7.3 h, 9.8 h of the issue's 10.
Cut to fit: the half budget, kappatune, allocate, per-layer and spectrum arms of v1; phase A on one
selection seed (an SFT validation loss over 40 rows varies far less with the seed than a GRPO reward)
and 16 steps; phase B 32 steps (v1: 96), so the losses compared are early in training.

Results: results/placement_study_v2_runs.jsonl (one line per run: resumable), _summary.json and
_{task}.png; ``--shard I/N`` for N one-thread workers.

    python benchmarks/placement_study.py [--tasks gsm8k,code] [--dry-run | --summary-only] [--shard 0/2]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from study_protocol import (Protocol, Score, begin, chosen_multiplier, done, final_runs, per_arm, plot, post_hoc,
                            selection, sensitivity_arg, sensitivity_runs, table, training_hours, verdicts)

from plop.finetune.evidence import DecisionRule

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "placement_study_v2_runs.jsonl"
SUMMARY = RESULTS / "placement_study_v2_summary.json"
TASKS = {"gsm8k": (HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl",
                   HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"),
         "code": (HERE / "data" / "stdlib_code.jsonl", None)}  # no split of its own: the last rows are held out
ARMS = ("all-linear", "mlp", "recommended", "attention")
BASELINES = ("all-linear", "mlp")
# Written before any run (issue 32): what "A beats B" means for this study
RULE = DecisionRule(min_wins=4, of_seeds=5, higher_is_better=False)
SECONDS_PER_STEP = {"gsm8k": 4.46, "code": 4.11}  # v1's one-thread runs (results/placement_study_runs.jsonl)
SECONDS_PER_RUN = 20.0  # a model copy, the evaluations and the step size: a few seconds each
VALIDATION = 40
HELD_OUT = 100
SCORE = Score("held-out loss per row", False, "relative_output_change",
              lambda r: [(c["step"], c["loss"]) for c in r["loss_curve"]], "training loss")


def protocol(args) -> Protocol:
    return Protocol(tasks=tuple(args.tasks.split(",")), arms=ARMS, grid=tuple(args.grid), select_seeds=(100,),
                    seeds=(0, 1, 2, 3, 4), select_steps=args.select_steps, steps=args.steps,
                    sensitivity=tuple(args.sensitivity))


def seconds(run: dict) -> float:
    return run["steps"] * SECONDS_PER_STEP[run["task"]] + SECONDS_PER_RUN


def task_data(task: str, tokenizer, args):
    """The task's train rows (enough for phase B) and its held-out rows."""
    from plop.files.data import load_examples

    train_path, test_path = TASKS[task]
    if not train_path.is_file():
        raise SystemExit(f"{task}: {train_path} not found")
    n_train = args.steps * args.batch_size
    if test_path is not None:
        train, _ = load_examples(str(train_path), samples=n_train, seed=0, tokenizer=tokenizer)
        test, _ = load_examples(str(test_path), samples=HELD_OUT, seed=0, tokenizer=tokenizer)
        return train, test
    rows, _ = load_examples(str(train_path), samples=None, seed=0, tokenizer=tokenizer)
    return rows[: min(n_train, len(rows) - HELD_OUT)], rows[-HELD_OUT:]


def prepare(task: str, args) -> tuple:
    """The model, the task's rows, their validation split and their diagnosis (made once per task)."""
    import plop
    from plop.finetune.sft import split_examples
    from plop.model.loading import load_model

    model, tokenizer, model_id = load_model(None, device=args.device)
    train, test = task_data(task, tokenizer, args)
    rest, validation = split_examples(train, VALIDATION / len(train), seed=0)
    path = RESULTS / f"placement_study_v2_{task}_report.json"
    if not path.is_file():
        plop.diagnose(model, train[:128], tokenizer, samples=None, model_id=model_id, max_length=256,
                      rank=args.rank).save(path)
    return model, tokenizer, train, rest, validation, test, plop.Report.load(path)


def run_one(prepared: tuple, run: dict, lr: float, args) -> dict:
    import plop
    from plop import LoraSettings, TrainConfig

    model, tokenizer, train, rest, validation, test, report = prepared
    select = run["phase"] == "A"
    config = TrainConfig(steps=run["steps"], batch_size=args.batch_size, max_length=args.max_length, lr=lr,
                         lora=LoraSettings(alpha=2.0 * args.rank, dropout=0.0, loraplus_ratio=16.0), logging_steps=1, lr_schedule="constant", warmup_steps=2,
                         step_size_steps=None if select else args.step_size_steps)
    comparison = plop.compare(model, tokenizer, rest if select else train, report, placements=[run["arm"]],
                              seeds=[run["seed"]], rank=args.rank, config=config,
                              eval_examples=validation if select else test, lr_grid=None, progress=True)
    (row,) = comparison.to_dict()["rows"]
    record = {**row, **run, "budget_params": comparison.budget, "alpha": config.lora.alpha, "device": args.device,
              "threads": args.threads}
    return {**record, "validation": row["eval_loss_after"]} if select else record


def summary(finished: list[dict], p: Protocol) -> dict:
    """Per task: each arm's phase-A validation losses and choice of rate, held-out loss (per row, as
    judged, and ``token_weighted`` beside it), step size and the rule's verdicts; then the post-hoc
    rate checks, each judged as a baseline, apart."""
    out = {}
    for task in p.tasks:
        runs, checks = final_runs(finished, p, task), sensitivity_runs(finished, p, task)
        arms, checked, every = per_arm(runs, SCORE), post_hoc(runs, checks, p, RULE, SCORE), {**runs, **checks}
        for name, entry in [*arms.items(), *checked.items()]:
            entry["token_weighted"] = float(np.mean([r["eval_loss_after"] for r in every[name].values()]))
        out[task] = {"arms": arms, "selection": selection(finished, p, task, False),
                     "verdicts": verdicts(runs, p, RULE, BASELINES), "sensitivity": checked}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gsm8k,code")
    parser.add_argument("--steps", type=int, default=32, help="phase B's steps (v1: 96; cut to fit the budget)")
    parser.add_argument("--select-steps", type=int, default=16, help="phase A's steps")
    parser.add_argument("--grid", type=lambda v: [float(m) for m in v.split(",")], default=[0.5, 1, 2, 4])
    parser.add_argument("--sensitivity", type=sensitivity_arg, default=[],
                        help="ARM:MULT[,...]: post-hoc rate checks on phase B's seeds, reported apart")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--step-size-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="I/N: this worker's share of the runs (run N workers)")
    parser.add_argument("--summary-only", action="store_true", help="summarise the runs already done, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its CPU hours, run nothing")
    args = parser.parse_args()
    p = protocol(args)
    todo = begin(p, RULE, RUNS, args, seconds, f"v1's seconds a step {SECONDS_PER_STEP} and {SECONDS_PER_RUN:g} s a run")
    if todo is None:
        return
    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS.mkdir(exist_ok=True)
    prepared: dict[str, tuple] = {}
    for run in [] if args.summary_only else todo:
        multiplier = chosen_multiplier(done(RUNS), p, run["task"], run["arm"], False) if run["phase"] == "B" \
            else run["multiplier"]
        if multiplier is None:
            print(f"{run['task']} {run['arm']}: phase A not finished (another worker's runs): stopping; run again later")
            break
        if run["task"] not in prepared:
            prepared[run["task"]] = prepare(run["task"], args)
        record = run_one(prepared[run["task"]], run, args.lr * multiplier, args)
        with RUNS.open("a") as f:  # one line per finished run: what makes the study resumable
            f.write(json.dumps(record) + "\n")
        print(f"{run['phase']} {run['task']} {run['arm']} seed {run['seed']}: loss {record['eval_loss_after']:.4f}",
              flush=True)
    finished = done(RUNS)
    result = summary(finished, p)
    SUMMARY.write_text(json.dumps({"rule": RULE.text, **{k: getattr(args, k) for k in (
        "steps", "select_steps", "grid", "rank", "lr", "batch_size", "step_size_steps")}, "alpha": 2.0 * args.rank,
        "validation_rows": VALIDATION, "held_out_rows": HELD_OUT, "tasks": result,
        "training_hours": training_hours(finished),
        "devices": dict(Counter(r.get("device", "unrecorded") for r in finished))}, indent=2) + "\n")
    for task, entry in result.items():
        print(f"\n{task}\n" + table(entry["arms"], entry["sensitivity"], entry["verdicts"], SCORE))
        runs = {**final_runs(finished, p, task), **sensitivity_runs(finished, p, task)}
        if any(runs.values()):
            plot(runs, SCORE, f"SFT {task}, {args.steps} steps, each arm at its own LR",
                 RESULTS / f"placement_study_v2_{task}.png")


if __name__ == "__main__":
    main()
