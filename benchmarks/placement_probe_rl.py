"""The confound probe of the RL placement study (issue 32): did attention-only lead because of where
its adapters were, or because it took bigger steps?

In study v1 every placement had ``alpha = 2 x rank`` (a constant LoRA scale of 2) and one learning
rate, so one Adam step changed a module's output roughly in proportion to its rank: attention had
4 types x rank 3 = 12 rank directions per layer, the other arms 6-7. This probe trains each arm for
ONE GRPO step from the same base, at one seed (so every arm samples the same completions: see
``plop.finetune.hf_trainer.PairedSampling``) and one learning rate, and measures how far that step
moved the policy: the mean per-token KL to the base along the base's greedy completions of held-out
prompts (:func:`plop.finetune.step_size.policy_kl`). Two scalings:

* ``v1``: ``alpha = 2 x rank`` (the study's);
* ``v2``: one ``alpha`` for every arm (``2 x --rank``), the scale ``alpha / r`` falling as the rank
  grows: what ``plop.compare`` now does.

Arms: the v1 study's (budget-matched ranks at ``--rank``): ``all-linear``, ``attention``, ``mlp``,
``recommended``, ``inverse``; ``vod`` (v_proj, o_proj, down_proj, PLoP's GRPO pick); and
``all-linear-r3``, all-linear at attention's rank 3: if it catches up with attention at a matched
step size, the v1 lead was the step, not the placement.

Resumable: one JSON line per (arm, scaling, seed) in results/placement_probe_rl_runs.jsonl; the
summary (results/placement_probe_rl.json) gives each arm's KL and its ratio to all-linear's.

    python benchmarks/placement_probe_rl.py [--seeds 0] [--summary-only]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from placement_study_rl import RESULTS, correct, examples

RUNS = RESULTS / "placement_probe_rl_runs.jsonl"
SUMMARY = RESULTS / "placement_probe_rl.json"
ARMS = ("all-linear", "attention", "mlp", "recommended", "inverse", "vod=v_proj+o_proj+down_proj", "all-linear-r3")
SCALINGS = ("v1", "v2")


def done() -> list[dict]:
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()] if RUNS.is_file() else []


def prepare(args):
    import plop
    from plop.finetune.compare import candidates
    from plop.model.loading import load_model, model_layout

    model, tokenizer, model_id = load_model(None)
    report_path = RESULTS / "placement_study_rl_recommended_report.json"
    report = plop.Report.load(report_path)  # v1's diagnosis on the prompts: the same recommendation
    train = examples("train", tokenizer, args.batch_size // args.num_generations)  # one step's prompts
    held = examples("test", tokenizer, args.eval_samples)
    layout = model_layout(model)
    budget = candidates(report, model, ["recommended"], layout=layout)[0].params_at(args.rank)
    found = {c.placement.name: c for c in candidates(report, model, [a for a in ARMS if a != "all-linear-r3"],
                                                      budget, layout)}
    arms = {name: (c, c.rank_for(budget)) for name, c in found.items()}
    arms["all-linear-r3"] = (replace(found["all-linear"], placement=replace(found["all-linear"].placement,
                                                                            name="all-linear-r3")), 3)
    return model, tokenizer, report, train, held, budget, arms


def run_one(prepared, arm: str, scaling: str, seed: int, args) -> dict:
    from plop import LoraSettings, TrainConfig
    from plop.finetune.trainer import train_on_placement

    model, tokenizer, report, train, held, budget, arms = prepared
    candidate, rank = arms[arm]
    alpha = 2.0 * rank if scaling == "v1" else 2.0 * args.rank
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(method="grpo", reward=correct, steps=1, batch_size=args.batch_size,
                             num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                             max_length=args.max_length, lr=args.lr, seed=seed,
                             lora=LoraSettings(r=rank, alpha=alpha, dropout=0.0, loraplus_ratio=16.0),
                             logging_steps=1, step_size_steps=1, output_dir=out)
        started = time.perf_counter()
        result = train_on_placement(copy.deepcopy(model), tokenizer, train, config, candidate.placement,
                                    report=report, eval_examples=held, progress=False)
        s = result.summary
    gc.collect()
    return {"arm": arm, "scaling": scaling, "seed": seed, "rank": rank, "alpha": alpha, "lr": args.lr,
            "types": candidate.placement.types, "trainable_params": s["trainable_params"],
            "budget_ratio": round(candidate.params_at(rank) / budget, 4), "policy_kl": s["step_size"]["policy_kl"],
            "step1_reward": s["reward_curve"][0]["reward"] if s["reward_curve"] else None,
            "step1_loss": s["loss_curve"][0]["loss"] if s["loss_curve"] else None,
            "held_out_prompts": len(held), "seconds": round(time.perf_counter() - started, 1)}


def summarise(runs: list[dict]) -> dict:
    """Per scaling, each arm's mean KL over seeds and its ratio to all-linear's; and whether every
    arm sampled the same first completions (equal step-1 rewards: the runs are paired)."""
    out = {}
    for scaling in SCALINGS:
        rows = [r for r in runs if r["scaling"] == scaling]
        kl = {a: float(np.mean([r["policy_kl"] for r in rows if r["arm"] == a])) for a in dict.fromkeys(r["arm"] for r in rows)}
        base = kl.get("all-linear")
        out[scaling] = {a: {"policy_kl": v, "vs_all_linear": v / base if base else None,
                            "rank": next(r["rank"] for r in rows if r["arm"] == a)} for a, v in kl.items()}
        out[f"{scaling}_paired"] = len({(r["seed"], r["step1_reward"]) for r in rows}) == len({r["seed"] for r in rows})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0])
    parser.add_argument("--rank", type=int, default=2, help="the recommendation's rank: sets the budget")
    # 4 prompts x 8 completions: at the base's sampled accuracy (~10 % at temperature 1) a 2 x 4 step
    # mostly has no correct completion in any group, hence no advantage and no step at all
    parser.add_argument("--batch-size", type=int, default=32, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="v1's learning rate")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out prompts the KL is measured on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    finished = done()
    keys = {(r["arm"], r["scaling"], r["seed"]) for r in finished}
    todo = [(a.split("=")[0], sc, s) for s in args.seeds for sc in SCALINGS for a in ARMS
            if (a.split("=")[0], sc, s) not in keys]
    if todo and not args.summary_only:
        prepared = prepare(args)
        for arm, scaling, seed in todo:
            row = run_one(prepared, arm, scaling, seed, args)
            with RUNS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{arm:>14} {scaling} seed {seed}: rank {row['rank']}, KL {row['policy_kl']:.3g}, "
                  f"step-1 reward {row['step1_reward']}, {row['seconds']} s", flush=True)
            finished.append(row)
    result = summarise(finished)
    SUMMARY.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
