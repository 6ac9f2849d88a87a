"""RL placement study: does NFN-guided placement matter for GRPO, where published work says it does?

SmolLM2-135M-Instruct (plop's embedded default) learns small-number arithmetic with GRPO
(``plop.compare`` with ``method="grpo"``, TRL's GRPOTrainer) against a verifiable reward: 1 when the
last integer of the completion is the answer, else 0 (:func:`correct`). The task
(benchmarks/data/arithmetic_rl_{train,test}.jsonl, made by :func:`make_rows` with a seeded generator;
``--make-data`` writes them again) mixes one-digit sums and products with two-digit sums, each asked
with :data:`INSTRUCTION` so that the base model's greedy reward on the held-out prompts lies between
10 and 60 % (``--base-only`` measures it into results/placement_study_rl_base.json).

* **Placements**, all at one matched budget at a low rank (the top-3 recommendation's LoRA parameters
  at ``--rank``, default 2): ``recommended`` (diagnosed on the prompts' tokens), ``recommended-generate``
  (diagnosed on the base model's own sampled completions, ``--generate``; the tokens GRPO trains on),
  ``allocate``, ``all-linear``, ``attention``, ``mlp`` and ``inverse``.
* **Metric**: the mean reward of greedy completions of the held-out prompts after ``--steps`` steps, and
  its curve every quarter of the run.
* **Order**: seed by seed, most telling placements first (the recommendations and the two baselines),
  so a study stopped early is still paired.
  When the diagnosis on the model's samples recommends the prompts' types, ``recommended-generate``
  would repeat the ``recommended`` runs exactly; they are trained once and the summary says so.
* **Resumable**: each finished run is one JSON line in results/placement_study_rl_runs.jsonl; runs
  already there (same steps) are skipped. ``--shard I/N`` splits the runs over N one-thread workers.
* **Summary** (results/placement_study_rl_summary.json, a Markdown table, placement_study_rl.png):
  per placement the reward mean ± std over seeds, and against all-linear and against MLP the mean
  paired difference, the wins (higher reward) and the exact two-sided sign-flip p over shared seeds.

    python benchmarks/placement_study_rl.py [--shard 0/2] [--seeds 0,1,2,3,4] [--base-only | --summary-only]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from plop.finetune.evidence import sign_flip_p

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "placement_study_rl_runs.jsonl"
BASE = RESULTS / "placement_study_rl_base.json"
DATA = {split: HERE / "data" / f"arithmetic_rl_{split}.jsonl" for split in ("train", "test")}
ORDER = ("recommended", "recommended-generate", "all-linear", "mlp", "allocate", "attention", "inverse")
BASELINES = ("all-linear", "mlp")
KINDS = ("a+b", "a*b", "ab+c", "ab+cd")  # one-digit sum and product; two digits plus one, plus two
# What shapes the task into range: asked bare, the model explains instead of answering (greedy
# reward 0.09 on the 100 held-out prompts at 16 new tokens); asked this way, 0.48
INSTRUCTION = " End your answer with the number."


def make_rows(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic questions from a seeded generator, the kinds in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        a = int(rng.integers(10, 100)) if kind.startswith("ab") else int(rng.integers(2, 10))
        b = int(rng.integers(10, 100)) if kind == "ab+cd" else int(rng.integers(2, 10))
        op = "*" if kind == "a*b" else "+"
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(a * b if op == "*" else a + b),
                     "kind": kind})
    return rows


def correct(completions, response, **kwargs) -> list[float]:
    """1.0 where the completion's last integer is the answer (``response``), else 0.0: tolerant of any
    wording around it ("9 * 3 = 27", "The answer is 27."), strict about the number."""
    out = []
    for completion, answer in zip(completions, response):
        numbers = re.findall(r"-?\d+", completion.replace(",", ""))
        out.append(float(bool(numbers) and numbers[-1] == answer.strip()))
    return out


def examples(split: str, tokenizer, n: int | None = None):
    """The split's rows as prompt/response examples, the question in the model's chat template."""
    from plop.files.data import Example

    rows = [json.loads(line) for line in DATA[split].read_text().splitlines() if line.strip()][:n]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"] + INSTRUCTION}],
                                          tokenize=False, add_generation_prompt=True) for r in rows]
    return [Example(prompt, r["answer"]) for prompt, r in zip(chat, rows)]


def planned(args) -> list[dict]:
    """Seed by seed, the most telling placements first: a stopped study stays paired."""
    return [{"placement": p, "seed": s} for s in args.seeds for p in args.placements]


def done(path: Path = RUNS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def pending(args, finished: list[dict], same: frozenset = frozenset()) -> list[dict]:
    """The planned runs not yet finished (at these steps), less the placements ``same`` as another."""
    keys = {(r["placement"], r["seed"]) for r in finished if r.get("steps") == args.steps}
    return [r for r in planned(args) if (r["placement"], r["seed"]) not in keys and r["placement"] not in same]


def shard(runs: list[dict], spec: str) -> list[dict]:
    """Worker ``I`` of ``N`` (``--shard I/N``) takes every N-th run in plan order: N one-thread
    workers on N cores finish a study sooner than one N-thread worker (generation is small matmuls)
    and still go seed by seed."""
    index, count = (int(v) for v in spec.split("/"))
    return runs[index::count]


def same_targets(reports: dict) -> frozenset:
    """``{"recommended-generate"}`` when the diagnosis on the model's own samples recommends the
    prompts' types: its runs would be the recommended runs again, so they are not trained twice."""
    own, prompts = (reports[n].recommendation for n in ("recommended-generate", "recommended"))
    return frozenset({"recommended-generate"}) if set(own.types) == set(prompts.types) else frozenset()


def train_config(args):
    from plop import TrainConfig

    return TrainConfig(method="grpo", reward=correct, steps=args.steps, batch_size=args.batch_size,
                       num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, lr=args.lr,
                       max_length=args.max_length, logging_steps=1, eval_steps=max(1, args.steps // 4))


def prepare(args) -> tuple:
    """The model, the rows and both diagnoses (on the prompts, and on the model's own samples)."""
    import plop
    from plop.model.loading import load_model

    model, tokenizer, model_id = load_model(None, device=args.device)
    train = examples("train", tokenizer, args.steps * args.batch_size // args.num_generations)
    test = examples("test", tokenizer, args.eval_samples)
    rows = examples("train", tokenizer, args.diagnose_samples)
    reports = {"recommended": plop.diagnose(model, rows, tokenizer, samples=None, model_id=model_id, tokens="prompt",
                                            rank=args.rank, max_length=args.max_length),
               "recommended-generate": plop.diagnose(model, rows, tokenizer, samples=None, model_id=model_id,
                                                     tokens="response",
                                                     generate=args.generate, max_new_tokens=args.max_new_tokens,
                                                     rank=args.rank, max_length=args.max_length)}
    for name, report in reports.items():
        report.save(RESULTS / f"placement_study_rl_{name}_report.json")
        print(f"{name}: {report.recommendation.types} (stable: {report.recommendation.stable})", flush=True)
    return model, tokenizer, train, test, reports


def run_one(prepared: tuple, run: dict, args) -> dict:
    """One placement and seed at the matched budget; ``recommended-generate`` gets the rank that
    brings its own recommendation closest to the budget of the prompts' one."""
    import plop

    model, tokenizer, train, test, reports = prepared
    report, placement, rank = reports["recommended"], run["placement"], args.rank
    if placement == "recommended-generate":
        budget = reports["recommended"].recommendation.trainable_params
        own = reports[placement].recommendation
        report, placement = reports[placement], "recommended"
        rank = max(1, round(budget / (own.trainable_params / own.rank)))
    comparison = plop.compare(model, tokenizer, train, report, placements=[placement], seeds=[run["seed"]],
                              rank=rank, config=train_config(args), eval_examples=test, progress=True)
    (row,) = comparison.to_dict()["rows"]
    return {**run, **row, "placement": run["placement"], "steps": args.steps, "budget_params": comparison.budget,
            "device": args.device, "threads": args.threads}


def base_reward(args) -> dict:
    """The base model's greedy reward on the held-out prompts, overall and per kind: the task's
    starting point, which the task was shaped to put between 10 and 60 %."""
    from plop.measure.generate import complete
    from plop.model.loading import load_model

    model, tokenizer, _ = load_model(None, device=args.device)
    test = examples("test", tokenizer, args.eval_samples)
    kinds = [json.loads(line)["kind"] for line in DATA["test"].read_text().splitlines()][: len(test)]
    started = time.perf_counter()
    completions = [g[0] for g in complete(model, tokenizer, [e.prompt for e in test], sample=False,
                                          max_new_tokens=args.max_new_tokens, max_length=args.max_length)]
    scores = correct(completions, [e.response for e in test])
    result = {"reward": float(np.mean(scores)), "prompts": len(test), "max_new_tokens": args.max_new_tokens,
              "by_kind": {k: float(np.mean([s for s, kind in zip(scores, kinds) if kind == k])) for k in KINDS},
              "seconds": round(time.perf_counter() - started, 1), "device": args.device,
              "first_completions": completions[:6]}
    BASE.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(runs: list[dict]) -> dict:
    """Per placement the final held-out reward (mean, std, seeds) and its paired comparison with
    each baseline over the seeds both have (a higher reward wins)."""
    reward = {p: {r["seed"]: r["eval_reward_after"] for r in runs if r["placement"] == p}
              for p in dict.fromkeys(r["placement"] for r in runs)}
    ratio = {r["placement"]: r["budget_ratio"] for r in runs if "budget_ratio" in r}  # integer ranks: not always 1
    out = {}
    for p, by_seed in reward.items():
        values = np.array(list(by_seed.values()))
        entry = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                 "seeds": len(values), "budget_ratio": ratio.get(p)}
        for base in BASELINES:
            shared = sorted(set(by_seed) & set(reward.get(base, {})))
            if p != base and len(shared) >= 2:
                diffs = np.array([by_seed[s] - reward[base][s] for s in shared])
                entry[f"vs_{base}"] = {"mean_diff": float(diffs.mean()), "wins": int((diffs > 0).sum()),
                                       "seeds": len(shared), "p": sign_flip_p(diffs)}
        out[p] = entry
    return out


def report_summary(result: dict, runs: list[dict]) -> None:
    columns = ["placement", "budget", "held-out reward (mean ± std)", "seeds",
               *(f"vs {b}: diff, wins, p" for b in BASELINES)]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for p in sorted(result, key=lambda p: -result[p]["mean"]):
        e = result[p]
        versus = [f"{c['mean_diff']:+.3f}, {c['wins']}/{c['seeds']}, {c['p']:.3f}" if (c := e.get(f"vs_{b}")) else "–"
                  for b in BASELINES]
        budget = f"{e['budget_ratio']:.2f}x" if e.get("budget_ratio") else "–"
        print(f"| {p} | {budget} | {e['mean']:.3f} ± {e['std']:.3f} | {e['seeds']} | " + " | ".join(versus) + " |")
    plot(result, runs)


def plot(result: dict, runs: list[dict]) -> None:
    """Left: final reward per placement (mean ± std). Right: mean held-out reward curve per placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted(result, key=lambda p: -result[p]["mean"])
    left.errorbar(range(len(names)), [result[p]["mean"] for p in names], yerr=[result[p]["std"] for p in names],
                  fmt="o", capsize=3)
    left.set_xticks(range(len(names)), names, rotation=45, ha="right")
    left.set_ylabel("held-out greedy reward after training")
    for p in names:
        curves = [[(0, r["eval_reward_before"])] + [(c["step"], c["reward"]) for c in r["eval_reward_curve"]]
                  for r in runs if r["placement"] == p]
        steps = [s for s, _ in curves[0]]
        right.plot(steps, np.mean([[v for _, v in c] for c in curves if len(c) == len(steps)], axis=0), label=p)
    right.set_xlabel("step")
    right.set_ylabel("held-out greedy reward (mean over seeds)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_study_rl.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument("--placements", type=lambda v: v.split(","), default=list(ORDER))
    parser.add_argument("--rank", type=int, default=2, help="the top-3 recommendation's rank: sets the budget")
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="the A matrices' (LoRA+ ratio 16 for B)")
    parser.add_argument("--generate", type=int, default=4, help="samples per prompt for recommended-generate")
    parser.add_argument("--diagnose-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="I/N: this worker's share of the runs (run N workers)")
    parser.add_argument("--make-data", action="store_true", help="write the task's data files again")
    parser.add_argument("--base-only", action="store_true", help="measure the base model's greedy reward only")
    parser.add_argument("--summary-only", action="store_true", help="summarise the runs already done, run nothing")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS.mkdir(exist_ok=True)
    if args.make_data:  # held out means held out: no test question among the training prompts
        test = make_rows(200, seed=1)
        asked = {r["question"] for r in test}
        train = [r for r in make_rows(4096, seed=0) if r["question"] not in asked][:1024]
        for split, rows in (("train", train), ("test", test)):
            DATA[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    if args.base_only:
        print(json.dumps(base_reward(args), indent=2))
        return
    prepared = None if args.summary_only or not pending(args, done()) else prepare(args)
    same = same_targets(prepared[4]) if prepared else saved_same()
    left = pending(args, done(), same)
    todo = shard(left, args.shard) if prepared else []
    trained = [r for r in planned(args) if r["placement"] not in same]
    print(f"{len(trained) - len(left)} of {len(trained)} runs done, {len(todo)} to go here"
          + "".join(f"; {p} recommends the same types as recommended: its runs are those" for p in same), flush=True)
    for run in todo:
        record = run_one(prepared, run, args)
        with RUNS.open("a") as f:  # one line per finished run: what makes the study resumable
            f.write(json.dumps(record) + "\n")
        print(f"{run}: held-out reward {record['eval_reward_before']:.3f} -> {record['eval_reward_after']:.3f}",
              flush=True)
    write_summary(args, same)


def write_summary(args, same: frozenset) -> None:
    """results/placement_study_rl_summary.json (with every setting, the base reward and the
    hours spent training), the Markdown table and the plot, from the runs finished at ``args.steps``."""
    runs = [r for r in done() if r.get("steps") == args.steps]
    if not runs:
        return
    result = summary(runs)
    settings = {k: getattr(args, k) for k in ("steps", "rank", "batch_size", "num_generations", "max_new_tokens",
                                              "max_length", "lr", "generate", "diagnose_samples", "eval_samples")}
    (RESULTS / "placement_study_rl_summary.json").write_text(json.dumps(
        {**settings, "runs": len(runs), "placements": {**result, **{p: {"same_as": "recommended"} for p in same}},
         "base": json.loads(BASE.read_text()) if BASE.is_file() else None,
         "training_hours": round(sum(r["seconds_per_step"] * r["steps"] for r in runs) / 3600, 2),
         "devices": dict(Counter(r.get("device", "unrecorded") for r in runs))}, indent=2) + "\n")
    report_summary(result, runs)


def saved_same() -> frozenset:
    """:func:`same_targets` from the diagnoses a study saved (``--summary-only`` loads no model)."""
    from plop import Report

    paths = {n: RESULTS / f"placement_study_rl_{n}_report.json" for n in ("recommended", "recommended-generate")}
    return same_targets({n: Report.load(p) for n, p in paths.items()}) if all(
        p.is_file() for p in paths.values()) else frozenset()


if __name__ == "__main__":
    main()
