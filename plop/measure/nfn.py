"""The math of the normalized feature norm (NFN), in one place.

PLoP (Hayou, Ghosh, Yu, "PLoP: Precise LoRA Placement for Efficient Finetuning of Large
Models", arXiv 2506.20629) scores a linear module with weight ``W`` (``d_out x d_in``) on the
task's input tokens ``z_t`` by::

    NFN(W) = mean_t ||W z_t|| / ||z_t||   /   E_u ||W u||,    u ~ Uniform(unit sphere in R^d_in)

The numerator is how strongly the pretrained weights respond to the task's inputs, the
denominator how strongly they respond to a random direction. ``NFN ~ 1``: the weights are no
more aligned with the task than with noise, so an adapter there has the most to add.

Denominator, closed form
    For ``u`` uniform on the sphere, ``E[u u^T] = I / d_in``, hence::

        E ||W u||^2 = tr(W E[u u^T] W^T) = ||W||_F^2 / d_in

    plop uses ``sqrt(E ||W u||^2) = ||W||_F / sqrt(d_in)``: exact, computed once per module,
    no random numbers and no extra matmul.

The Jensen gap
    ``E ||W u|| <= sqrt(E ||W u||^2)`` (Jensen), so the closed form is a hair larger than the
    Monte-Carlo denominator. With singular values ``s_i``, ``S = sum s_i^2`` and the
    participation ratio ``r = S^2 / sum s_i^4`` (an effective rank, ``1 <= r <= d_in``), the
    fourth moments of the uniform sphere give::

        Var ||W u||^2 / (E ||W u||^2)^2 = 2 (d_in / r - 1) / (d_in + 2)

    and a second-order expansion of the square root gives the relative gap::

        1 - E||W u|| / sqrt(E||W u||^2)  ~=  (d_in / r - 1) / (4 (d_in + 2))  ~=  1 / (4 r)

    For a Gaussian 576 x 576 matrix (``r ~ d/2``) that is about 0.1 %; for pretrained
    projections with effective rank in the tens it stays around 1 %. The ranking of module
    types, which is what placement uses, moves by far less than the spread across layers.
    :func:`monte_carlo_baseline` keeps the authors' estimator for validation.

The numerator needs no extra work: ``W z_t`` is the module's own output minus its bias, read
from a forward hook (see :mod:`plop.measure.collector`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch


def random_baseline(weight: torch.Tensor) -> float:
    """``sqrt(E_u ||W u||^2) = ||W||_F / sqrt(d_in)`` for a dense ``(d_out, d_in)`` weight."""
    return random_baselines([weight])[0]


def baseline_of_norm(frobenius_norm, d_in: int):
    """``||W||_F / sqrt(d_in)`` from a Frobenius norm already taken (a number, or one per expert):
    what a sharded weight's processes add up to before any of them holds it whole."""
    return frobenius_norm / math.sqrt(d_in)


def random_baselines(weights: Sequence[torch.Tensor]) -> list[float]:
    """:func:`random_baseline` for many weights, with one device-to-host copy per device.

    The squares are summed in float64 (fp16/bf16 weights are upcast inside the reduction), so
    the norm does not lose digits to the weight's own precision.
    """
    for w in weights:
        if w.ndim != 2:
            raise ValueError(f"expected a 2-D (d_out, d_in) weight, got shape {tuple(w.shape)}")
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        by_device[w.device].append(i)
    out = [0.0] * len(weights)
    for indices in by_device.values():
        norms = torch.stack([torch.linalg.vector_norm(weights[i].detach(), dtype=torch.float64) for i in indices])
        for i, norm in zip(indices, norms.cpu().tolist()):
            out[i] = baseline_of_norm(norm, weights[i].shape[1])
    return out


def random_unit_vectors(n: int, d: int, *, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """``n`` vectors uniform on the unit sphere of ``R^d`` (normalised Gaussians)."""
    u = torch.randn(n, d, generator=generator, device=device, dtype=torch.float32)
    return (u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)).to(dtype)


def monte_carlo_baseline(weight: torch.Tensor, samples: int = 4096, seed: int = 0) -> float:
    """Monte-Carlo estimate of ``E_u ||W u||`` (the authors' estimator), seeded.

    Its standard error shrinks as ``1 / sqrt(samples)``; it converges to ``E||Wu||``, which
    sits below :func:`random_baseline` by the Jensen gap described in the module docstring.
    """
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    u = random_unit_vectors(samples, weight.shape[1], generator=generator, device=weight.device, dtype=torch.float32)
    return torch.linalg.vector_norm(u @ weight.detach().float().T, dim=-1).double().mean().item()


def normalized_feature_norm(ratio_mean, baseline):
    """``NFN = mean_t ||W z_t|| / ||z_t||  /  baseline``, for numbers or arrays (one per MoE expert)."""
    return ratio_mean / baseline
