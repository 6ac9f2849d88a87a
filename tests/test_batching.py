"""Length-sorted batching under a token budget: less padding, the same diagnosis.

The reference is the same texts tokenized in sampled order in fixed-size, padded batches: the
diagnosis of those and of plop's sorted batches must agree module by module, and the bootstrap
(hence the stability decision) must be the very same, since it follows each row's place.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from plop import diagnose
from plop.measure.batching import default_batch_tokens, pack, pad_right, text_batches, windows
from plop.cli import main
from plop.measure.collector import BootstrapWeights
from plop.config import DiagnoseConfig
from plop.errors import ConfigError
from tiny_lm import make_model, make_tokenizer, save_tiny


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ij+=?0123") for _ in range(rng.choice([3, 5, 9, 20, 41, 60])))
            for _ in range(n)]


def test_windows_cover_the_rows_in_order_double_and_stop_growing():
    assert [(w.start, w.stop) for w in windows(100)] == [(0, 16), (16, 32), (32, 64), (64, 100)]
    assert [len(w) for w in windows(5)] == [5]
    assert [len(w) for w in windows(3000)] == [16, 16, 32, 64, 128, 256, 512, 1024, 952]
    assert [i for w in windows(300, first=7) for i in w] == list(range(300))


def _cost(batches, lengths, budget):
    return sum(len(b) * max(lengths[i] for i in b) + budget / 16 for b in batches)


def _brute_force_best(lengths, budget):
    """The cheapest cut of the sorted rows into runs, by trying every cut."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = math.inf
    for mask in range(2 ** (len(order) - 1)):
        cuts = [0] + [k + 1 for k in range(len(order) - 1) if mask >> k & 1] + [len(order)]
        runs = [order[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(r) == 1 or len(r) * lengths[r[0]] <= budget for r in runs):
            best = min(best, _cost(runs, lengths, budget))
    return best


@pytest.mark.parametrize("budget", [1, 40, 100, 1000])
def test_pack_keeps_every_row_once_within_the_budget(budget):
    lengths = [random.Random(budget).randint(0, 50) for _ in range(200)]
    batches = pack(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= budget or len(b) == 1  # a row over the budget goes alone
        assert lengths[b[0]] == longest  # longest first: memory peaks at the first batch
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_pack_finds_the_cheapest_cut(seed):
    rng = random.Random(seed)
    lengths, budget = [rng.randint(1, 60) for _ in range(11)], rng.choice([60, 120, 250, 600])
    assert _cost(pack(lengths, budget), lengths, budget) == pytest.approx(_brute_force_best(lengths, budget))


def test_short_rows_batch_wide_and_long_rows_narrow():
    batches = pack([100] * 8 + [10] * 40, budget=400)
    assert [len(b) for b in batches] == [4, 4, 40]


def test_padding_matches_the_tokenizers_own():
    tokenizer, texts = make_tokenizer(), _texts(7)
    encodings = tokenizer(texts, truncation=True, max_length=32)
    ours = pad_right({k: encodings[k] for k in encodings.keys()}, tokenizer.pad_token_id)
    theirs = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt", padding_side="right")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_batches_hold_each_sampled_row_once_with_its_place():
    texts = _texts(70)
    batches = list(text_batches(texts, make_tokenizer(), max_length=48, batch_tokens=200))
    assert sorted(int(r) for b in batches for r in b.rows) == list(range(70))
    closing = [sum(len(b) for b in batches[: i + 1]) for i, b in enumerate(batches) if b.closes_window]
    assert closing == [16, 32, 64, 70]  # windows close where the rows seen are a prefix of the sample
    tokenizer = make_tokenizer()
    for b in batches:
        for row, ids, mask in zip(b.rows, b.inputs["input_ids"], b.inputs["attention_mask"]):
            assert ids[mask.bool()].tolist() == tokenizer(texts[row], truncation=True, max_length=48)["input_ids"]
        assert b.inputs["input_ids"].numel() <= 200 or len(b) == 1


def test_sorting_computes_fewer_tokens_than_sampled_order():
    texts, tokenizer = _texts(64), make_tokenizer()
    fixed = [tokenizer(texts[i : i + 8], padding=True, return_tensors="pt") for i in range(0, 64, 8)]
    sorted_ = list(text_batches(texts, tokenizer, max_length=256, batch_tokens=8 * 61))
    real = sum(int(b["attention_mask"].sum()) for b in fixed)
    assert sum(int(b.inputs["attention_mask"].sum()) for b in sorted_) == real
    computed_fixed = sum(b["input_ids"].numel() for b in fixed)
    computed_sorted = sum(b.inputs["input_ids"].numel() for b in sorted_)
    assert computed_sorted < 0.7 * computed_fixed and computed_sorted < 1.4 * real


def test_bootstrap_weights_follow_the_row_not_the_request_order():
    weights = BootstrapWeights(50, seed=3)
    late_first = weights(np.array([9, 2, 5]))
    sequential = np.random.default_rng(3).poisson(1.0, size=(10, 50)).astype(np.float64)
    assert np.array_equal(late_first, sequential[[9, 2, 5]])
    assert np.array_equal(weights(np.arange(10)), sequential)


def test_sorted_batches_give_the_sampled_order_diagnosis():
    """Same rows, same bootstrap weights: NFN equal to float noise, the same decision."""
    model, tokenizer, texts = make_model(), make_tokenizer(), _texts(40, seed=1)
    config = DiagnoseConfig(max_length=48, n_bootstrap=50, batch_size=4, rank=4)
    plain = [tokenizer(texts[i : i + 4], padding=True, truncation=True, max_length=48, return_tensors="pt",
                       padding_side="right") for i in range(0, 40, 4)]
    reference = diagnose(model, plain, config=config)
    ours = diagnose(model, texts, tokenizer, config, batch_tokens=300)
    assert [m.name for m in ours.modules] == [m.name for m in reference.modules]
    for a, b in zip(reference.modules, ours.modules):
        assert b.nfn == pytest.approx(a.nfn, rel=1e-5) and b.token_count == a.token_count, a.name
    assert ours.recommendation.types == reference.recommendation.types
    assert ours.recommendation.agreement == pytest.approx(reference.recommendation.agreement, abs=0.02)
    assert (ours.data["samples"], ours.data["token_count"]) == (reference.data["samples"], reference.data["token_count"])
    assert ours.settings["batch_tokens"] == 300
    assert [n for n, _ in ours.stability["checkpoints"]] == [16, 32, 40]  # window ends only


def test_until_stable_stops_only_where_a_window_closes():
    model, tokenizer = make_model(), make_tokenizer()
    report = diagnose(model, _texts(200, seed=2), tokenizer, samples=None, until_stable=True, max_length=32,
                      n_bootstrap=50)
    assert report.data["samples"] in {16, 32, 64, 128, 200}
    assert all(n in {16, 32, 64, 128, 200} for n, _ in report.stability["checkpoints"])


def test_the_default_budget_is_todays_padded_batch_and_grows_with_free_gpu_memory():
    assert default_batch_tokens(8, 256) == 2048
    assert default_batch_tokens(8, 256, free_bytes=10**6, width=4096) == 2048  # never below the floor
    small = default_batch_tokens(8, 256, free_bytes=40 * 2**30, width=4096, element_bytes=2)
    large = default_batch_tokens(8, 256, free_bytes=80 * 2**30, width=4096, element_bytes=2)
    assert 2048 < small < large
    assert diagnose(make_model(), _texts(8), make_tokenizer(), max_length=32, n_bootstrap=5,
                    batch_size=3).settings["batch_tokens"] == 3 * 32


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_a_bad_budget_is_refused_before_any_work(value):
    with pytest.raises(ConfigError, match="batch_tokens"):
        DiagnoseConfig(batch_tokens=value)


def test_the_cli_takes_a_token_budget(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(24)))
    out = tmp_path / "report.json"
    assert main(["diagnose", str(model), "--data", str(data), "--batch-tokens", "120", "--max-length", "40",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["batch_tokens"] == 120
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", str(model), "--data", str(data), "--batch-tokens", "0"])
    assert exit_.value.code == 2
    assert "--batch-tokens" in capsys.readouterr().err
