"""The allocate strategy: a LoRA rank per type that grows as NFN falls, under a budget, as PEFT's
rank_pattern/alpha_pattern."""

from __future__ import annotations

import pytest

from conftest import AlignedToy, make_batches, make_llama
from plop import Report, diagnose
from plop.ranking.ranker import ALLOCATION_RANKS, allocate_ranks
from test_cli import run


def test_ranks_grow_as_nfn_falls_and_stay_under_the_budget():
    means = {"a": 0.2, "b": 0.5, "c": 1.0, "d": 3.0}
    per_rank = {t: 1000 for t in means}
    for budget in (20_000, 60_000, 150_000):
        ranks = allocate_ranks(means, per_rank, budget, power=1.0)
        assert ranks and set(ranks.values()) <= set(ALLOCATION_RANKS)
        spent = sum(r * per_rank[t] for t, r in ranks.items())
        assert spent <= budget
        order = sorted(ranks, key=means.get)
        assert [ranks[t] for t in order] == sorted(ranks.values(), reverse=True)
        assert list(ranks)[0] == "a"  # the lowest NFN always gets the largest rank
    # a larger power concentrates the ranks on the lowest-NFN type
    flat, steep = (allocate_ranks(means, per_rank, 60_000, power=p) for p in (0.5, 4.0))
    assert steep["a"] / sum(steep.values()) > flat["a"] / sum(flat.values())


def test_allocate_on_a_toy_with_known_nfn(aligned_toy):
    report = diagnose(aligned_toy, make_batches(16, 12), strategy="allocate", top_k=2, n_bootstrap=20)
    rec = report.recommendation
    means = {t.type: t.nfn_mean for t in report.types}
    assert rec.types[0] == "low" and rec.rank_pattern["low"] == max(rec.rank_pattern.values())
    assert all(rec.rank_pattern[a] >= rec.rank_pattern[b] for a in rec.types for b in rec.types if means[a] < means[b])
    top2 = sorted(means, key=means.get)[:2]
    budget = 16 * sum(m.lora_params_per_rank for m in report.modules if m.type in top2)
    assert rec.allocation["budget"] == budget and rec.trainable_params <= budget
    assert rec.trainable_params == sum(r * sum(m.lora_params_per_rank for m in report.modules if m.type == t)
                                       for t, r in rec.rank_pattern.items())
    # each type's alpha / rank is the run's lora_alpha / r: 2 at the default alpha, 1 at alpha = r
    assert rec.alpha_pattern is None  # derived where the LoRA settings are known, not stored
    assert report.to_peft_config().alpha_pattern == {t: 2 * r for t, r in rec.rank_pattern.items()}
    assert report.to_peft_config(r=8, lora_alpha=8).alpha_pattern == dict(rec.rank_pattern)


def test_peft_loads_the_rank_pattern(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_llama()
    report = diagnose(model, make_batches(16, 16), strategy="allocate", budget=12_000, n_bootstrap=20)
    report.save(tmp_path / "r.json")
    config = Report.load(tmp_path / "r.json").to_peft_config()
    config.save_pretrained(tmp_path / "cfg")
    peft_model = get_peft_model(make_llama(), LoraConfig.from_pretrained(tmp_path / "cfg"))
    rec = report.recommendation
    wrapped = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(wrapped) == set(rec.modules)
    for name, module in wrapped.items():
        rank = rec.rank_pattern[name.rsplit(".", 1)[-1]]
        assert module.lora_A["default"].out_features == rank
        assert module.scaling["default"] == pytest.approx(2.0)  # alpha / rank kept for every type
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == rec.trainable_params <= 12_000


@pytest.mark.spawns
def test_cli_allocate(tmp_path):
    from plop.cli import build_parser

    alone, spend = (build_parser().parse_args(["diagnose", *a]) for a in (["--allocate"], ["--allocate", "5000"]))
    assert (alone.allocate, alone.budget) == (True, None) and (spend.allocate, spend.budget) == (True, 5000)
    report = diagnose(AlignedToy(), make_batches(8, 8), strategy="allocate", n_bootstrap=10)
    path = report.save(tmp_path / "r.json")
    shown = run("show", str(path)).stdout
    assert "allocate" in shown and all(f"{t} (r={r})" in shown for t, r in report.recommendation.rank_pattern.items())


def test_allocation_spends_most_of_a_small_budget():
    # SmolLM2-135M's per-type NFN means on the study's code task and LoRA parameters per rank: at the
    # top-3's budget at rank 4 the rule must come within 10 % of it, as the study's ±10 % asks
    means = {"v_proj": 0.613, "up_proj": 0.919, "down_proj": 1.055, "o_proj": 1.175,
             "gate_proj": 1.267, "q_proj": 1.395, "k_proj": 1.602}
    per_rank = {"v_proj": 23040, "up_proj": 63360, "down_proj": 63360, "o_proj": 34560,
                "gate_proj": 63360, "q_proj": 34560, "k_proj": 23040}
    for rank in (4, 8):
        budget = rank * (per_rank["v_proj"] + per_rank["up_proj"] + per_rank["down_proj"])
        ranks = allocate_ranks(means, per_rank, budget, power=2.0)
        assert 0.9 * budget <= sum(r * per_rank[t] for t, r in ranks.items()) <= budget
