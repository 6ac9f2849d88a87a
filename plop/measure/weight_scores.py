"""Data-free scores of a weight matrix, computed beside NFN for comparison: what placement would be
without looking at the task.

KappaTune (PEFT's ``peft.helpers.KappaTuneSelector``) prefers the best-conditioned matrices, lowest
``kappa = s_max / s_min``. Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to
Noise Ratio") prefers the highest signal-to-noise ratio under a Marchenko-Pastur noise model: with
singular values ``s``, a noise scale ``sigma = IQR(s) / 1.349`` (the IQR of a Gaussian is 1.349
sigma) and the bulk edge ``tau = sigma (1 + sqrt(beta))``, ``beta = min(d_out, d_in) / max(...)``::

    SNR = ( sum_{s > tau} s  /  sum_{s <= tau} s ) / s_max

Both come from one ``svdvals`` per matrix: O(d^3), seconds for a small model on a CPU, which is
why they are computed only when asked for (``DiagnoseConfig.weight_scores``).
"""

from __future__ import annotations

import math

import torch


def weight_scores(weight: torch.Tensor) -> tuple[float, float]:
    """``(kappa, snr)`` of a dense ``(d_out, d_in)`` weight."""
    s = torch.linalg.svdvals(weight.detach().float())
    kappa = (s[0] / s[-1]).item() if s[-1] > 0 else math.inf
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    beta = min(weight.shape) / max(weight.shape)
    signal = s > sigma * (1 + math.sqrt(beta))
    noise = s[~signal].sum() if (~signal).any() else s.new_tensor(1.0)  # no bulk: Spectrum's convention
    return kappa, (s[signal].sum() / noise / s[0]).item()
