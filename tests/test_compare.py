"""Placement comparison at a matched trainable-parameter budget, on a tiny real LLaMA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from plop import LoraSettings, TrainConfig, compare, diagnose
from plop.finetune.compare import candidates
from plop.ranking.placements import COMPARE_DEFAULT
from plop.errors import PlopError
from tiny_lm import examples, make_model, make_tokenizer

pytestmark = pytest.mark.heavy  # trains several runs or builds large meta models: `make test`, not the fast tier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def report(tokenizer):
    return diagnose(make_model(), [e.text for e in examples(16)], tokenizer)


@pytest.fixture(scope="module")
def comparison(tokenizer, report):
    base = make_model()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    result = compare(base, tokenizer, examples(32), report, seeds=(0, 1), rank=16,
                     config=TrainConfig(steps=2, lr=1e-2, batch_size=8, eval_fraction=0.25))
    return result, base, state


def test_every_placement_runs_once_per_seed(comparison):
    result, _, _ = comparison
    assert [(r.placement, r.seed) for r in result.rows] == [(p, s) for s in (0, 1) for p in COMPARE_DEFAULT]


def test_budgets_match_the_recommendation_within_ten_percent(comparison, report):
    result, _, _ = comparison
    recommended = next(r for r in result.rows if r.placement == "recommended")
    assert recommended.rank == 16 and result.budget == recommended.trainable_params
    for row in result.rows:
        assert abs(row.trainable_params / result.budget - 1) <= 0.10, row
        assert row.within_budget and row.budget_ratio == pytest.approx(row.trainable_params / result.budget, abs=1e-4)
    ranks = {r.placement: r.rank for r in result.rows}
    assert ranks["all-linear"] < ranks["recommended"] < ranks["qv"]  # more modules, lower rank


def test_inverse_and_kappatune_placements(comparison, report):
    result, _, _ = comparison
    rows = {r.placement: r for r in result.rows}
    k = len(report.recommendation.types)
    assert rows["inverse"].types == [t.type for t in report.types[-k:]]  # the k highest mean NFNs
    assert not set(rows["inverse"].types) & set(report.recommendation.types)
    [kappa] = candidates(report, make_model(), ["kappatune"])
    assert len(kappa.placement.target_modules) == len(report.recommendation.modules)


def test_every_run_starts_from_the_same_base_weights(comparison):
    result, base, state = comparison
    for key, value in base.state_dict().items():  # the model handed in is never trained
        assert torch.equal(value, state[key]), key
    for seed in (0, 1):
        before = {r.eval_loss_before for r in result.rows if r.seed == seed}
        assert len(before) == 1  # same base, same held-out split: the same loss before training
    assert all(r.eval_loss_after is not None and r.seconds_per_step > 0 for r in result.rows)


def test_aggregate_table_and_json(comparison, tmp_path):
    result, _, _ = comparison
    aggregate = {a["placement"]: a for a in result.aggregate()}
    losses = [r.eval_loss_after for r in result.rows if r.placement == "qv"]
    assert aggregate["qv"]["eval_loss_after_mean"] == pytest.approx(np.mean(losses))
    assert aggregate["qv"]["eval_loss_after_std"] == pytest.approx(np.std(losses, ddof=1))
    assert aggregate["qv"]["seeds"] == 2

    saved = json.loads(result.save(tmp_path / "results.json").read_text())
    assert saved["budget"] == result.budget and len(saved["rows"]) == 14 and len(saved["aggregate"]) == 7
    assert saved["settings"]["steps"] == 2 and saved["settings"]["seeds"] == [0, 1]
    for row in saved["rows"]:  # each run's training loss, to judge whether it had converged
        assert [p["step"] for p in row["loss_curve"]] == [1, 2]
        assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in row["loss_curve"])

    console = Console(record=True, width=200)
    console.print(result)
    text = console.export_text()
    assert all(p in text for p in COMPARE_DEFAULT) and f"{result.budget:,}" in text


def test_a_model_factory_and_kept_adapters(tmp_path, tokenizer, report):
    result = compare(make_model, tokenizer, examples(16), report, placements=["recommended", "mlp"], rank=4,
                     config=TrainConfig(steps=1, batch_size=8), output_dir=tmp_path)
    assert [r.placement for r in result.rows] == ["recommended", "mlp"]
    assert (tmp_path / "mlp-seed0" / "adapter_model.safetensors").is_file()


def test_unknown_placement_is_refused(tokenizer, report):
    with pytest.raises(PlopError, match="unknown placement 'everything'"):
        compare(make_model(), tokenizer, examples(8), report, placements=["everything"])


def test_fixed_eval_set_gives_every_run_the_same_before_loss(tokenizer, report, tmp_path):
    held_out = examples(40)[32:]
    result = compare(make_model(), tokenizer, examples(32), report, placements=["recommended", "qv"], seeds=(0, 1),
                     rank=8, config=TrainConfig(steps=1, lr=1e-2, batch_size=8), eval_examples=held_out)
    before = {round(r.eval_loss_before, 6) for r in result.rows}
    assert len(before) == 1  # same base weights, same held-out rows: one "before" for all four runs
    assert all(r.eval_loss_after is not None for r in result.rows)
    png = tmp_path / "compare.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_level_baselines_pick_as_many_modules_as_the_recommendation(tokenizer, report):
    """per-layer: the lowest-NFN linear modules; spectrum: the highest-SNR ones, computed here
    from each weight's singular values; both trained at the recommendation's budget."""
    from plop.finetune.compare import candidates
    from plop.model.layout import modules_peft_adapts
    from plop.model.loading import model_layout
    from plop.measure.weight_scores import weight_scores

    model = make_model()
    count = len(report.recommendation.modules)
    per_layer, spectrum = candidates(report, model, ["per-layer", "spectrum"])
    by_nfn = sorted(report.modules, key=lambda m: m.nfn)
    snr = {m.name: weight_scores(model.get_submodule(m.name).weight)[1] for m in report.modules}
    layout = model_layout(model)
    def adapted(candidate) -> list[str]:
        return sorted(modules_peft_adapts(layout, candidate.placement.target_modules))

    assert adapted(per_layer) == sorted(m.name for m in by_nfn[:count])
    assert adapted(spectrum) == sorted(sorted(snr, key=snr.get)[-count:])
    result = compare(model, tokenizer, examples(16), report, placements=["per-layer", "spectrum"], rank=8,
                     config=TrainConfig(steps=1, batch_size=8, eval_fraction=0.25))
    for row, candidate in zip(result.rows, (per_layer, spectrum)):
        assert row.trainable_params == row.rank * candidate.params_per_rank  # PEFT adapted exactly those modules


def test_allocate_trains_its_ranks_per_type_within_the_budget(tokenizer, report):
    """The allocate placement: PEFT gets a rank per type, spends at most the recommendation's
    budget, and the lowest-NFN type gets the highest rank."""
    from plop.finetune.compare import candidates

    model = make_model()
    budget = 16 * candidates(report, model, ["recommended"])[0].params_per_rank
    (allocation,) = candidates(report, model, ["allocate"], budget)
    ranks = allocation.placement.rank_pattern
    means = {t.type: t.nfn_mean for t in report.types}
    assert len(ranks) >= 2 and ranks[min(ranks, key=means.get)] == max(ranks.values())
    assert 0.5 * budget < allocation.params <= budget
    result = compare(model, tokenizer, examples(16), report, placements=["allocate"], rank=16,
                     config=TrainConfig(steps=1, batch_size=8, eval_fraction=0.25))
    (row,) = result.rows
    assert row.trainable_params == allocation.params and row.budget_ratio == pytest.approx(allocation.params / budget,
                                                                                           abs=1e-4)
    assert row.rank_pattern == ranks and row.rank == max(ranks.values())


def test_an_allocate_report_sets_the_budget_with_its_own_ranks(tokenizer):
    """The recommendation of an allocate report trains its rank_pattern; the budget the other
    placements are matched to is what those ranks cost, not one rank for every type."""
    model = make_model()
    report = diagnose(model, [e.text for e in examples(16)], tokenizer, strategy="allocate")
    result = compare(model, tokenizer, examples(16), report, placements=["recommended", "all-linear"], rank=16,
                     config=TrainConfig(steps=1, batch_size=8, eval_fraction=0.25))
    recommended, all_linear = result.rows
    assert result.budget == recommended.trainable_params == report.recommendation.trainable_params
    assert recommended.budget_ratio == 1.0 and abs(all_linear.trainable_params / result.budget - 1) <= 0.10


def test_one_seed_gives_every_placement_the_same_first_batch(tokenizer, report, tmp_path):
    """At step 1 every B is zero, so placements trained at one seed on the same batch log the same
    loss: the seed pairs the runs' data (LoRA dropout 0.05 here cannot shift it)."""
    config = TrainConfig(steps=2, lr=1e-2, batch_size=8, logging_steps=1, lora=LoraSettings(dropout=0.05),
                         output_dir=str(tmp_path))
    result = compare(make_model(), tokenizer, examples(24), report, seeds=[3], rank=2, config=config,
                     placements=["mlp", "all-linear"])
    assert len({r.loss_curve[0]["loss"] for r in result.rows}) == 1
    assert len({r.loss_curve[1]["loss"] for r in result.rows}) == 2  # from step 2 on they learn apart


def test_the_allocate_placement_spends_its_budget_with_the_reports_own_power(tokenizer):
    from plop.finetune.compare import candidates

    model = make_model()
    texts = [e.text for e in examples(16)]
    flat, steep = (diagnose(model, texts, tokenizer, allocate_power=p) for p in (0.1, 32.0))
    budget = 16 * candidates(flat, model, ["recommended"])[0].params_per_rank
    ranks = [candidates(r, model, ["allocate"], budget)[0].placement.rank_pattern for r in (flat, steep)]
    assert max(ranks[1].values()) > max(ranks[0].values())  # a steeper rule puts more rank on the lowest NFN


def test_the_lr_grid_chooses_each_placement_s_rate_on_the_validation_split(tokenizer, report, tmp_path):
    """Every placement is tried at every multiplier and selection seed on a validation split, the
    reported runs use the rate with the lowest mean validation loss, and the held-out items are each
    scored once per reported run (their per-item losses kept for paired statistics)."""
    rows, held_out = examples(24), examples(30)[24:]
    result = compare(make_model(), tokenizer, rows, report, seeds=[0], rank=2, steps=2, lr=1e-2, batch_size=8,
                     placements=["recommended", "mlp"], eval_examples=held_out, lr_grid=[0.5, 4.0],
                     select_seeds=[7])
    chosen, selection = result.settings["lr_chosen"], result.settings["lr_selection"]
    assert len(selection) == 2 * 2 and result.settings["lr_grid"] == [0.5, 4.0]
    for placement in ("recommended", "mlp"):
        mean = {m: np.mean([s["validation"] for s in selection if s["placement"] == placement and s["multiplier"] == m])
                for m in (0.5, 4.0)}
        assert chosen[placement] == pytest.approx(1e-2 * min(mean, key=mean.get))
        assert {r.lr for r in result.rows if r.placement == placement} == {chosen[placement]}
    for row in result.rows:  # one loss per held-out row, around the token-weighted mean
        assert len(row.eval_items_after) == len(held_out)
        assert min(row.eval_items_after) <= row.eval_loss_after <= max(row.eval_items_after)
    # a comparison's defaults: no LoRA dropout, one alpha (2 x 16, the default rank's) for every rank
    assert result.settings["dropout"] == 0.0 and result.settings["alpha"] == 32


def test_a_named_set_of_types_is_a_placement(tokenizer, report):
    """"vod=v_proj+o_proj+down_proj": those types, at the rank that matches the budget, under its name."""
    from plop.errors import PlopError

    model = make_model()
    budget = candidates(report, model, ["recommended"])[0].params_at(4)
    (vod,) = candidates(report, model, ["vod=v_proj+o_proj+down_proj"], budget)
    assert vod.placement.name == "vod" and vod.placement.types == ["v_proj", "o_proj", "down_proj"]
    assert vod.placement.target_modules == ["v_proj", "o_proj", "down_proj"]
    assert abs(vod.params_at(vod.rank_for(budget)) - budget) <= vod.params_per_rank
    with pytest.raises(PlopError, match="no such type 'w9'"):
        candidates(report, model, ["x=v_proj+w9"], budget)


def test_best_multiplier_is_the_best_mean_validation_score():
    """The one LR-choice rule, shared with the placement studies: best mean, first of a tie."""
    from plop.finetune.compare import best_multiplier

    scores = {0.5: [0.2, 0.4], 1.0: [0.5, 0.3], 2.0: [0.6, 0.1]}
    assert best_multiplier(scores, higher_is_better=True) == 1.0  # means 0.3, 0.4, 0.35
    assert best_multiplier(scores, higher_is_better=False) == 0.5  # a loss: the lowest
    assert best_multiplier({1.0: [0.4], 2.0: [0.4]}, higher_is_better=True) == 1.0
