"""Sparsifiers for task vectors: which entries of one delta to keep, and how likely each was.

Each returns a `Kept(values, prob)`: the delta with the dropped entries set to 0, and the keep
probability (a number, or a per-entry tensor for DELLA) that the "inverse_density" rescale
divides by. Random masks are seeded from (recipe seed, model id, tensor name), never from a
global generator, so a merge is bit-identical whatever the order, threads or device.
Inputs are never modified; `values` is always a new tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import core


@dataclass(frozen=True)
class Kept:
    values: Tensor  # the delta with dropped entries zeroed (a new tensor)
    prob: float | Tensor  # keep probability: a number or a per-entry float tensor


def magnitude(delta: Tensor, density: float) -> Kept:
    """TIES: keep the top int(density * numel) entries by |delta| over the whole tensor."""
    return Kept(core.magnitude_prune(delta, density), density)


def bernoulli(delta: Tensor, density: float, seed: int, model_id: str, name: str) -> Kept:
    """DARE: keep each entry independently with probability density."""
    mask = core.bernoulli_mask(delta.shape, density, seed, model_id, name, device=delta.device)
    return Kept(delta * mask, density)


def breadcrumbs(delta: Tensor, density: float, gamma: float) -> Kept:
    """Model Breadcrumbs: drop the top `gamma` fraction by |delta| (outliers), then keep the
    next int(density * numel) entries, i.e. drop the bottom 1 - density - gamma.

    Counts are n_keep = int(density * n) and n_top = int(gamma * n); when n_top + n_keep > n the
    top cut shrinks to n - n_keep so that density is always met. gamma = 0 (or a tensor too small
    for one outlier) is plain magnitude pruning, never an all-zero tensor.
    """
    n = delta.numel()
    n_keep = min(int(density * n), n)
    n_top = min(int(gamma * n), n - n_keep)
    # keep the top (n_top + n_keep) by magnitude, then remove the top n_top outliers from them
    kept = core.zero_below(delta, core.magnitude_threshold(delta, n_top + n_keep))
    if n_top > 0:
        kept -= core.zero_below(kept, core.magnitude_threshold(delta, n_top))  # x - x = 0 exactly
    return Kept(kept, density)


def della_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA (MAGPRUNE) keep probabilities: within each row (last dimension), entries ranked by
    |delta| get probabilities spread linearly from density - epsilon (smallest) to
    density + epsilon (largest). A 1-entry row gets density. Ties rank by position.
    Returns float32 of delta's shape.
    """
    rows = delta.reshape(1, 1) if delta.dim() == 0 else delta.reshape(-1, delta.shape[-1])
    r, d = rows.shape
    order = torch.sort(rows.abs(), dim=-1, stable=True).indices  # [R, D] ascending |delta|
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(d, device=delta.device).expand(r, d))
    frac = ranks.float() / (d - 1) if d > 1 else torch.full_like(rows, 0.5)  # [R, D] in [0, 1]
    probs = (density - epsilon) + 2.0 * epsilon * frac
    return probs.clamp(0.0, 1.0).reshape(delta.shape)


def della(
    delta: Tensor, density: float, epsilon: float, seed: int, model_id: str, name: str
) -> Kept:
    """DELLA: keep each entry with its own magnitude-rank probability (see della_keep_prob)."""
    if density >= 1.0:
        return Kept(delta.clone(), 1.0)
    probs = della_keep_prob(delta, density, epsilon)
    return Kept(delta * core.bernoulli_mask_like(probs, seed, model_id, name), probs)


def rescale(delta: Tensor, kept: Kept, mode: str) -> Tensor:
    """The kept values, rescaled to make up for what was dropped (a new tensor).

    "l1": match the L1 norm of the unpruned delta (mergekit). "inverse_density": divide every
    kept entry by its keep probability (DARE paper, PEFT, DELLA paper): unbiased in expectation.
    """
    if mode == "l1":
        return core.l1_rescale(delta, kept.values)
    if mode == "inverse_density":
        if isinstance(kept.prob, Tensor):
            # dropped entries are 0 and may have prob 0: 0 / tiny stays 0
            return kept.values / kept.prob.clamp_min(1e-30)
        return kept.values / kept.prob if kept.prob > 0 else kept.values.clone()
    raise ValueError(f"unknown rescale mode {mode!r}")
