"""Ranking module types, placement strategies, bootstrap stability and adapter cost."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_batches, pad_batches
from plop import diagnose
from plop.config import STABLE_MIN_ROWS, Strategy
from plop.ranking.placements import placement_costs, placement_types
from plop.ranking.ranker import STABLE_AGREEMENT, Selector, adapter_cost, modules_regex, rank_types, type_means
from plop.ranking.report import ModuleRecord

LLAMA_TYPES = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128), "mlp.down_proj": (128, 64),
}  # (d_in, d_out)


def record(name: str, nfn: float, d_in: int = 64, d_out: int = 64) -> ModuleRecord:
    layer = re.search(r"\.(\d+)\.", name)
    return ModuleRecord(
        name=name, type=name.rsplit(".", 1)[1], layer=int(layer.group(1)) if layer else None, d_out=d_out,
        d_in=d_in, nfn=nfn, nfn_std=0.1, token_count=100, calls=1, baseline=1.0, input_norm_mean=1.0,
        input_norm_max=2.0, output_norm_mean=1.0,
    )


def llama_records(n_layers: int = 3, seed: int = 0) -> list[ModuleRecord]:
    rng = np.random.default_rng(seed)
    return [
        record(f"model.layers.{i}.{sub}", float(rng.uniform(0.3, 2.0)), d_in, d_out)
        for i in range(n_layers)
        for sub, (d_in, d_out) in LLAMA_TYPES.items()
    ]


# -- ranking ----------------------------------------------------------------------------------
def test_rank_types_ascending_with_ranks_one_to_n():
    records = llama_records(4, seed=1)
    ranking = rank_types(records)
    assert [t.position for t in ranking] == list(range(1, 8))
    means = [t.nfn_mean for t in ranking]
    assert means == sorted(means)
    for t in ranking:
        values = [m.nfn for m in records if m.type == t.type]
        assert t.nfn_mean == pytest.approx(np.mean(values))
        assert t.nfn_std == pytest.approx(np.std(values))
        assert (t.nfn_min, t.nfn_max) == (min(values), max(values))
        assert t.n_modules == 4
        assert t.lora_params_per_rank == sum(m.d_in + m.d_out for m in records if m.type == t.type)
    assert type_means(records) == {t.type: pytest.approx(t.nfn_mean) for t in ranking}


def test_rank_types_ties_broken_by_name():
    records = [record(f"layers.0.{t}", 1.0) for t in ("zeta", "alpha", "mu")]
    assert [t.type for t in rank_types(records)] == ["alpha", "mu", "zeta"]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_picks_the_k_lowest_types(k):
    records = llama_records(3, seed=2)
    rec, _ = Selector(records, Strategy("top_k", top_k=k), rank=8).recommend()
    lowest = [t.type for t in rank_types(records)[:k]]
    assert rec.types == lowest  # in ascending NFN order
    assert rec.target_modules == lowest
    assert set(rec.modules) == {m.name for m in records if m.type in lowest}
    assert len(rec.modules) == 3 * k


# -- budget -----------------------------------------------------------------------------------
def _greedy(records, rank, budget):
    """Independent greedy: walk types by ascending mean NFN, take each that still fits."""
    means = {t.type: t.nfn_mean for t in rank_types(records)}
    cost = {t: rank * sum(m.d_in + m.d_out for m in records if m.type == t) for t in means}
    chosen, spent = [], 0
    for t in sorted(means, key=means.get):
        if spent + cost[t] <= budget:
            chosen.append(t)
            spent += cost[t]
    return chosen, spent, cost


@pytest.mark.parametrize("seed", range(5))
def test_budget_never_exceeded_and_greedy_ascending(seed):
    rng = np.random.default_rng(seed)
    records = llama_records(3, seed=seed)
    rank = 8
    for budget in rng.integers(3 * rank * 96, 3 * rank * 1200, size=20):
        budget = int(budget)
        rec, _ = Selector(records, Strategy("budget", budget=budget), rank=rank).recommend()
        chosen, spent, cost = _greedy(records, rank, budget)
        assert set(rec.types) == set(chosen)
        assert rec.trainable_params == spent <= budget
        # greedy: every skipped type would have overflowed the budget when its turn came
        means = type_means(records)
        for t in set(cost) - set(rec.types):
            spent_before = sum(cost[c] for c in rec.types if means[c] < means[t])
            assert spent_before + cost[t] > budget
        # the types come back in ascending NFN
        assert [means[t] for t in rec.types] == sorted(means[t] for t in rec.types)


def test_budget_too_small_raises_and_zero_budget_rejected():
    records = llama_records(2)
    with pytest.raises(ValueError, match="no module type fits"):
        Selector(records, Strategy("budget", budget=10), rank=8).recommend()
    with pytest.raises(ValueError, match="positive parameter budget"):
        Selector(records, Strategy("budget", budget=0))
    with pytest.raises(ValueError, match="strategy"):
        Selector(records, Strategy("best"))


def test_budget_strategy_through_diagnose(tiny_llama):
    budget = 20_000
    report = diagnose(tiny_llama, make_batches(8, 16), strategy="budget", budget=budget, rank=8, n_bootstrap=20)
    rec = report.recommendation
    assert 0 < rec.trainable_params <= budget
    chosen, spent, _ = _greedy(report.modules, 8, budget)
    assert set(rec.types) == set(chosen) and rec.trainable_params == spent


# -- per-layer regex --------------------------------------------------------------------------
def test_per_layer_regex_full_matches_exactly_the_chosen_modules(tiny_llama):
    report = diagnose(tiny_llama, make_batches(8, 16), strategy="per_layer", top_k=3, n_bootstrap=20)
    rec = report.recommendation
    assert isinstance(rec.target_modules, str)
    assert len(rec.modules) == 3 * 2  # top_k per layer on average, 2 layers
    # the chosen modules are the lowest-NFN individual modules
    by_nfn = sorted(report.modules, key=lambda m: m.nfn)
    assert set(rec.modules) == {m.name for m in by_nfn[:6]}
    all_names = [name for name, _ in tiny_llama.named_modules()]
    matched = {name for name in all_names if re.fullmatch(rec.target_modules, name)}
    assert matched == set(rec.modules)
    assert rec.types == sorted({m.type for m in report.modules if m.name in rec.modules})
    assert all(t.selection_probability is None for t in report.types)


def test_modules_regex_with_multi_digit_layers_and_unlayered_names():
    universe = [f"model.layers.{i}.self_attn.{t}" for i in range(13) for t in ("q_proj", "v_proj")]
    universe += [f"model.layers.{i}.self_attn" for i in range(13)] + ["lm_head", "model.norm", "model.layers.100.x"]
    for chosen in (
        ["model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.3.self_attn.v_proj"],
        ["model.layers.12.self_attn.v_proj"],
        ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.q_proj"],
    ):
        pattern = modules_regex(chosen)
        assert {n for n in universe if re.fullmatch(pattern, n)} == set(chosen), pattern


def test_modules_regex_escapes_dots():
    pattern = modules_regex(["a.b"])
    assert re.fullmatch(pattern, "a.b") and not re.fullmatch(pattern, "aXb")


# -- named placements -------------------------------------------------------------------------
def test_placement_types_for_llama():
    records = llama_records(2)
    assert placement_types(records, "qv") == ["q_proj", "v_proj"]
    assert placement_types(records, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert placement_types(records, "mlp") == ["down_proj", "gate_proj", "up_proj"]
    assert placement_types(records, "all-linear") == sorted(t.rsplit(".", 1)[1] for t in LLAMA_TYPES)
    with pytest.raises(ValueError, match="unknown placement"):
        placement_types(records, "everything")


def test_placement_types_for_real_gpt2_and_bert_are_role_true(tiny_gpt2, tiny_bert):
    gpt2 = diagnose(tiny_gpt2, make_batches(4, 8), n_bootstrap=10)
    assert placement_types(gpt2.modules, "qv") == ["c_attn"]
    assert placement_types(gpt2.modules, "mlp") == ["c_fc", "mlp.c_proj"]
    bert = diagnose(tiny_bert, make_batches(4, 8), n_bootstrap=10)
    assert placement_types(bert.modules, "qv") == ["query", "value"]
    assert placement_types(bert.modules, "attention") == ["attention.output.dense", "key", "query", "value"]
    assert placement_types(bert.modules, "mlp") == ["intermediate.dense", "output.dense"]
    mlp = [m for m in bert.modules if m.type in ("intermediate.dense", "output.dense")]
    assert len(mlp) == 4 and bert.costs["mlp"]["trainable_params"] == 16 * sum(m.d_in + m.d_out for m in mlp)


def test_placement_costs_are_adapter_costs():
    records = llama_records(2)
    rec, _ = Selector(records, Strategy("top_k", top_k=2), rank=4).recommend()
    costs = placement_costs(records, 4, rec)
    assert costs["recommended"]["trainable_params"] == rec.trainable_params
    for placement in ("qv", "attention", "mlp", "all-linear"):
        types = costs[placement]["types"]
        expected = 4 * sum(m.d_in + m.d_out for m in records if m.type in types)
        assert costs[placement]["trainable_params"] == expected
        assert costs[placement]["size_mb"] == pytest.approx(expected * 4 / 1e6)


# -- adapter cost -----------------------------------------------------------------------------
def test_adapter_cost_is_rank_times_d_in_plus_d_out():
    records = llama_records(2)
    for rank in (1, 8, 64):
        params, size = adapter_cost(records, rank)
        assert params == sum(rank * (m.d_in + m.d_out) for m in records)
        assert size == pytest.approx(params * 4 / 1e6)  # float32 adapter weights
    assert adapter_cost([], 8) == (0, 0.0)


def test_adapter_cost_matches_peft_trainable_parameters(tiny_llama):
    from peft import LoraConfig, get_peft_model

    report = diagnose(tiny_llama, make_batches(8, 16), top_k=3, rank=4, n_bootstrap=10)
    rec = report.recommendation
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=rec.target_modules))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == rec.trainable_params
    modules = dict(peft_model.base_model.model.named_modules())
    assert rec.trainable_params == sum(
        4 * (modules[n].in_features + modules[n].out_features) for n in rec.modules
    )


# -- bootstrap stability ----------------------------------------------------------------------
def _toy_batches(n: int, seed: int = 3):
    return make_batches(n, lengths=list(np.random.default_rng(seed).integers(4, 24, size=n)), batch_size=8,
                        seed=seed)


def test_toy_model_has_the_designed_nfn_order(aligned_toy):
    report = diagnose(aligned_toy, _toy_batches(32), top_k=1, n_bootstrap=50)
    means = {t.type: t.nfn_mean for t in report.types}
    assert means["low"] < 0.2 < 0.8 < means["mid"] < 1.25 and 0.8 < means["mid2"] < 1.25
    assert means["high"] == pytest.approx(4.0, rel=0.15)  # sqrt(d / k)
    assert [t.type for t in report.types][0] == "low" and [t.type for t in report.types][-1] == "high"


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_bootstrap_stability_and_selection_probabilities(aligned_toy, top_k):
    report = diagnose(aligned_toy, _toy_batches(64), top_k=top_k, n_bootstrap=200)
    rec = report.recommendation
    probs = {t.type: t.selection_probability for t in report.types}
    assert all(p is not None and 0.0 <= p <= 1.0 for p in probs.values())
    # every replicate selects exactly top_k types
    assert sum(probs.values()) == pytest.approx(top_k)
    assert isinstance(rec.stable, bool) and 0.0 <= rec.agreement <= 1.0
    assert rec.stable == (rec.agreement >= STABLE_AGREEMENT)
    assert report.stability["agreement"] == rec.agreement and report.stability["stable"] == rec.stable
    chosen = [probs[t] for t in rec.types]
    others = [p for t, p in probs.items() if t not in rec.types]
    assert np.mean(chosen) >= np.mean(others)
    # the clearly separated types are decided with certainty
    assert probs["low"] == 1.0 and probs["high"] == 0.0
    if top_k != 2:  # {low} and {low, mid, mid2} are far from everything else
        assert rec.stable and rec.agreement == 1.0
        assert all(p == 1.0 for p in chosen)


def test_until_stable_stops_early_when_stable(aligned_toy):
    data = _toy_batches(160)
    full = diagnose(aligned_toy, data, samples=None, top_k=1, n_bootstrap=100)
    auto = diagnose(aligned_toy, data, samples=None, until_stable=True, top_k=1, n_bootstrap=100)
    assert full.data["samples"] == 160
    assert STABLE_MIN_ROWS <= auto.data["samples"] < 160
    assert auto.data["samples"] == STABLE_MIN_ROWS  # stable at the first check
    assert auto.recommendation.stable
    assert auto.recommendation.types == full.recommendation.types == ["low"]
    assert auto.settings["until_stable"] and auto.settings["samples"] is None


def test_the_api_reads_as_many_rows_as_the_command_line_unless_told(aligned_toy):
    from plop.cli import build_parser

    data = _toy_batches(160)
    assert diagnose(aligned_toy, data, top_k=1, n_bootstrap=10).data["samples"] == \
        build_parser().parse_args(["diagnose"]).samples == 100
    assert diagnose(aligned_toy, data, samples=None, top_k=1, n_bootstrap=10).data["samples"] == 160  # all


class TwoTopics(nn.Module):
    """A coin flip the bootstrap must notice. Tokens 3..252 embed in a k-dim subspace A, tokens
    253..502 in an orthogonal subspace B, with mirrored coefficients. Module type ``pa`` reads
    only A (``W = G V_A^T``), ``pb`` only B (``W = G V_B^T``, the same G), ``both`` reads A and B.
    On a mirrored data set (every sequence also appears shifted into B) ``pa`` and ``pb`` have
    the same NFN, so which of them is lower depends only on which sequences a resample draws."""

    def __init__(self, d: int = 32, k: int = 4, seed: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(d, 2 * k, generator=g))
        va, vb = basis[:, :k], basis[:, k:]
        coeffs = torch.randn(250, k, generator=g)
        self.embed = nn.Embedding(503, d)
        self.embed.weight.data.zero_()
        self.embed.weight.data[3:253] = coeffs @ va.T
        self.embed.weight.data[253:503] = coeffs @ vb.T
        gm = torch.randn(d, k, generator=g)
        block = nn.Module()
        for name, w in {"pa": gm @ va.T, "pb": gm @ vb.T, "both": torch.randn(d, 2 * k, generator=g) @ basis.T}.items():
            linear = nn.Linear(d, d, bias=False)
            linear.weight.data = w
            setattr(block, name, linear)
        self.layers = nn.ModuleList([block])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        block = self.layers[0]
        return block.pa(h) + block.pb(h) + block.both(h)


def _mirrored_batches(n_pairs: int, seed: int = 8):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n_pairs):
        s = torch.randint(3, 253, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g)
        seqs += [s, s + 250]
    return pad_batches(seqs, batch_size=8)


def test_bootstrap_flags_a_coin_flip_as_unstable():
    model = TwoTopics()
    data = _mirrored_batches(32)
    report = diagnose(model, data, top_k=1, n_bootstrap=200)
    means = {t.type: t.nfn_mean for t in report.types}
    assert means["pa"] == pytest.approx(means["pb"], rel=1e-5)  # tied by construction
    assert means["both"] > means["pa"] * 1.2
    probs = {t.type: t.selection_probability for t in report.types}
    assert 0.2 < probs["pa"] < 0.8 and 0.2 < probs["pb"] < 0.8
    assert probs["pa"] + probs["pb"] == pytest.approx(1.0) and probs["both"] == 0.0
    rec = report.recommendation
    assert rec.types in (["pa"], ["pb"])
    assert rec.agreement == pytest.approx(probs[rec.types[0]])
    assert rec.agreement < STABLE_AGREEMENT and rec.stable is False
    # never stable, so until_stable reads everything
    auto = diagnose(model, data, until_stable=True, top_k=1, n_bootstrap=200)
    assert auto.data["samples"] == 64 and auto.recommendation.stable is False
    capped = diagnose(model, data, samples=40, until_stable=True, top_k=1, n_bootstrap=200)
    assert capped.data["samples"] == 40  # samples is the most rows until_stable reads
    # top_k=2 takes both tied types (bar a very lopsided resample): stable again
    both = diagnose(model, data, top_k=2, n_bootstrap=200).recommendation
    assert set(both.types) == {"pa", "pb"} and both.stable


@pytest.mark.parametrize("samples", [1, 12, 16, 40])
def test_integer_samples_counts_rows_of_token_batches(aligned_toy, samples):
    data = make_batches(32, 10, batch_size=8)
    report = diagnose(aligned_toy, data, samples=samples, top_k=1, n_bootstrap=10)
    assert report.data["samples"] == min(samples, 32)
    assert report.data["token_count"] == 10 * min(samples, 32)
    # a one-shot iterator of batches is limited the same way
    assert diagnose(aligned_toy, iter(data), samples=samples, top_k=1, n_bootstrap=10).data["samples"] == min(
        samples, 32)


def test_samples_to_stable_is_the_first_checkpoint_after_which_the_set_stayed(tiny_llama):
    report = diagnose(tiny_llama, make_batches(48, 8, batch_size=8), top_k=3, n_bootstrap=20)
    checkpoints = report.stability["checkpoints"]
    assert [n for n, _ in checkpoints] == [8, 16, 24, 32, 40, 48]
    assert checkpoints[-1][1] == sorted(report.recommendation.types)
    stable_at = report.recommendation.samples_to_stable
    assert report.stability["samples_to_stable"] == stable_at
    seen = [n for n, _ in checkpoints]
    i = seen.index(stable_at)
    # from there on the selection is the final one; just before, it was not
    assert all(sel == checkpoints[-1][1] for _, sel in checkpoints[i:])
    assert i == 0 or checkpoints[i - 1][1] != checkpoints[-1][1]


@pytest.mark.parametrize(("history", "expected"), [
    ([(8, "ab"), (16, "ab")], 8),
    ([(8, "ab"), (16, "ac"), (24, "ab"), (32, "ab")], 24),
    ([(8, "ab"), (16, "ab"), (24, "ac")], 24),
    ([], None),
])
def test_samples_to_stable_on_known_histories(history, expected):
    from plop.diagnosis import _samples_to_stable

    assert _samples_to_stable([(n, frozenset(s)) for n, s in history]) == expected


def test_selector_is_reproducible_under_identical_inputs():
    records = llama_records(3, seed=4)
    nfn = np.array([m.nfn for m in records])
    replicates = nfn[:, None] * np.random.default_rng(0).lognormal(0, 0.05, size=(len(records), 50))
    a = Selector(records, Strategy("top_k", top_k=3)).recommend(replicates)
    b = Selector(records, Strategy("top_k", top_k=3)).recommend(replicates)
    assert a == b
    # NaN replicates (a resample that drew no tokens) are skipped, not counted as disagreement
    replicates[:, :10] = np.nan
    rec, probs = Selector(records, Strategy("top_k", top_k=3)).recommend(replicates)
    assert sum(probs.values()) == pytest.approx(3)
    assert 0.0 <= rec.agreement <= 1.0
