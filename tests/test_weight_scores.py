"""Data-free scores beside NFN: KappaTune's condition number and Spectrum's SNR, on matrices whose
values are known, and in a real diagnosis."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import AlignedToy, make_batches
from plop import Report, diagnose
from plop.measure.weight_scores import weight_scores


def test_condition_number_of_a_known_spectrum():
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    s = torch.linspace(10.0, 0.5, 32)
    kappa, _ = weight_scores(u[:, :32] @ torch.diag(s) @ v.T)
    assert kappa == pytest.approx(20.0, rel=1e-4)
    assert weight_scores(torch.zeros(8, 8).fill_diagonal_(1.0).index_fill(0, torch.tensor([0]), 0.0))[0] == math.inf


def test_spectrum_snr_follows_its_definition():
    """Spectrum's score, from numpy in float64: the Marchenko-Pastur bulk edge from the IQR of the
    singular values, signal over noise mass, divided by the largest singular value (so it scales as
    1/|W|, as Spectrum's own does)."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) / 16 + 3 * torch.randn(96, 2, generator=g) @ torch.randn(2, 256, generator=g) / 16
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    tau = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349 * (1 + math.sqrt(96 / 256))
    expected = s[s > tau].sum() / s[s <= tau].sum() / s[0]
    assert weight_scores(w)[1] == pytest.approx(expected, rel=1e-4)
    assert weight_scores(2 * w)[1] == pytest.approx(expected / 2, rel=1e-4)


def test_diagnosis_records_scores_and_what_they_would_pick(tmp_path):
    report = diagnose(AlignedToy(), make_batches(8, 8), top_k=2, n_bootstrap=10, weight_scores=True)
    assert all(m.kappa is not None and m.kappa >= 1 and m.snr >= 0 for m in report.modules)
    picks = report.data_free
    assert picks["nfn"] == report.recommendation.types == sorted(picks["nfn"], key=["low", "mid", "mid2", "high"].index)
    # "high" reads a 4-dimensional subspace: rank 4, the worst-conditioned type, never KappaTune's pick
    assert "high" not in picks["kappatune"] and len(picks["spectrum"]) == 2
    assert Report.load(report.save(tmp_path / "r.json")).data_free == picks
    assert diagnose(AlignedToy(), make_batches(8, 8), n_bootstrap=10).data_free is None
