"""The NFN math: closed-form and Monte-Carlo denominators, and NFN of modules with known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from plop import diagnose
from plop.measure.collector import NFNCollector
from plop.measure.nfn import monte_carlo_baseline, normalized_feature_norm, random_baseline


def _gaussian(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def _decaying_spectrum(d_out: int, d_in: int, decay: float, seed: int) -> torch.Tensor:
    """Random singular vectors, singular values ``exp(-decay * i)``: a low-rank-ish matrix."""
    g = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g))
    return u @ torch.diag(torch.exp(-decay * torch.arange(n, dtype=torch.float32))) @ v.T


def _participation_ratio(w: torch.Tensor) -> float:
    s2 = torch.linalg.svdvals(w.double()) ** 2
    return (s2.sum() ** 2 / (s2**2).sum()).item()


# -- closed form ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 64), (64, 64), (128, 32), (1, 7)])
def test_random_baseline_is_frobenius_over_sqrt_d_in(shape):
    w = _gaussian(*shape, seed=1)
    a = w.double().numpy()
    expected = math.sqrt(float((a**2).sum())) / math.sqrt(shape[1])
    assert random_baseline(w) == pytest.approx(expected, rel=1e-12)
    # the same number from the singular values: sqrt(sum s_i^2 / d_in)
    s = np.linalg.svd(a, compute_uv=False)
    assert random_baseline(w) == pytest.approx(math.sqrt((s**2).sum() / shape[1]), rel=1e-10)


def test_random_baseline_is_root_mean_square_response_to_unit_vectors():
    """sqrt(E ||W u||^2) over u uniform on the sphere, estimated by brute force."""
    w = _decaying_spectrum(40, 64, decay=0.1, seed=2)
    u = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u /= torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    rms = torch.linalg.vector_norm(u @ w.double().T, dim=-1).pow(2).mean().sqrt().item()
    assert random_baseline(w) == pytest.approx(rms, rel=5e-3)


def test_random_baseline_low_precision_weights_match_float32():
    w = _gaussian(64, 64, seed=4) * 300.0  # ||W||_F^2 ~ 3.7e8: overflows fp16 if squared in fp16
    for dtype in (torch.float16, torch.bfloat16):
        low = w.to(dtype)
        assert math.isfinite(random_baseline(low))
        assert random_baseline(low) == pytest.approx(random_baseline(low.float()), rel=1e-6)


def test_random_baseline_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        random_baseline(torch.ones(3, 4, 5))


def test_a_scaled_orthogonal_weight_responds_to_every_input_as_to_noise():
    """With all singular values equal to s, ||W z|| / ||z|| = s for any z and the baseline is s:
    NFN is exactly 1 whatever the task, the 'no alignment' reference the paper's reading rests on."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    weight, inputs = 3.0 * q, torch.randn(200, 64, dtype=torch.float64)
    ratio = (torch.linalg.vector_norm(inputs @ weight.T, dim=1) / torch.linalg.vector_norm(inputs, dim=1)).mean()
    assert normalized_feature_norm(float(ratio), random_baseline(weight)) == pytest.approx(1.0, abs=1e-12)
    # and per MoE expert, as arrays: an expert with no routed token has no NFN (NaN), not 0
    with np.errstate(invalid="ignore"):
        per_expert = normalized_feature_norm(np.array([3.0, 0.0]) / np.array([1.0, 0.0]), np.array([3.0, 3.0]))
    assert per_expert[0] == 1.0 and np.isnan(per_expert[1])


# -- Monte-Carlo vs closed form ---------------------------------------------------------------
@pytest.mark.parametrize(
    "matrix",
    [
        pytest.param(lambda: _gaussian(48, 64, seed=5), id="gaussian"),
        pytest.param(lambda: _decaying_spectrum(48, 64, decay=0.05, seed=6), id="low-rank-ish"),
    ],
)
def test_monte_carlo_agrees_with_closed_form(matrix):
    w = matrix()
    closed = random_baseline(w)
    mc = monte_carlo_baseline(w, samples=100_000, seed=11)
    assert mc == pytest.approx(closed, rel=0.02)
    # Jensen: E||Wu|| <= sqrt(E||Wu||^2); 100k samples put the noise far below 0.2 %
    assert mc <= closed * 1.002


def test_monte_carlo_jensen_gap_matches_effective_rank():
    """For a strongly low-rank matrix the gap is visible and close to the second-order
    prediction (d_in / r - 1) / (4 (d_in + 2)) from the participation ratio r."""
    w = _decaying_spectrum(48, 64, decay=0.3, seed=8)
    r = _participation_ratio(w)
    assert r < 6  # strongly low-rank: a gap of several percent
    gap = 1 - monte_carlo_baseline(w, samples=200_000, seed=12) / random_baseline(w)
    predicted = (64 / r - 1) / (4 * (64 + 2))
    assert gap > 0.02
    assert gap == pytest.approx(predicted, rel=0.3)


def test_monte_carlo_is_seeded():
    w = _gaussian(32, 64, seed=9)
    assert monte_carlo_baseline(w, samples=512, seed=3) == monte_carlo_baseline(w, samples=512, seed=3)
    assert monte_carlo_baseline(w, samples=512, seed=3) != monte_carlo_baseline(w, samples=512, seed=4)


def test_diagnose_closed_form_and_monte_carlo_agree_per_module(tiny_llama, batches):
    data = batches(32, 64, batch_size=8)
    closed = diagnose(tiny_llama, data, estimator="closed_form", n_bootstrap=20)
    mc = diagnose(tiny_llama, data, estimator="monte_carlo", n_bootstrap=20)
    assert [m.name for m in closed.modules] == [m.name for m in mc.modules]
    assert len(closed.modules) == 14
    for a, b in zip(closed.modules, mc.modules):
        assert a.token_count == b.token_count == 32 * 64
        assert b.nfn == pytest.approx(a.nfn, rel=0.02), a.name
        # same numerator: the NFN ratio is exactly the inverse denominator ratio
        assert a.nfn * a.baseline == pytest.approx(b.nfn * b.baseline, rel=1e-9)
    assert mc.settings["estimator"] == "monte_carlo"


# -- NFN of a single Linear with known geometry -----------------------------------------------
def _collect(linear: nn.Linear, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
    mask = torch.ones(x.shape[:2], dtype=torch.long) if mask is None else mask
    with NFNCollector({"proj": linear}, **kwargs) as collector:
        collector.start_batch(mask)
        with torch.no_grad():
            linear(x)
    return collector.stats["proj"]


def _independent_nfn(w: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
    w, x = w.double(), x.double()
    ratio = torch.linalg.vector_norm(x @ w.T, dim=-1) / torch.linalg.vector_norm(x, dim=-1)
    baseline = torch.linalg.matrix_norm(w).item() / math.sqrt(w.shape[1])
    return ratio[mask.bool()].mean().item() / baseline


def test_gaussian_linear_on_gaussian_inputs_scores_one():
    torch.manual_seed(21)
    linear = nn.Linear(64, 96)
    nn.init.normal_(linear.weight)
    nn.init.normal_(linear.bias, std=3.0)  # a large bias: NFN must not see it
    x = torch.randn(16, 64, 64)
    stats = _collect(linear, x)
    assert stats.count == 16 * 64
    assert stats.nfn == pytest.approx(1.0, rel=0.05)
    assert stats.nfn == pytest.approx(_independent_nfn(linear.weight.detach(), x, torch.ones(16, 64)), rel=1e-5)


def test_masked_tokens_are_excluded_from_the_mean():
    torch.manual_seed(22)
    linear = nn.Linear(32, 32)
    x = torch.randn(4, 10, 32)
    x[:, 6:] *= torch.linspace(0.1, 50, 32)  # padding positions live in a very different direction
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 6:] = 0
    stats = _collect(linear, x, mask)
    assert stats.count == 4 * 6
    assert stats.nfn == pytest.approx(_independent_nfn(linear.weight.detach(), x, mask), rel=1e-5)
    assert stats.nfn != pytest.approx(_independent_nfn(linear.weight.detach(), x, torch.ones(4, 10)), rel=1e-3)


def test_weight_aligned_with_inputs_scores_high_and_orthogonal_scores_low():
    d, k = 64, 2
    g = torch.Generator().manual_seed(23)
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    span, rest = v[:, :k], v[:, k:]
    u = torch.randn(48, k, generator=g)
    x = torch.randn(8, 32, k, generator=g) @ span.T  # inputs in span(V)
    x = x + 0.01 * torch.randn(8, 32, d, generator=g)

    aligned = nn.Linear(d, 48, bias=False)
    aligned.weight.data = u @ span.T  # W = U V^T: the inputs lie in its row space
    nfn_aligned = _collect(aligned, x).nfn
    assert nfn_aligned > 3
    assert nfn_aligned == pytest.approx(math.sqrt(d / k), rel=0.1)  # ||W z||/||z|| = ||W||_F/sqrt(k)

    blind = nn.Linear(d, 48, bias=False)
    blind.weight.data = torch.randn(48, d - k, generator=g) @ rest.T  # W V = 0: it ignores the inputs
    assert _collect(blind, x).nfn < 0.1


def test_top_singular_directions_score_above_one():
    """Inputs drawn from the span of W's top-k right-singular vectors: every ratio ||W z||/||z||
    lies between s_k and s_1, so NFN lies between s_k and s_1 over the baseline, well above 1
    for a decaying spectrum."""
    w = _decaying_spectrum(64, 64, decay=0.15, seed=24)
    _, s, vh = torch.linalg.svd(w)
    k = 2
    x = torch.randn(8, 32, k, generator=torch.Generator().manual_seed(25)) @ vh[:k]
    linear = nn.Linear(64, 64, bias=False)
    linear.weight.data = w
    nfn = _collect(linear, x).nfn
    bound_hi = s[0].item() / random_baseline(w)
    bound_lo = s[k - 1].item() / random_baseline(w)
    assert 3 < bound_lo <= nfn <= bound_hi


def test_monte_carlo_estimator_on_a_single_linear():
    torch.manual_seed(26)
    linear = nn.Linear(64, 64, bias=False)
    x = torch.randn(16, 64, 64)
    closed = _collect(linear, x)
    mc = _collect(linear, x, estimator="monte_carlo", seed=5)
    assert mc.ratio_mean == pytest.approx(closed.ratio_mean, rel=1e-9)
    assert mc.denominator == pytest.approx(monte_carlo_baseline(linear.weight, samples=50_000), rel=0.01)
    assert mc.nfn == pytest.approx(closed.nfn, rel=0.02)


def test_gaussian_model_through_diagnose_scores_one(batches):
    """A plain nn.Module (embedding + Linear) that diagnose drives with input_ids."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(27)
            self.embed = nn.Embedding(500, 64)  # N(0, 1) rows: isotropic inputs
            self.proj = nn.Linear(64, 64)
            nn.init.normal_(self.proj.weight)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.embed(input_ids))

    report = diagnose(Tiny(), batches(16, 32), n_bootstrap=10, top_k=1)
    (record,) = report.modules
    assert record.name == "proj" and record.type == "proj" and record.layer is None
    assert record.nfn == pytest.approx(1.0, rel=0.05)


@pytest.mark.slow
def test_smollm2_matches_independent_computation(smollm2, reference):
    """The real SmolLM2-135M on 8 short texts: every module's NFN equals the from-scratch value,
    and the diagnosis has the shape of a 30-layer LLaMA."""
    from conftest import SHORT_TEXTS

    model, tokenizer = smollm2
    report = diagnose(model, SHORT_TEXTS, tokenizer, max_length=32, batch_size=8, n_bootstrap=50)
    types = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    n_layers = model.config.num_hidden_layers
    assert {m.type for m in report.modules} == types
    assert len(report.modules) == 7 * n_layers
    assert {m.layer for m in report.modules} == set(range(n_layers))
    assert len(report.recommendation.types) == 3
    assert report.recommendation.types == [t.type for t in report.types[:3]]

    enc = tokenizer(SHORT_TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt",
                    padding_side="right")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert report.data["token_count"] == int(batch["attention_mask"].sum())
    expected = reference(model, lambda b: model.model(**b), [batch], [m.name for m in report.modules])
    for m in report.modules:
        assert math.isfinite(m.nfn) and m.nfn > 0
        assert m.nfn == pytest.approx(expected[m.name]["nfn"], rel=1e-4), m.name
