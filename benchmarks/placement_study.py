"""Placement study: does NFN-guided placement fine-tune better than the best generic placements?

SmolLM2-135M-Instruct (plop's embedded default) on two tasks with different token distributions:
GSM8K math (../shared/data/gsm8k) and Python code (benchmarks/data/stdlib_code.jsonl: docstring ->
function body pairs from the standard library, PSF licence). Per task it diagnoses the train rows
once, then fine-tunes each placement with ``plop.compare`` at two budgets: ``matched`` (the top-3
recommendation's LoRA parameters at ``--rank``) and ``half`` (at ``--rank / 2``). Each run is one
placement and one seed on the same train rows, steps, learning rate and held-out eval rows; the
loss is on the response tokens.

* recommended, allocate, all-linear and kappatune get ``--main-seeds`` at the matched budget;
  every other placement and the half budget get ``--other-seeds``. Spectrum, a data-free baseline
  the issue asks for at the matched budget only, is not run at the half budget (6 runs, 40 CPU
  minutes, that answer nothing asked). The main four get ``--main-seeds`` at the half budget too,
  last: with 3 seeds no single task can show a difference beyond seed spread (the smallest
  sign-flip p is 1/4).
* Resumable: each finished run is appended as one JSON line to
  results/placement_study_runs.jsonl, and runs already there are skipped, so an interrupted study
  (or one split over several machines' sessions) continues where it stopped. Each run records its
  device and CPU threads, and the summary counts them: a CPU and a GPU run of one seed, or runs on
  1 and 2 threads, differ in rounding.
* Which tokens to score: per task, the advice when only the prompt's or only the response's
  tokens are scored, beside all tokens (results/placement_study_tokens.json; ``--advice-only``
  diagnoses the tasks and fine-tunes nothing).
* The summary (results/placement_study_summary.json, a Markdown table, placement_study_summary.png)
  gives per task and budget the mean and std of the eval loss after training, and for each
  placement against all-linear and against kappatune the mean paired difference, the per-seed wins,
  the paired t statistic and an exact two-sided sign-flip p-value over the shared seeds (2^n sign
  patterns; with 5 seeds the smallest possible p is 1/16, so "beyond seed spread" there means a
  win on every seed). Per budget, a ``pooled`` cell makes the same comparison over every (task,
  seed) pair, which is where "wins on both tasks" is read.

On 2 CPU cores one run of 96 steps takes 6–8 minutes (3.7–4.4 s a step); the full study is 110 runs.
``--threads 1`` beside ``--tasks`` lets two processes, one per task, share the cores. A GPU should take
minutes (not yet tried: none was lent).

    python benchmarks/placement_study.py [--tasks gsm8k,code] [--steps 96] [--advice-only | --summary-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from plop.finetune.evidence import sign_flip_p

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "placement_study_runs.jsonl"
SCOPES = RESULTS / "placement_study_tokens.json"
TASKS = {"gsm8k": (HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl",
                   HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"),
         "code": (HERE / "data" / "stdlib_code.jsonl", None)}  # no split of its own: the last rows are held out
MAIN = ("recommended", "allocate", "all-linear", "kappatune")
OTHERS = ("per-layer", "mlp", "spectrum")
HALF_OTHERS = ("per-layer", "mlp")
BASELINES = ("all-linear", "kappatune")


def planned(args) -> list[dict]:
    """Every run the study wants (task, budget, placement, seed), most telling first, so that a
    study stopped early has answered the main question on the same seeds for every placement
    (the paired comparisons need them): the NFN-guided placements against the two baselines at
    the matched budget on --other-seeds, then MLP and Spectrum, then the main placements' other
    seeds, then the half budget, then the main four's other seeds there. Each phase
    covers every task before the next begins."""
    main_seeds, other_seeds = ([int(s) for s in v.split(",")] for v in (args.main_seeds, args.other_seeds))
    first = ("recommended", "allocate", "per-layer", "all-linear", "kappatune")
    more_seeds = [s for s in main_seeds if s not in other_seeds]
    phases = [("matched", first, other_seeds), ("matched", ("mlp", "spectrum"), other_seeds),
              ("matched", MAIN, more_seeds), ("half", MAIN + HALF_OTHERS, other_seeds), ("half", MAIN, more_seeds)]
    return [{"task": task, "budget": budget, "placement": p, "seed": s}
            for budget, placements, seeds in phases for task in args.tasks.split(",")
            for s in seeds for p in placements]


def done(path: Path = RUNS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def pending(args, finished: list[dict]) -> list[dict]:
    """The planned runs not among the ``finished`` ones (a run of another step count is not the same run)."""
    keys = {key(r) for r in finished if r.get("steps") == args.steps}
    return [r for r in planned(args) if key(r) not in keys]


def key(run: dict) -> tuple:
    return run["task"], run["budget"], run["placement"], run["seed"]


def task_data(task: str, tokenizer, args):
    from plop.files.data import load_examples

    train_path, test_path = TASKS[task]
    if not train_path.is_file():
        raise SystemExit(f"{task}: {train_path} not found")
    n_train = args.steps * args.batch_size
    if test_path is not None:
        train, info = load_examples(str(train_path), samples=n_train, seed=0, tokenizer=tokenizer)
        test, _ = load_examples(str(test_path), samples=args.eval_samples, seed=0, tokenizer=tokenizer)
        return train, test, info
    rows, info = load_examples(str(train_path), samples=None, seed=0, tokenizer=tokenizer)
    return rows[: min(n_train, len(rows) - args.eval_samples)], rows[-args.eval_samples:], info


def prepare(task: str, args) -> tuple:
    """The model, the task's rows and their diagnosis (with the token-scope advice). Made once per
    task and process: the plan's phases come back to each task, and the diagnosis of the same rows
    is the same, so diagnosing again would only cost a minute each time."""
    import plop
    from plop.model.loading import load_model

    model, tokenizer, model_id = load_model(None, device=args.device)
    train, test, info = task_data(task, tokenizer, args)
    report = plop.diagnose(model, train[: args.diagnose_samples], tokenizer, samples=None, model_id=model_id,
                           max_length=256, rank=args.rank, progress=True)
    report.save(RESULTS / f"placement_study_{task}_report.json")
    print(f"{task}: recommended {report.recommendation.types} (stable: {report.recommendation.stable})")
    scope_advice(task, report, lambda scope: plop.diagnose(model, train[: args.diagnose_samples], tokenizer,
                                                           samples=None, max_length=256, rank=args.rank,
                                                           tokens=scope))
    return model, tokenizer, train, test, info, report


def run_task(prepared: tuple, runs: list[dict], args) -> None:
    """Fine-tune each of ``runs`` (one task's) and append it to the runs file as soon as it ends."""
    import plop

    model, tokenizer, train, test, info, report = prepared
    for run in runs:
        rank = args.rank if run["budget"] == "matched" else max(1, args.rank // 2)
        comparison = plop.compare(model, tokenizer, train, report, placements=[run["placement"]], seeds=[run["seed"]],
                                  rank=rank, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                                  lr=args.lr, eval_examples=test, progress=True)
        (row,) = comparison.to_dict()["rows"]
        record = {**run, **row, "steps": args.steps, "budget_params": comparison.budget, "train": info["source"],
                  "recommended_types": report.recommendation.types, "device": args.device,
                  "threads": args.threads}
        with RUNS.open("a") as f:  # one line per finished run: what makes the study resumable
            f.write(json.dumps(record) + "\n")
        print(f"{run}: eval loss {row['eval_loss_after']:.4f}", flush=True)


def scope_advice(task: str, report, diagnose) -> None:
    """Which tokens to score: the advice when only the prompt's or only the response's tokens are
    scored (``diagnose(scope)``), beside all of them (``report``); recorded once per task."""
    found = json.loads(SCOPES.read_text()) if SCOPES.is_file() else {}
    if task in found:
        return
    reports = {"all": report, **{scope: diagnose(scope) for scope in ("prompt", "response")}}
    found[task] = {scope: {"recommended": r.recommendation.types,
                           "type_nfn": {t.type: round(t.nfn_mean, 4) for t in r.types}} for scope, r in reports.items()}
    SCOPES.write_text(json.dumps(found, indent=2) + "\n")
    print(f"{task}: advice by scored tokens " + "; ".join(f"{k}: {v['recommended']}" for k, v in found[task].items()))


def loss_quarters(curves: list[list[dict]]) -> list[float]:
    """The mean training loss in each quarter of the run, averaged over runs: converged when the
    last two quarters are close next to the fall from the first."""
    means = []
    for curve in curves:
        losses = np.array([p["loss"] for p in curve])
        bounds = np.linspace(0, len(losses), 5).astype(int)
        means.append([losses[a:b].mean() for a, b in zip(bounds, bounds[1:])])
    return [float(v) for v in np.mean(means, axis=0)]


def summary(runs: list[dict]) -> dict:
    """Per task and budget: each placement's loss (mean, std, seeds) and its paired comparison
    with each baseline over the seeds both have. Per budget with more than one task, a ``pooled``
    cell pairs over every (task, seed) both have: with 5 seeds a task's smallest p is 1/16, over
    two tasks 1/512, so a placement that wins on every seed of both tasks shows it there."""
    out = {}
    for task, budget in sorted({(r["task"], r["budget"]) for r in runs}):
        cell = [r for r in runs if (r["task"], r["budget"]) == (task, budget)]
        loss = losses_by(cell, lambda r: r["seed"])
        rows = {}
        for p, by_seed in loss.items():
            values = np.array(list(by_seed.values()))
            entry = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "seeds": len(values), **against_baselines(p, loss)}
            curves = [r["loss_curve"] for r in cell if r["placement"] == p and len(r.get("loss_curve", ())) >= 4]
            if curves:
                entry["train_loss_quarters"] = loss_quarters(curves)
            rows[p] = entry
        out[f"{task}/{budget}"] = rows
    for budget in sorted({r["budget"] for r in runs}):
        cell = [r for r in runs if r["budget"] == budget]
        if len({r["task"] for r in cell}) < 2:
            continue
        loss = losses_by(cell, lambda r: (r["task"], r["seed"]))
        out[f"pooled/{budget}"] = {p: against_baselines(p, loss) for p in loss}
    return out


def losses_by(cell: list[dict], key) -> dict[str, dict]:
    """Each placement's eval loss after training, by ``key(run)``."""
    return {p: {key(r): r["eval_loss_after"] for r in cell if r["placement"] == p}
            for p in dict.fromkeys(r["placement"] for r in cell)}


def against_baselines(placement: str, loss: dict[str, dict]) -> dict:
    """``placement``'s loss minus each baseline's, paired over the keys (seeds, or task and seed)
    both have: the mean difference, the wins, the paired t and the exact sign-flip p."""
    out = {}
    for base in BASELINES:
        shared = sorted(set(loss[placement]) & set(loss.get(base, {})))
        if placement == base or len(shared) < 2:
            continue
        diffs = np.array([loss[placement][k] - loss[base][k] for k in shared])
        spread = diffs.std(ddof=1)
        t = float(diffs.mean() / (spread / np.sqrt(len(diffs)))) if spread > 0 else None
        out[f"vs_{base}"] = {"mean_diff": float(diffs.mean()), "wins": int((diffs < 0).sum()),
                             "seeds": len(shared), "p": sign_flip_p(diffs), "t": t}
    return out


def report_summary(result: dict) -> None:
    """Each cell as a Markdown table; a pooled cell has only the paired comparisons."""
    for cell, rows in result.items():
        pooled = cell.startswith("pooled/")
        columns = ["placement", *([] if pooled else ["eval loss after (mean ± std)", "seeds"]),
                   *(f"vs {b}: diff, wins, p" for b in BASELINES), *([] if pooled else ["train loss by quarter"])]
        print(f"\n### {cell}\n\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
        order = ((lambda p: rows[p].get("vs_all-linear", {}).get("mean_diff", 0.0)) if pooled
                 else (lambda p: rows[p]["mean"]))
        for p in sorted(rows, key=order):
            e = rows[p]
            values = [f"{c['mean_diff']:+.4f}, {c['wins']}/{c['seeds']}, {c['p']:.3f}"
                      if (c := e.get(f"vs_{b}")) else "–" for b in BASELINES]
            if not pooled:
                quarters = " / ".join(f"{v:.3f}" for v in e.get("train_loss_quarters", ())) or "–"
                values = [f"{e['mean']:.4f} ± {e['std']:.4f}", str(e["seeds"]), *values, quarters]
            print(f"| {p} | " + " | ".join(values) + " |")
    plot({cell: rows for cell, rows in result.items() if not cell.startswith("pooled/")})


def plot(result: dict) -> None:
    """Each cell's mean ± std per placement, labelled with its per-seed wins against all-linear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(4.5 * len(result), 4), squeeze=False)
    for ax, (cell, rows) in zip(axes[0], result.items()):
        names = sorted(rows, key=lambda p: rows[p]["mean"])
        means = [rows[p]["mean"] for p in names]
        ax.errorbar(range(len(names)), means, yerr=[rows[p]["std"] for p in names], fmt="o", capsize=3)
        for x, (p, y) in enumerate(zip(names, means)):
            if (c := rows[p].get("vs_all-linear")) is not None:
                ax.annotate(f"{c['wins']}/{c['seeds']}", (x, y), textcoords="offset points", xytext=(6, 0), fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(cell)
        ax.set_ylabel("eval loss after (mean ± std over seeds)")
    fig.text(0.01, 0.01, "n/m: seeds on which it beats all-linear", fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_study_summary.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gsm8k,code")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--main-seeds", default="0,1,2,3,4")
    parser.add_argument("--other-seeds", default="0,1,2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--diagnose-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--device", default=None, help="where to diagnose and train (default: cuda when there is one)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2). Two processes of 1 thread, one per task (--tasks), "
                             "share 2 cores about as well as one of 2: 4.4 s a code step each, against 2.3 alone")
    parser.add_argument("--advice-only", action="store_true", help="diagnose each task (and its token scopes) only")
    parser.add_argument("--summary-only", action="store_true", help="summarise the runs already done, run nothing")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS.mkdir(exist_ok=True)
    todo = pending(args, done())
    print(f"{len(planned(args)) - len(todo)} runs done, {len(todo)} to go")
    start = time.perf_counter()
    if args.advice_only:
        for task in args.tasks.split(","):
            prepare(task, args)
        return
    prepared: dict[str, tuple] = {}
    for task, runs in itertools.groupby([] if args.summary_only else todo, key=lambda r: r["task"]):
        if task not in prepared:
            prepared[task] = prepare(task, args)
        run_task(prepared[task], list(runs), args)
    runs = [r for r in done() if r.get("steps") == args.steps]
    result = summary(runs)
    (RESULTS / "placement_study_summary.json").write_text(json.dumps(
        {"steps": args.steps, "rank": args.rank, "runs": len(runs), "cells": result,
         "devices": dict(Counter(r.get("device", "unrecorded") for r in runs)),
         "threads": dict(Counter(str(r.get("threads", "unrecorded")) for r in runs)),
         "seconds": time.perf_counter() - start}, indent=2) + "\n")
    report_summary(result)


if __name__ == "__main__":
    main()
