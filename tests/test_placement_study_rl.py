"""The RL placement study's task, reward, plan, resumption and statistics
(benchmarks/placement_study_rl.py): the study itself runs for hours, so what is tested here is what
decides its data, which runs it makes and what it concludes from them."""

import argparse
import json
import sys
from pathlib import Path

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


def test_runs_go_seed_by_seed_and_resume(study):
    args = argparse.Namespace(seeds=[0, 1], placements=list(study.ORDER), steps=64)
    plan = study.planned(args)
    assert [r["seed"] for r in plan] == [0] * 7 + [1] * 7  # a study stopped after seed 0 is still paired
    assert plan[:4] == [{"placement": p, "seed": 0} for p in ("recommended", "recommended-generate", "all-linear",
                                                               "mlp")]
    finished = [{"placement": "recommended", "seed": 0, "steps": 64}, {"placement": "mlp", "seed": 0, "steps": 2}]
    assert {"placement": "recommended", "seed": 0} not in study.pending(args, finished)
    assert {"placement": "mlp", "seed": 0} in study.pending(args, finished)  # another step count is another run


def test_summary_pairs_seeds_and_a_higher_reward_wins(study):
    rewards = {"all-linear": [0.30, 0.32, 0.28, 0.35, 0.31], "recommended": [0.34, 0.36, 0.30, 0.40, 0.33],
               "mlp": [0.31, 0.30, 0.29, 0.36, 0.30]}
    runs = [{"placement": p, "seed": s, "eval_reward_after": v} for p, vs in rewards.items() for s, v in enumerate(vs)]
    result = study.summary(runs)
    versus = result["recommended"]["vs_all-linear"]
    assert versus["wins"] == 5 and versus["p"] == pytest.approx(2 / 32)  # every seed: the smallest p 5 seeds allow
    assert versus["mean_diff"] == pytest.approx(0.034)
    assert result["mlp"]["vs_all-linear"]["wins"] == 3 and "vs_mlp" not in result["mlp"]
    assert result["all-linear"]["mean"] == pytest.approx(0.312) and result["all-linear"]["seeds"] == 5


def test_workers_share_the_plan_and_each_still_goes_seed_by_seed(study):
    plan = study.planned(argparse.Namespace(seeds=[0, 1], placements=list(study.ORDER)))
    parts = [study.shard(plan, f"{i}/2") for i in range(2)]
    assert sorted(map(str, parts[0] + parts[1])) == sorted(map(str, plan))  # every run once, in one worker
    assert all([r["seed"] for r in part] == sorted(r["seed"] for r in part) for part in parts)


def test_a_generate_diagnosis_recommending_the_same_types_is_not_trained_again(study):
    def report(types):  # what the rule reads of a Report: its recommendation's types
        return argparse.Namespace(recommendation=argparse.Namespace(types=types))

    same = study.same_targets({"recommended": report(["v_proj", "down_proj"]),
                               "recommended-generate": report(["down_proj", "v_proj"])})
    assert same == {"recommended-generate"}
    args = argparse.Namespace(seeds=[0], placements=list(study.ORDER), steps=40)
    assert [r["placement"] for r in study.pending(args, [], same)] == [p for p in study.ORDER if p not in same]
    assert not study.same_targets({"recommended": report(["v_proj"]), "recommended-generate": report(["o_proj"])})
