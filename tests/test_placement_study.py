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
    return study.protocol(argparse.Namespace(tasks="gsm8k,code", grid=[0.5, 1, 2, 4], select_steps=16, steps=32))


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
                            "lr": 8e-4, "eval_items_after": items, "eval_loss_after": float(np.mean(items)),
                            "step_size": {"relative_output_change": 0.01}})
    result = study.summary(records, p)
    assert result["code"]["verdicts"]["all-linear"]["verdicts"]["recommended"]["beats"]
    assert not result["code"]["verdicts"]["mlp"]["verdicts"]["attention"]["beats"]
    assert result["code"]["multiplier"]["recommended"] == 4
    assert result["gsm8k"]["verdicts"]["mlp"]["pending"] == ["all-linear", "recommended", "attention"]
