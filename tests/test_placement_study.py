"""The SFT placement study's plan, resumption and statistics (benchmarks/placement_study.py, v2): the
study fine-tunes for hours, so what is tested is which runs it makes and what it concludes; no run
needs ../shared."""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))  # the study imports benchmarks/study_protocol.py
    try:
        spec = importlib.util.spec_from_file_location("placement_study", BENCHMARKS / "placement_study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture
def p(study):
    return study.protocol(argparse.Namespace(tasks="gsm8k,code", grid=[0.5, 1, 2, 4], select_steps=16, steps=32,
                                             sensitivity=[]))


def test_the_rule_judges_a_loss(study):
    assert (study.RULE.min_wins, study.RULE.of_seeds, study.RULE.higher_is_better) == (4, 5, False)


def test_the_plan_chooses_rates_first_then_pairs_both_tasks_seed_by_seed(study, p):
    plan = sys.modules["study_protocol"].pending(p, [])
    final = [r for r in plan if r["phase"] == "B"]
    assert len(plan) == 2 * 4 * 4 + 2 * 4 * 5 and plan[-len(final):] == final
    assert [(r["seed"], r["task"]) for r in final[:8]] == [(0, "gsm8k")] * 4 + [(0, "code")] * 4
    assert sum(map(study.seconds, plan)) / 3600 < 3  # the budget the docstring states


def test_a_lower_validation_loss_chooses_the_rate_and_a_lower_held_out_loss_wins(study, p):
    records = [{"phase": "A", "task": "code", "arm": a, "multiplier": m, "seed": 100, "steps": 16,
                "validation": 1.0 - (0.1 if m == 4 else 0)} for a in p.arms for m in p.grid]
    assert study.chosen_multiplier(records, p, "code", "mlp", False) == 4
    rng = np.random.default_rng(1)
    for s in p.seeds:
        for arm in p.arms:
            items = (rng.normal(1.0, 0.05, 30) - (0.2 if arm == "recommended" else 0)).tolist()
            records.append({"phase": "B", "task": "code", "arm": arm, "multiplier": None, "seed": s, "steps": 32,
                            # token-weighted: long rows weigh more, so it differs from the rows' mean
                            "lr": 8e-4, "eval_items_after": items, "eval_loss_after": float(np.mean(items)) + 0.3,
                            "step_size": {"relative_output_change": 0.01}})
    result = study.summary(records, p)
    assert result["code"]["verdicts"]["all-linear"]["verdicts"]["recommended"]["beats"]
    assert not result["code"]["verdicts"]["mlp"]["verdicts"]["attention"]["beats"]
    assert result["code"]["arms"]["recommended"]["mean"] == pytest.approx(np.mean(
        [np.mean(r["eval_items_after"]) for r in records if r["phase"] == "B" and r["arm"] == "recommended"]))
    assert result["code"]["arms"]["recommended"]["token_weighted"] == pytest.approx(
        result["code"]["arms"]["recommended"]["mean"] + 0.3)
    assert result["code"]["selection"]["recommended"]["multiplier"] == 4
    assert result["code"]["selection"]["recommended"]["validation"][4] == pytest.approx(0.9)
    assert result["gsm8k"]["verdicts"]["mlp"]["pending"] == ["all-linear", "recommended", "attention"]


def test_a_post_hoc_rate_check_is_judged_apart_and_shown_in_the_table(study):
    p = study.protocol(argparse.Namespace(tasks="code", grid=[0.5, 1, 2, 4], select_steps=16, steps=32,
                                          sensitivity=[("all-linear", 0.5)]))
    checks = [r for r in sys.modules["study_protocol"].pending(p, []) if r["phase"] == "S"]
    assert [(r["arm"], r["multiplier"], r["seed"]) for r in checks] == [("all-linear", 0.5, s) for s in p.seeds]
    rng = np.random.default_rng(2)
    records = []
    for s in p.seeds:
        # all-linear overshoots at its chosen rate (loss 1.4) and does best at x0.5 (loss 0.8)
        for arm, phase, multiplier, loss in [*((a, "B", None, 1.4 if a == "all-linear" else 1.0) for a in p.arms),
                                             ("all-linear", "S", 0.5, 0.8)]:
            items = rng.normal(loss, 0.05, 30).tolist()
            records.append({"phase": phase, "task": "code", "arm": arm, "multiplier": multiplier, "seed": s,
                            "steps": 32, "lr": 1e-4, "eval_items_after": items, "eval_loss_after": float(np.mean(items)),
                            "step_size": {"relative_output_change": 0.01}})
    result = study.summary(records, p)["code"]
    name = "all-linear at x0.5 (post hoc)"
    assert result["verdicts"]["all-linear"]["verdicts"]["mlp"]["beats"]  # phase B's verdicts stand as they were
    assert result["sensitivity"][name]["mean"] == pytest.approx(0.8, abs=0.02)
    assert not result["sensitivity"][name]["verdicts"]["verdicts"]["mlp"]["beats"]
    table = study.table(result["arms"], result["sensitivity"], result["verdicts"], study.SCORE).splitlines()
    assert table[0].endswith(f"vs {name}: wins, CI, p (Holm) |")
    cells = table[-1].split(" | ")
    assert cells[:2] == [f"| {name}", "0.0001"] and float(cells[2].split(" ± ")[0]) == pytest.approx(0.8, abs=0.02)
    assert "0/5" in next(row for row in table if row.startswith("| mlp |")).split("|")[-2]  # mlp never beats it
