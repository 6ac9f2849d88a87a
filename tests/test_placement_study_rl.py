"""The RL placement study's task, reward, plan, resumption and statistics
(benchmarks/placement_study_rl.py, v2): the study itself runs for hours, so what is tested here is
what decides its data, which runs it makes and what it concludes from them."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import placement_study_rl
    finally:
        sys.path.remove(str(BENCHMARKS))
    return placement_study_rl


def test_the_shipped_task_is_the_seeded_generator_and_holds_out_its_test(study):
    train, test = ([json.loads(line) for line in study.DATA[s].read_text().splitlines()] for s in ("train", "test"))
    assert test == study.make_rows(200, seed=1)
    assert len(train) == 1024 and not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(str(eval(r["question"].removeprefix("What is ").rstrip("?"))) == r["answer"] for r in train + test)


def test_the_reward_reads_the_last_integer(study):
    assert study.correct(["9 * 3 = 27", "The answer is 27.", "27, not 28", "no number", "1,027"],
                         ["27", "27", "27", "27", "1027"]) == [1.0, 1.0, 0.0, 0.0, 1.0]


def plan_args(study, **kw):
    values = dict(arms=list(study.PLACEMENTS), grid=[0.5, 1, 2, 4], select_steps=6, steps=16, sensitivity=[])
    return argparse.Namespace(**{**values, **kw})


def test_the_rule_is_written_before_the_runs(study):
    assert (study.RULE.min_wins, study.RULE.of_seeds, study.RULE.higher_is_better) == (4, 5, True)
    assert "grad-sign" in study.PLACEMENTS and study.PLACEMENTS["grad-sign"] is None  # placed by its own diagnosis


def test_an_arm_with_the_types_of_another_is_its_twin(study):
    assert study.twin_of(["v_proj", "down_proj", "o_proj"]) == "vod"  # order does not matter
    assert study.twin_of(["v_proj", "o_proj"]) is None and study.twin_of(()) is None


def test_the_plan_chooses_rates_first_then_goes_seed_by_seed_baselines_first(study):
    p = study.protocol(plan_args(study))
    plan = sys.modules["study_protocol"].pending(p, [])
    select, final = [r for r in plan if r["phase"] == "A"], [r for r in plan if r["phase"] == "B"]
    assert plan == select + final and len(select) == 7 * 4 * 2 and len(final) == 7 * 5
    assert [r["seed"] for r in select] == [100] * 28 + [101] * 28
    assert {r["steps"] for r in select} == {6} and {r["steps"] for r in final} == {16}
    assert [r["seed"] for r in final] == sorted(r["seed"] for r in final)  # stopped anywhere: still paired
    assert [r["arm"] for r in final[:3]] == ["all-linear", "mlp", "vod"]
    assert not {r["seed"] for r in select} & {r["seed"] for r in final}  # phase B's seeds are fresh


def test_finished_runs_are_skipped_by_their_full_key(study):
    p = study.protocol(plan_args(study))
    plan = sys.modules["study_protocol"].pending(p, [])
    other = [{**plan[0], "steps": 3}, {**plan[1], "multiplier": 8}]  # another step count or rate: another run
    assert sys.modules["study_protocol"].pending(p, [plan[0], plan[-1]] + other) == plan[1:-1]


def test_a_run_written_twice_counts_once(study, tmp_path):
    protocol = sys.modules["study_protocol"]
    plan = protocol.pending(study.protocol(plan_args(study)), [])
    first, again, other = {**plan[0], "validation": 0.5}, {**plan[0], "validation": 0.7}, {**plan[1], "validation": 0.6}
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (first, other, again)))
    assert protocol.done(path) == [first, other]
    assert protocol.done(tmp_path / "absent.jsonl") == []


def test_workers_share_the_plan(study):
    protocol = sys.modules["study_protocol"]
    p = study.protocol(plan_args(study))
    plan = protocol.pending(p, [])
    parts = [protocol.shard(p, [], f"{i}/3") for i in range(3)]
    assert sorted(map(str, sum(parts, []))) == sorted(map(str, plan))
    # worker 1 restarted after worker 0 finished two runs: it takes none of worker 0's others
    restarted = protocol.shard(p, parts[0][:2], "1/3")
    assert restarted == parts[1]
    assert not {protocol.key(r) for r in restarted} & {protocol.key(r) for r in parts[0]}
    assert protocol.shard(p, parts[0][:2], "0/3") == parts[0][2:]
    with pytest.raises(SystemExit):
        protocol.shard(p, [], "3/3")


def selection(study, p, best):
    """Phase-A records in which multiplier ``best`` has the highest mean validation reward."""
    return [{"phase": "A", "task": study.TASK, "arm": a, "multiplier": m, "seed": s, "steps": p.select_steps,
             "validation": 0.5 + (0.1 if m == best else 0.0) + 0.01 * (s % 2)} for a in p.arms for m in p.grid
            for s in p.select_seeds]


def test_an_arm_takes_its_rate_only_once_its_phase_a_is_complete(study, tmp_path, monkeypatch):
    args = plan_args(study, lr=1e-4)
    p = study.protocol(args)
    records = selection(study, p, best=2)
    assert study.chosen_multiplier(records, p, study.TASK, "mlp", True) == 2
    assert study.chosen_multiplier(records[1:], p, study.TASK, records[0]["arm"], True) is None
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs.jsonl")
    study.RUNS.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = {"phase": "B", "arm": "vod", "multiplier": None}
    assert study.lr_for(run, p, args) == pytest.approx(2e-4)
    assert study.lr_for({"phase": "A", "multiplier": 0.5}, p, args) == pytest.approx(5e-5)


def test_the_summary_judges_each_arm_against_each_baseline(study):
    p = study.protocol(plan_args(study))
    rng = np.random.default_rng(0)
    kinds = [study.KINDS[i % 4] for i in range(40)]
    lift = {"vod": 0.3, "attention": 0.0}
    records = selection(study, p, best=1)
    for s in p.seeds:
        for arm in p.arms:
            items = (rng.random(40) < 0.4 + lift.get(arm, 0.0)).astype(float).tolist()
            records.append({"phase": "B", "task": study.TASK, "arm": arm, "multiplier": None, "seed": s,
                            "steps": p.steps, "lr": 2e-4, "eval_items_after": items,
                            "eval_reward_after": float(np.mean(items)), "step_size": {"policy_kl": 0.01},
                            "by_kind": {k: float(np.mean([v for v, kk in zip(items, kinds) if kk == k]))
                                        for k in study.KINDS},
                            "completion_length": {"sampled": [9.0, 8.0], "held_out": 7.0}})
    result = study.summary(records, p)
    vod = result["verdicts"]["all-linear"]["verdicts"]["vod"]
    assert vod["beats"] and vod["wins"] == 5 and vod["n_comparisons"] == len(p.arms) - 1  # every other arm faces all-linear
    assert not result["verdicts"]["mlp"]["verdicts"]["attention"]["beats"]
    assert result["verdicts"]["mlp"]["pending"] == []
    assert result["arms"]["vod"]["completion_length"] == {"sampled": 8.5, "held_out": 7.0}
    assert result["selection"]["vod"]["multiplier"] == 1
    partial = study.summary([r for r in records if not (r["phase"] == "B" and r["arm"] == "vod" and r["seed"] == 4)], p)
    assert partial["verdicts"]["all-linear"]["pending"] == ["vod"]  # a missing seed is not judged


def test_a_post_hoc_rate_check_runs_after_phase_b_on_its_seeds_and_is_judged_apart(study):
    args = plan_args(study, sensitivity=[("all-linear", 2.0)], lr=2e-4)
    p = study.protocol(args)
    plan = sys.modules["study_protocol"].pending(p, [])
    checks = [r for r in plan if r["phase"] == "S"]
    assert plan[-len(checks):] == checks and [r["seed"] for r in checks] == list(p.seeds)
    assert {(r["arm"], r["multiplier"], r["steps"]) for r in checks} == {("all-linear", 2.0, 16)}
    assert study.lr_for(checks[0], p, args) == pytest.approx(4e-4)  # its own multiplier, not phase A's choice
    rng = np.random.default_rng(1)
    records = selection(study, p, best=4)
    for s in p.seeds:
        for arm, phase, multiplier in [*((a, "B", None) for a in p.arms), ("all-linear", "S", 2.0)]:
            # all-linear collapses at its chosen x4 and recovers at x2
            rate = 0.05 if (arm, phase) == ("all-linear", "B") else 0.6
            items = (rng.random(40) < rate).astype(float).tolist()
            records.append({"phase": phase, "task": study.TASK, "arm": arm, "multiplier": multiplier, "seed": s,
                            "steps": p.steps, "lr": 2e-4, "eval_items_after": items,
                            "eval_reward_after": float(np.mean(items)), "step_size": {"policy_kl": 0.01},
                            "by_kind": {k: 0.5 for k in study.KINDS},
                            "completion_length": {"sampled": [8.0], "held_out": 7.0}})
    result = study.summary(records, p)
    assert result["arms"]["all-linear"]["mean"] < 0.2  # the check never replaces phase B's runs
    assert result["verdicts"]["all-linear"]["verdicts"]["mlp"]["beats"]
    (name,) = result["sensitivity"]
    check = result["sensitivity"][name]
    assert name == "all-linear at x2 (post hoc)" and check["mean"] > 0.4 and check["seeds"] == list(p.seeds)
    assert not check["verdicts"]["verdicts"]["mlp"]["beats"]  # against the check, mlp's lead is gone
    assert check["verdicts"]["verdicts"]["all-linear"]["wins"] == 0
