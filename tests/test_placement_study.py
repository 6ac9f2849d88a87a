"""The placement study's plan, resumption and statistics (benchmarks/placement_study.py): the
study itself fine-tunes for hours, so what is tested here is what decides which runs it makes and
what it concludes from them."""

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from plop.finetune.evidence import sign_flip_p

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "placement_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("placement_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def args():
    return argparse.Namespace(tasks="gsm8k,code", main_seeds="0,1,2,3,4", other_seeds="0,1,2", steps=96)


def test_the_plan_covers_what_the_issue_asks(study, args):
    runs = study.planned(args)
    assert len({study.key(r) for r in runs}) == len(runs) == 110
    seeds = Counter((r["task"], r["budget"], r["placement"]) for r in runs)
    for task in ("gsm8k", "code"):
        for p in study.MAIN:
            assert seeds[task, "matched", p] == 5
        for p in study.OTHERS:
            assert seeds[task, "matched", p] == 3
        for p in study.MAIN + study.HALF_OTHERS:
            assert seeds[task, "half", p] == (5 if p in study.MAIN else 3)
        assert seeds[task, "half", "spectrum"] == 0  # asked for at the matched budget only


def test_a_study_stopped_early_has_every_first_placement_on_the_same_seeds(study, args):
    """Seed by seed: after the first 15 runs, the NFN-guided placements and both baselines each
    have seeds 0-2 of the matched budget on the first task, so every paired comparison is made."""
    first = study.planned(args)[:15]
    assert {(r["task"], r["budget"]) for r in first} == {("gsm8k", "matched")}
    by_placement = {p: sorted(r["seed"] for r in first if r["placement"] == p) for p in {r["placement"] for r in first}}
    assert set(by_placement) == {"recommended", "allocate", "per-layer", *study.BASELINES}
    assert all(seeds == [0, 1, 2] for seeds in by_placement.values())


def test_finished_runs_are_read_back_and_skipped(study, args, tmp_path):
    runs_file = tmp_path / "runs.jsonl"
    plan = study.planned(args)
    with runs_file.open("a") as f:
        for run in plan[:7]:
            f.write(json.dumps({**run, "steps": 96, "eval_loss_after": 1.0}) + "\n")
        f.write(json.dumps({**plan[7], "steps": 32, "eval_loss_after": 1.0}) + "\n")  # another study's run
    todo = study.pending(args, study.done(runs_file))
    assert todo == plan[7:]
    assert study.done(tmp_path / "absent.jsonl") == []


def test_the_study_takes_its_sign_flip_test_from_plop(study):
    """One home for the exact test (tested in tests/test_evidence.py), and the study uses it."""
    assert study.sign_flip_p is sign_flip_p


def test_summary_pairs_each_placement_with_each_baseline_by_seed(study):
    loss = {"all-linear": [1.00, 1.02, 0.99], "kappatune": [1.01, 1.01, 1.00], "allocate": [0.98, 1.00, 0.97]}
    runs = [{"task": "code", "budget": "half", "placement": p, "seed": s, "eval_loss_after": v}
            for p, values in loss.items() for s, v in enumerate(values)]
    cell = study.summary(runs)["code/half"]
    allocate = cell["allocate"]
    assert allocate["mean"] == pytest.approx(np.mean(loss["allocate"]))
    assert allocate["std"] == pytest.approx(np.std(loss["allocate"], ddof=1))
    assert allocate["vs_all-linear"]["mean_diff"] == pytest.approx(-0.02)
    assert allocate["vs_all-linear"]["wins"] == 3 and allocate["vs_all-linear"]["p"] == pytest.approx(0.25)
    assert allocate["vs_kappatune"]["wins"] == 3
    assert "vs_all-linear" not in cell["all-linear"] and cell["all-linear"]["vs_kappatune"]["seeds"] == 3
    assert "train_loss_quarters" not in allocate  # runs recorded without a loss curve


def test_the_pooled_cell_pairs_over_task_and_seed(study):
    """Two tasks of three seeds: per task the smallest p is 1/4; pooled over the six (task, seed)
    pairs a placement that wins on all of them reaches 1/32, and one loss on one task shows."""
    loss = {("gsm8k", "per-layer"): [0.90, 0.91, 0.92], ("gsm8k", "all-linear"): [0.91, 0.92, 0.93],
            ("code", "per-layer"): [1.20, 1.19, 1.25], ("code", "all-linear"): [1.21, 1.18, 1.27]}
    runs = [{"task": t, "budget": "matched", "placement": p, "seed": s, "eval_loss_after": v}
            for (t, p), values in loss.items() for s, v in enumerate(values)]
    result = study.summary(runs)
    assert set(result) == {"gsm8k/matched", "code/matched", "pooled/matched"}
    assert result["gsm8k/matched"]["per-layer"]["vs_all-linear"]["p"] == pytest.approx(0.25)
    pooled = result["pooled/matched"]["per-layer"]["vs_all-linear"]
    diffs = np.array([-0.01, -0.01, -0.01, -0.01, 0.01, -0.02])
    assert pooled["seeds"] == 6 and pooled["wins"] == 5
    assert pooled["mean_diff"] == pytest.approx(diffs.mean())
    assert pooled["p"] == pytest.approx(sign_flip_p(diffs)) and pooled["p"] > 1 / 32
    assert result["pooled/matched"]["all-linear"] == {}  # a baseline is not paired with itself
    one_task = study.summary([r for r in runs if r["task"] == "code"])
    assert "pooled/matched" not in one_task


def test_loss_quarters_average_each_quarter_over_runs(study):
    falling = [{"step": i + 1, "loss": v} for i, v in enumerate([2.0, 2.0, 1.5, 1.5, 1.1, 1.1, 1.0, 1.0])]
    flat = [{"step": i + 1, "loss": 1.0} for i in range(8)]
    assert study.loss_quarters([falling]) == pytest.approx([2.0, 1.5, 1.1, 1.0])
    assert study.loss_quarters([falling, flat]) == pytest.approx([1.5, 1.25, 1.05, 1.0])
    runs = [{"task": "gsm8k", "budget": "matched", "placement": "mlp", "seed": s, "eval_loss_after": 1.0,
             "loss_curve": curve} for s, curve in enumerate([falling, flat])]
    assert study.summary(runs)["gsm8k/matched"]["mlp"]["train_loss_quarters"] == pytest.approx([1.5, 1.25, 1.05, 1.0])
