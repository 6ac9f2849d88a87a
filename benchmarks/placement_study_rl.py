"""RL placement study v2 (issue 32): where should LoRA go for GRPO, once every arm takes its own best
step and the runs pair exactly?

SmolLM2-135M-Instruct (plop's embedded default) learns small-number arithmetic with GRPO
(``plop.compare`` with ``method="grpo"``, TRL's GRPOTrainer) against a verifiable reward: 1 when the
last integer of the completion is the answer, else 0 (:func:`correct`). The task
(benchmarks/data/arithmetic_rl_{train,test}.jsonl: 1,024 training and 200 held-out questions, made by
:func:`make_rows` with a seeded generator; ``--make-data`` writes them again) mixes one-digit sums and
products with two-digit sums (:data:`KINDS`), each asked with :data:`INSTRUCTION`; ``--base-only``
measures the base model's greedy reward (results/placement_study_rl_v2_base.json).

v1 (results/placement_study_rl_{runs.jsonl,summary.json}, kept as they were) gave every arm one
learning rate and ``alpha = 2 x rank``, and a seed paired only the prompt order; its "attention led"
is withdrawn until this study says otherwise. v2 follows benchmarks/study_protocol.py:

* **Arms** (:data:`PLACEMENTS`, most telling first), at the recommendation's budget at ``--rank``:
  all-linear and mlp (the baselines), vod (v_proj + o_proj + down_proj, PLoP's GRPO pick), recommended
  (plop's diagnosis of the prompts), attention (v1's leader), inverse, and grad-sign (issue 33: the
  types a ``--signal grad-sign`` diagnosis picks under GRPO's objective, on 64 training prompts x 4
  sampled completions with this study's reward; results/placement_study_rl_v2_grad_sign_report.json;
  when it picks an arm's exact types, as it picked vod's, that arm's runs stand for both: :func:`twin_of`).
  One ``lora_alpha = 2 x --rank`` for every arm (the recommendation keeps v1's scale of 2) and no
  dropout.
* **Phase A**: each arm at ``--lr`` x each of ``--grid`` on 2 selection seeds, trained on the training
  rows less a 64-prompt validation split and judged by its greedy reward there.
* **Phase B**: 5 fresh seeds per arm at its chosen rate: 4 prompts x 8 completions a step, judged on
  the 200 held-out prompts by greedy reward (overall, per kind, and each prompt's for the statistics),
  the held-out curve at half-way, the policy KL to the base after ``--step-size-steps`` steps, and
  the mean token length of the sampled and of the held-out greedy completions.
* **Decision rule** (:data:`RULE`, printed at start, stored in the summary): see its ``text``; every
  arm against all-linear and against mlp.
* **Post-hoc rate check** (``--sensitivity all-linear:1``, added after phase B was seen): all-linear
  and inverse took x4 in phase A and collapsed on most seeds in phase B, which 6 selection steps
  could not show. all-linear again at x1, its phase-A runner-up and the rate at which its step
  matches the others' at x2 (the probe: at one rate all-linear's policy KL is 4.5x attention's, and
  a KL grows with the square of the rate), on the same 5 seeds, tells whether the verdicts against
  all-linear are about the placement or the rate. Reported apart from the verdicts.
* **Schedule**: a constant learning rate (``lr_schedule="constant"``) from the first step, in both
  phases, so a late step is worth an early one; no warm-up, as transformers' warm-up gives its first
  step a rate of 0 and Phase A's runs are 6 steps.

**Budget** (``--dry-run`` prints the plan and its CPU hours): at :data:`SECONDS_PER_STEP` a step and
:data:`SECONDS_PER_PROMPT` a greedy held-out prompt, 56 phase-A runs (3.0 h) and 35 phase-B runs
(5.4 h): 8.4 CPU h (the grad-sign arm added 1.1 h to v2's 7.3). Cut
to fit: phase A runs 6 steps (B: 16), on 2 seeds and 64 validation prompts, so it can only tell
rates apart that differ early; phase B runs 16 steps (:func:`main` says why that is enough); the
held-out curve has 2 points, not 4.

Results: results/placement_study_rl_v2_runs.jsonl (one line per run: resumable), _summary.json and
.png. Run N one-thread workers with ``--shard I/N``; each stops at a phase-B run whose arm's phase A
another worker has not finished (run it again then).

    python benchmarks/placement_study_rl.py [--dry-run | --summary-only | --base-only | --make-data] [--shard 0/2]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from study_protocol import (Protocol, Score, begin, chosen_multiplier, done, final_runs, per_arm, plot, post_hoc,
                            selection, sensitivity_arg, sensitivity_runs, table, training_hours, verdicts)

from plop.finetune.evidence import DecisionRule

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "placement_study_rl_v2_runs.jsonl"
SUMMARY = RESULTS / "placement_study_rl_v2_summary.json"
BASE = RESULTS / "placement_study_rl_v2_base.json"
REPORT = RESULTS / "placement_study_rl_v2_report.json"
GRAD_SIGN_REPORT = RESULTS / "placement_study_rl_v2_grad_sign_report.json"
DATA = {split: HERE / "data" / f"arithmetic_rl_{split}.jsonl" for split in ("train", "test")}
TASK = "arithmetic"
PLACEMENTS = {"all-linear": "all-linear", "mlp": "mlp", "vod": "vod=v_proj+o_proj+down_proj",
              "recommended": "recommended", "attention": "attention", "inverse": "inverse",
              "grad-sign": None}  # its types come from its own diagnosis: grad_sign_placement
BASELINES = ("all-linear", "mlp")
# Written before any run (issue 32): what "A beats B" means for this study
RULE = DecisionRule(min_wins=4, of_seeds=5, higher_is_better=True)
SECONDS_PER_STEP = 30.0  # one thread, 32 completions: the probe's one-step runs took 35-39 s with 3 small evals
SECONDS_PER_PROMPT = 0.134  # one greedy held-out completion (v1's base measurement: 13.4 s for 100)
VALIDATION = 64  # phase A's validation prompts, taken from the training rows
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


def protocol(args) -> Protocol:
    return Protocol(tasks=(TASK,), arms=tuple(args.arms), grid=tuple(args.grid), select_seeds=(100, 101),
                    seeds=(0, 1, 2, 3, 4), select_steps=args.select_steps, steps=args.steps,
                    sensitivity=tuple(args.sensitivity))


SCORE = Score("held-out greedy reward", True, "policy_kl",
              lambda r: [(0, r["eval_reward_before"])] + [(c["step"], c["reward"]) for c in r["eval_reward_curve"]],
              "held-out greedy reward")


def seconds(run: dict) -> float:
    """A run's estimated CPU seconds: its steps, and its greedy passes over the judged prompts
    (phase A: before and after on the validation split; B: before, half-way, and the KL's pass)."""
    passes, prompts = (2, VALIDATION) if run["phase"] == "A" else (3, 200)
    return run["steps"] * SECONDS_PER_STEP + passes * prompts * SECONDS_PER_PROMPT


class Recorded:
    """The study's reward, :func:`correct`, keeping the token lengths of what it scores: each
    training step's sampled completions (their mean), and the judged prompts' greedy ones (the
    last such call of a run is its final evaluation; judged prompts are never training prompts)."""

    def __init__(self, judged) -> None:
        self.judged = {e.prompt for e in judged}
        self.sampled: list[float] = []
        self.greedy: float | None = None

    def __call__(self, completions, response, prompts, completion_ids, **kwargs) -> list[float]:
        length = float(np.mean([len(ids) for ids in completion_ids]))
        if prompts[0] in self.judged:
            self.greedy = length
        else:
            self.sampled.append(length)
        return correct(completions, response)


def prepare(args) -> tuple:
    """The model, the training pool and its validation split, the held-out rows and their kinds, and
    the diagnosis of the prompts (made once, then read back)."""
    import plop
    from plop.finetune.sft import split_examples
    from plop.model.loading import load_model

    model, tokenizer, model_id = load_model(None, device=args.device)
    pool = examples("train", tokenizer)
    rest, validation = split_examples(pool, VALIDATION / len(pool), seed=0)
    held = examples("test", tokenizer)
    kinds = [json.loads(line)["kind"] for line in DATA["test"].read_text().splitlines() if line.strip()]
    if not REPORT.is_file():
        plop.diagnose(model, pool[:64], tokenizer, samples=None, model_id=model_id, tokens="prompt", rank=args.rank,
                      max_length=args.max_length).save(REPORT)
    if "grad-sign" in args.arms and not GRAD_SIGN_REPORT.is_file():
        # GRPO's first-step objective on the model's own groups, with this study's reward and
        # completion length; the same 64 prompts as the NFN diagnosis
        plop.diagnose(model, pool[:64], tokenizer, samples=None, model_id=model_id, tokens="response",
                      rank=args.rank, max_length=args.max_length, signal="grad-sign", generate=4,
                      max_new_tokens=16, reward=f"{Path(__file__).resolve()}:correct", grad_batches=4,
                      batch_size=16).save(GRAD_SIGN_REPORT)
    return model, tokenizer, pool, rest, validation, held, kinds, plop.Report.load(REPORT)


def twin_of(types) -> str | None:
    """The arm whose named type set is ``types``, if one is: the same types at the same rates and
    seeds make the same runs (exact pairing), so that arm's runs stand for both."""
    return next((arm for arm, spec in PLACEMENTS.items()
                 if spec and "=" in spec and set(spec.partition("=")[2].split("+")) == set(types)), None)


def grad_sign_types() -> list[str] | None:
    """The grad-sign diagnosis's recommended types, once it is made."""
    import plop

    return plop.Report.load(GRAD_SIGN_REPORT).recommendation.types if GRAD_SIGN_REPORT.is_file() else None


def grad_sign_placement() -> str:
    """The grad-sign arm as plop.compare's named type set: its diagnosis's recommended types."""
    import plop

    return "grad-sign=" + "+".join(grad_sign_types())


def run_one(prepared: tuple, run: dict, lr: float, args) -> dict:
    """One arm, seed and rate: phase A on the validation split, phase B on the held-out prompts."""
    import plop
    from plop import TrainConfig

    model, tokenizer, pool, rest, validation, held, kinds, report = prepared
    select = run["phase"] == "A"
    train, judged = (rest, validation) if select else (pool, held)
    reward = Recorded(judged)
    # 4 prompts x 8 completions: at the base's sampled accuracy a 2 x 4 step mostly has no correct
    # completion in a group, hence no advantage and no step (v1: 28-53 % of its steps)
    config = TrainConfig(method="grpo", reward=reward, steps=run["steps"], batch_size=32, num_generations=8,
                         max_new_tokens=16, max_length=args.max_length, lr=lr,
                         lora=plop.LoraSettings(alpha=2.0 * args.rank, dropout=0.0, loraplus_ratio=16.0),
                         lr_schedule="constant",
                         logging_steps=1, eval_steps=None if select else run["steps"] // 2,
                         step_size_steps=None if select else args.step_size_steps)
    placement = PLACEMENTS[run["arm"]] or grad_sign_placement()
    comparison = plop.compare(model, tokenizer, train, report, placements=[placement],
                              seeds=[run["seed"]], rank=args.rank, config=config, eval_examples=judged, lr_grid=None,
                              progress=True)
    (row,) = comparison.to_dict()["rows"]
    record = {**row, **run, "budget_params": comparison.budget, "alpha": config.lora.alpha,
              "completion_length": {"sampled": reward.sampled, "held_out": reward.greedy},
              "device": args.device, "threads": args.threads}
    if select:
        return {**record, "validation": row["eval_reward_after"]}
    items = row["eval_items_after"]
    return {**record, "by_kind": {k: float(np.mean([v for v, kind in zip(items, kinds) if kind == k])) for k in KINDS}}


def lr_for(run: dict, p: Protocol, args) -> float | None:
    """Phase A's and a rate check's rate is its multiplier's; phase B's is its arm's choice (None until
    phase A is done)."""
    multiplier = (chosen_multiplier(done(RUNS), p, TASK, run["arm"], True) if run["phase"] == "B"
                  else run["multiplier"])
    return None if multiplier is None else args.lr * multiplier


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


def summary(finished: list[dict], p: Protocol) -> dict:
    """Each arm's phase-A choice, its phase-B reward (mean ± std, by kind), step size and completion
    lengths, and the rule's verdicts against each baseline; then the post-hoc rate checks, each
    judged as a baseline by the same rule, apart."""
    runs = final_runs(finished, p, TASK)
    checks = sensitivity_runs(finished, p, TASK)
    arms = per_arm(runs, SCORE)
    checked = post_hoc(runs, checks, p, RULE, SCORE)
    every = {**runs, **checks}
    for arm, entry in [*arms.items(), *checked.items()]:
        done_runs = every[arm].values()
        entry["by_kind"] = {k: float(np.mean([r["by_kind"][k] for r in done_runs])) for k in KINDS}
        entry["completion_length"] = {
            "sampled": float(np.mean([np.mean(r["completion_length"]["sampled"]) for r in done_runs])),
            "held_out": float(np.mean([r["completion_length"]["held_out"] for r in done_runs]))}
    return {"arms": arms, "selection": selection(finished, p, TASK, True), "verdicts": verdicts(runs, p, RULE, BASELINES),
            "sensitivity": checked}


def write_summary(args, p: Protocol) -> None:
    """The summary JSON (with the rule, every setting and the hours spent), a Markdown table and the plot."""
    finished = done(RUNS)
    result = summary(finished, p)
    chosen = grad_sign_types()
    settings = {k: getattr(args, k) for k in ("steps", "select_steps", "grid", "rank", "lr", "step_size_steps",
                                              "max_length")}
    SUMMARY.write_text(json.dumps(
        {"rule": RULE.text, **settings, "alpha": 2.0 * args.rank, "select_seeds": list(p.select_seeds),
         "seeds": list(p.seeds), "validation_prompts": VALIDATION, **result,
         "grad_sign": {"types": chosen, "same_as": twin_of(chosen or ())},
         "base": json.loads(BASE.read_text()) if BASE.is_file() else None,
         "training_hours": training_hours(finished),
         "devices": dict(Counter(r.get("device", "unrecorded") for r in finished))}, indent=2) + "\n")
    print("\n" + table(result["arms"], result["sensitivity"], {b: result["verdicts"][b] for b in BASELINES}, SCORE))
    runs = {**final_runs(finished, p, TASK), **sensitivity_runs(finished, p, TASK)}
    if any(runs.values()):
        plot(runs, SCORE, f"GRPO arithmetic, {args.steps} steps, each arm at its own LR", SUMMARY.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 16 steps x 32 completions: twice v1's 32 x 8 sampled completions, each arm at its own rate
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--select-steps", type=int, default=6, help="phase A's steps (cut to fit the budget)")
    parser.add_argument("--grid", type=lambda v: [float(m) for m in v.split(",")], default=[0.5, 1, 2, 4],
                        help="multipliers of --lr tried in phase A")
    parser.add_argument("--arms", type=lambda v: v.split(","), default=list(PLACEMENTS))
    parser.add_argument("--sensitivity", type=sensitivity_arg,
                        default=[], help="ARM:MULT[,...]: post-hoc rate checks on phase B's seeds, reported apart")
    parser.add_argument("--rank", type=int, default=2, help="the top-3 recommendation's rank: sets the budget")
    parser.add_argument("--step-size-steps", type=int, default=4, help="the policy KL to the base after this many steps")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="the A matrices' (LoRA+ ratio 16 for B); v1's rate")
    parser.add_argument("--eval-samples", type=int, default=200, help="--base-only's held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="--base-only's completion length")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="I/N: this worker's share of the runs (run N workers)")
    parser.add_argument("--make-data", action="store_true", help="write the task's data files again")
    parser.add_argument("--base-only", action="store_true", help="measure the base model's greedy reward only")
    parser.add_argument("--summary-only", action="store_true", help="summarise the runs already done, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its CPU hours, run nothing")
    args = parser.parse_args()
    for arm in [*args.arms, *(a for a, _ in args.sensitivity)]:
        if arm not in PLACEMENTS:
            raise SystemExit(f"unknown arm {arm!r}: choose from {', '.join(PLACEMENTS)}")
    chosen = grad_sign_types() if "grad-sign" in args.arms else None
    twin = twin_of(chosen or ())
    if twin:
        print(f"grad-sign picked {twin}'s types ({', '.join(chosen)}): {twin}'s runs stand for both")
        args.arms = [a for a in args.arms if a != "grad-sign"]
    p = protocol(args)
    todo = begin(p, RULE, RUNS, args, seconds, f"{SECONDS_PER_STEP:g} s a step, {SECONDS_PER_PROMPT:g} s a greedy prompt")
    if todo is None:
        return
    if args.make_data:  # held out means held out: no test question among the training prompts
        test = make_rows(200, seed=1)
        asked = {r["question"] for r in test}
        train = [r for r in make_rows(4096, seed=0) if r["question"] not in asked][:1024]
        for split, rows in (("train", train), ("test", test)):
            DATA[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS.mkdir(exist_ok=True)
    if args.base_only:
        print(json.dumps(base_reward(args), indent=2))
        return
    prepared = prepare(args) if todo and not args.summary_only else None
    for run in todo if prepared else []:
        lr = lr_for(run, p, args)
        if lr is None:
            print(f"{run['arm']}: phase A not finished (another worker's runs): stopping here; run again later")
            break
        record = run_one(prepared, run, lr, args)
        with RUNS.open("a") as f:  # one line per finished run: what makes the study resumable
            f.write(json.dumps(record) + "\n")
        print(f"{run['phase']} {run['arm']} seed {run['seed']} lr {lr:.2g}: reward "
              f"{record['eval_reward_before']:.3f} -> {record['eval_reward_after']:.3f}", flush=True)
    write_summary(args, p)


if __name__ == "__main__":
    main()
