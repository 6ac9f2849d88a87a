"""The protocol both v2 placement studies follow (issue 32): benchmarks/placement_study_rl.py (GRPO on
arithmetic) and benchmarks/placement_study.py (SFT on GSM8K and code) differ in task and score only.

* **Phase A, the learning rate**: each arm at every multiplier of ``grid`` (of the script's ``--lr``)
  and each of ``select_seeds``, trained on the training rows less a validation split and scored on that
  split, never on the held-out set. Each arm then takes the multiplier with the best mean validation
  score, by :func:`plop.finetune.compare.best_multiplier`: the rule ``plop compare --lr-grid`` uses.
* **Phase B, the evidence**: ``seeds`` fresh seeds per arm at its chosen rate, scored on the held-out
  set. One seed gives every arm the same data order and, while the policies are equal, the same
  samples (``plop.finetune.hf_trainer.PairedSampling``), and every arm has one ``lora_alpha`` and no
  dropout, so the runs of one seed pair exactly.
* **Judgement**: a :class:`plop.finetune.evidence.DecisionRule` written in the script before any run,
  printed at start and stored in the summary; every arm against each baseline with ``judge_all``
  (Bonferroni-level bootstrap CIs over seeds x held-out items, Holm-adjusted sign-flip p), one family
  per baseline.
* **Resumable**: every finished run is one JSON line, keyed by :func:`key`; the plan goes phase A seed
  by seed, then phase B seed by seed with the most telling arms first, so a study stopped anywhere is
  still paired. ``--shard I/N``: worker I takes every N-th run of the plan; a phase-B run needs its arm's phase A
  complete, and a worker reaching one that is not stops (run it again when the others have finished).
* **Post-hoc rate checks** (``sensitivity``, planned after phase B): an arm again on phase B's seeds at
  another multiplier of the grid, when its chosen rate looks like the reason for its result. They
  never replace phase B's runs or its verdicts; a study reports them apart, as post hoc.

Planning and judging need no model; the LR rule comes from plop.finetune.compare (which imports torch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plop.finetune.compare import best_multiplier
from plop.finetune.evidence import DecisionRule


@dataclass(frozen=True)
class Protocol:
    """Which runs a study makes: ``arms`` most telling first, per task."""

    tasks: tuple[str, ...]
    arms: tuple[str, ...]
    grid: tuple[float, ...]
    select_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    select_steps: int
    steps: int
    # (arm, multiplier) pairs re-run on phase B's seeds after phase B was seen: reported apart
    sensitivity: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Score:
    """What a study judges by: ``name``, its held-out score (a run's is :func:`judged`); ``step_size``,
    the key of its ``step_size`` dict; ``curve(record)``, its (step, value) points for the plot, which
    show ``curve_name`` (the held-out score itself for GRPO, the training loss for SFT)."""

    name: str
    higher_is_better: bool
    step_size: str
    curve: Callable[[dict], list[tuple[int, float]]]
    curve_name: str


def planned(p: Protocol) -> list[dict]:
    """Phase A then phase B, each seed by seed (tasks, then arms, within a seed), then the post-hoc
    rate checks (phase "S") on phase B's seeds."""
    select = [{"phase": "A", "task": t, "arm": a, "multiplier": m, "seed": s, "steps": p.select_steps}
              for s in p.select_seeds for t in p.tasks for a in p.arms for m in p.grid]
    final = [{"phase": "B", "task": t, "arm": a, "multiplier": None, "seed": s, "steps": p.steps}
             for s in p.seeds for t in p.tasks for a in p.arms]
    return select + final + [{"phase": "S", "task": t, "arm": a, "multiplier": m, "seed": s, "steps": p.steps}
                             for s in p.seeds for t in p.tasks for a, m in p.sensitivity]


def key(run: dict) -> tuple:
    """A run's identity: another step count or multiplier is another run."""
    return run["phase"], run["task"], run["arm"], run["multiplier"], run["seed"], run["steps"]


def done(path: Path) -> list[dict]:
    """The finished runs, each key once (the first line): two workers that once ran one run twice
    (the file keeps both lines) must not weigh it twice."""
    first: dict[tuple, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            run = json.loads(line)
            first.setdefault(key(run), run)
    return list(first.values())


def pending(p: Protocol, finished: list[dict]) -> list[dict]:
    keys = {key(r) for r in finished}
    return [r for r in planned(p) if key(r) not in keys]


def shard(p: Protocol, finished: list[dict], spec: str) -> list[dict]:
    """Worker ``I`` of ``N``'s runs left (``--shard I/N``): every N-th run of the whole plan, less
    those finished. N one-thread workers on N cores finish sooner than one N-thread worker, and each
    still goes seed by seed. Counting in the plan, not in what is left, keeps a worker's share fixed:
    one restarted while another still runs takes none of the other's runs."""
    index, count = (int(v) for v in spec.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard {spec}: give I/N with 0 <= I < N")
    mine = {key(r) for r in planned(p)[index::count]}
    return [r for r in pending(p, finished) if key(r) in mine]


def chosen_multiplier(finished: list[dict], p: Protocol, task: str, arm: str, higher_is_better: bool) -> float | None:
    """The arm's multiplier once its phase A is complete (every multiplier at every select seed),
    else None."""
    scores = {m: [r["validation"] for r in finished if r["phase"] == "A" and r["task"] == task and r["arm"] == arm
                  and r["multiplier"] == m and r["steps"] == p.select_steps and r["seed"] in p.select_seeds]
              for m in p.grid}
    if any(len(v) < len(p.select_seeds) for v in scores.values()):
        return None
    return best_multiplier(scores, higher_is_better=higher_is_better)


def hours(runs: list[dict], seconds: Callable[[dict], float]) -> float:
    return sum(seconds(r) for r in runs) / 3600


def print_plan(p: Protocol, todo: list[dict], seconds: Callable[[dict], float], rates: str) -> None:
    """``--dry-run``: the runs left per phase and their estimated CPU hours."""
    for phase in ("A", "B") + (("S",) if p.sensitivity else ()):
        runs = [r for r in todo if r["phase"] == phase]
        print(f"phase {phase}: {len(runs)} runs to go, {hours(runs, seconds):.1f} CPU h")
    print(f"in all {len(todo)} of {len(planned(p))} runs, {hours(todo, seconds):.1f} CPU h at {rates}")


def sensitivity_name(arm: str, multiplier: float) -> str:
    return f"{arm} at x{multiplier:g} (post hoc)"


def _by_seed(finished: list[dict], p: Protocol, task: str, phase: str, names, name_of) -> dict[str, dict[int, dict]]:
    """``phase``'s runs of ``task`` at the planned steps, per name (``name_of(run)``) and seed."""
    out: dict[str, dict[int, dict]] = {n: {} for n in names}
    for r in finished:
        if r["phase"] == phase and r["task"] == task and r["steps"] == p.steps and (n := name_of(r)) in out:
            out[n][r["seed"]] = r
    return out


def sensitivity_runs(finished: list[dict], p: Protocol, task: str) -> dict[str, dict[int, dict]]:
    """The post-hoc rate checks of ``task``, per :func:`sensitivity_name` and seed."""
    return _by_seed(finished, p, task, "S", [sensitivity_name(a, m) for a, m in p.sensitivity],
                    lambda r: sensitivity_name(r["arm"], r["multiplier"]))


def final_runs(finished: list[dict], p: Protocol, task: str) -> dict[str, dict[int, dict]]:
    """Phase B's runs of ``task`` at the planned steps, per arm and seed."""
    return _by_seed(finished, p, task, "B", p.arms, lambda r: r["arm"])


def verdicts(runs: dict[str, dict[int, dict]], p: Protocol, rule: DecisionRule,
             baselines: tuple[str, ...]) -> dict[str, dict]:
    """Per baseline, every other arm with all of ``p.seeds`` judged against it on the held-out items
    (``eval_items_after``, ``(seeds, items)``); arms still missing a seed are listed as pending."""
    complete = {a: np.array([by_seed[s]["eval_items_after"] for s in p.seeds], dtype=float)
                for a, by_seed in runs.items() if all(s in by_seed for s in p.seeds)}
    out = {}
    for base in baselines:
        arms = {a: scores for a, scores in complete.items() if a != base}
        judged = rule.judge_all(arms, complete[base]) if base in complete and arms else {}
        out[base] = {"verdicts": {a: v.to_dict() for a, v in judged.items()},
                     "pending": [a for a in p.arms if a != base and a not in judged]}
    return out


def judged(run: dict) -> float:
    """A run's held-out score as the rule judges it: the mean over held-out items, each weighing the
    same (a GRPO prompt's reward; an SFT row's mean token loss, where the run's own ``eval_loss_after``
    weighs every token the same and so leans toward long rows)."""
    return float(np.mean(run["eval_items_after"]))


def per_arm(runs: dict[str, dict[int, dict]], score: Score) -> dict[str, dict]:
    """Each arm's held-out score (:func:`judged`; mean, std over seeds), learning rate and step size."""
    out = {}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        values = np.array([judged(r) for r in by_seed.values()])
        steps = [r["step_size"][score.step_size] for r in by_seed.values() if r.get("step_size")]
        out[arm] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "seeds": sorted(by_seed), "lr": next(iter(by_seed.values()))["lr"],
                    score.step_size: float(np.mean(steps)) if steps else None}
    return out


def selection(finished: list[dict], p: Protocol, task: str, higher_is_better: bool) -> dict[str, dict]:
    """Phase A per arm: its mean validation score at each multiplier, and the multiplier chosen."""
    return {a: {"validation": {m: float(np.mean([r["validation"] for r in finished if r["phase"] == "A"
                                                 and r["task"] == task and r["arm"] == a and r["multiplier"] == m
                                                 and r["steps"] == p.select_steps] or [np.nan]))
                               for m in p.grid},
                "multiplier": chosen_multiplier(finished, p, task, a, higher_is_better)} for a in p.arms}


def training_hours(finished: list[dict]) -> float:
    """The CPU (or device) hours the runs spent training, by their own step times."""
    return round(sum(r["seconds_per_step"] * r["steps"] for r in finished) / 3600, 2)


def sensitivity_arg(value: str) -> list[tuple[str, float]]:
    """``--sensitivity ARM:MULT[,...]``."""
    return [(arm, float(multiplier)) for arm, multiplier in (item.split(":") for item in value.split(","))]


def post_hoc(runs: dict[str, dict[int, dict]], checks: dict[str, dict[int, dict]], p: Protocol, rule: DecisionRule,
             score: Score) -> dict[str, dict]:
    """The post-hoc rate checks (``checks``, from :func:`sensitivity_runs`), each summarised like an
    arm and judged by the same rule as one more baseline against phase B's arms (``runs``, from
    :func:`final_runs`; its own family), apart from phase B's verdicts."""
    return {name: {**entry, "verdicts": verdicts({**runs, name: checks[name]}, p, rule, (name,))[name]}
            for name, entry in per_arm(checks, score).items()}


def table(arms: dict[str, dict], checks: dict[str, dict], by_baseline: dict[str, dict], score: Score) -> str:
    """A Markdown table: each arm (phase B, then the post-hoc checks) with its rate, score, step size,
    and its verdict against each baseline (phase B's, then each check's)."""
    against = {**by_baseline, **{name: e["verdicts"] for name, e in checks.items()}}
    rows = [f"| arm | lr | {score.name} (mean ± std) | seeds | {score.step_size} | "
            + " | ".join(f"vs {b}: wins, CI, p (Holm)" for b in against) + " |", "|---" * (5 + len(against)) + "|"]
    for arm, e in [*arms.items(), *checks.items()]:
        versus = [f"{v['wins']}/{len(v['seed_wins'])}, [{v['interval']['low']:+.3f}, {v['interval']['high']:+.3f}], "
                  f"{v['p_adjusted']:.3f}" + (" **beats**" if v["beats"] else "")
                  if (v := family["verdicts"].get(arm)) else "–" for family in against.values()]
        step = f"{e[score.step_size]:.3g}" if e[score.step_size] is not None else "–"
        rows.append(f"| {arm} | {e['lr']:.2g} | {e['mean']:.3f} ± {e['std']:.3f} | {len(e['seeds'])} | {step} | "
                    + " | ".join(versus) + " |")
    return "\n".join(rows)


def plot(runs: dict[str, dict[int, dict]], score: Score, title: str, path: Path) -> None:
    """Left: each arm's curve (mean over its seeds). Right: every run's held-out score against its
    step size, so a lead that is only a bigger step shows as a slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, by_seed in runs.items():
        curves = [score.curve(r) for r in by_seed.values()]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        same = [[v for _, v in c] for c in curves if [s for s, _ in c] == steps]
        line, = left.plot(steps, np.mean(same, axis=0), label=arm)
        points = [(r["step_size"][score.step_size], judged(r)) for r in by_seed.values() if r.get("step_size")]
        if points:
            right.scatter(*zip(*points), color=line.get_color(), label=arm, s=14)
    left.set_xlabel("step")
    left.set_ylabel(f"{score.curve_name} (mean over seeds)")
    left.legend(fontsize=7)
    right.set_xscale("log")
    right.set_xlabel(f"step size: {score.step_size}")
    right.set_ylabel(score.name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def begin(p: Protocol, rule: DecisionRule, path: Path, args, seconds: Callable[[dict], float],
          rates: str) -> list[dict] | None:
    """A study's start: its rule printed before anything runs, then this worker's runs left, or
    None after ``--dry-run`` printed the plan."""
    print(f"decision rule: {rule.text}", flush=True)
    todo = shard(p, done(path), args.shard)
    if args.dry_run:
        print_plan(p, todo, seconds, rates)
        return None
    return todo
