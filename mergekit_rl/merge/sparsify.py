"""Sparsifiers for task vectors: which entries of one delta to keep, and how likely each was.

Each returns a `Kept(values, prob)`: the delta with the dropped entries set to 0, and the keep
probability (a number, or a per-entry tensor for DELLA) that the "inverse_density" rescale
divides by. Random masks are counter-based hashes of (recipe seed, model id, tensor name,
element index) (`rng.hash_keep_mask`), never a generator's stream, so a merge is bit-identical
whatever the order, threads, device or row blocking.
Inputs are never modified; `values` is always a new tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import blend, native, rng, selection


@dataclass(frozen=True)
class Kept:
    values: Tensor  # the delta with dropped entries zeroed (a new tensor)
    prob: float | Tensor  # keep probability: a number or a per-entry float tensor
    # the stable sums of |delta| and |values| (0-dim float64), when the sparsifier made them
    # on the way (`bernoulli_delta`): the L1 rescale's norms, without another pass
    abs_sums: tuple[Tensor, Tensor] | None = None


def magnitude_k(density: float, numel: int, min_keep: int = 1) -> int:
    """How many entries TIES keeps: int(density * numel), and at least `min_keep` when
    density > 0. mergekit keeps at least one (min_keep 1, the default), so a small tensor
    (a norm at density 0.1) keeps its largest change; min_keep 0 is the plain floor (the recipe
    key `topk_count: floor`), which zeroes such a tensor's task vector."""
    k = int(density * numel)
    return min(max(k, min_keep), numel) if density > 0 else 0


def magnitude(
    delta: Tensor, density: float, cut: selection.MagnitudeCut | None = None, min_keep: int = 1
) -> Kept:
    """TIES: keep exactly the top `magnitude_k` entries by |delta| over the whole tensor
    (ties with the k-th magnitude in index order). `cut`: the tensor's cut when delta is one
    row block of it (computed over the whole tensor by a streaming pass; consumed in order)."""
    if cut is None:
        k = magnitude_k(density, delta.numel(), min_keep)
        cut = selection.magnitude_cut(delta, delta.numel(), k)
    return Kept(selection.apply_cut_(delta, cut), density)


def magnitude_cuts(
    tensors: list[Tensor], base: Tensor, densities: list[float], min_keep: int = 1
) -> list[selection.MagnitudeCut]:
    """The cut `magnitude` makes of each whole task vector x_i - base (float32 tensors of one
    shape), found without delta tensors where that costs less: a small tensor is selected as
    `magnitude` selects it (kthvalue on its delta), a larger one by
    `selection.delta_magnitude_cuts` (on the host a C loop over x_i and base, one pass where
    its sampled guess holds). Same cuts."""
    numel = base.numel()
    ks = [magnitude_k(d, numel, min_keep) for d in densities]
    if numel < selection.SMALL_SELECT:
        return [
            selection.magnitude_cut(x - base, numel, k) for x, k in zip(tensors, ks, strict=True)
        ]
    return selection.delta_magnitude_cuts(lambda: [[base, *tensors]], numel, ks)


def mask_key(seed: int, model_id: str, name: str) -> int:
    """The counter-based hash key of one model's tensor: masks are a pure function of
    (recipe seed, model id, tensor name, element index)."""
    return rng.tensor_seed(seed, model_id, name)


def bernoulli(
    delta: Tensor, density: float, seed: int, model_id: str, name: str, offset: int = 0
) -> Kept:
    """DARE: keep each entry independently with probability density. `offset`: flat index of
    delta's first entry in its tensor (row blocks get the entries' own bits)."""
    key = mask_key(seed, model_id, name)
    return Kept(rng.hash_keep(delta, density, key, offset=offset), density)


def bernoulli_delta(
    x: Tensor,
    base: Tensor,
    density: float,
    seed: int,
    model_id: str,
    name: str,
    offset: int = 0,
    l1: bool = False,
) -> Kept:
    """`bernoulli(x - base, ...)` with the delta made and dropped chunk by chunk in cache, so
    no delta tensor is held: one new tensor (the kept values) instead of two. `l1`: also the
    stable sums of |delta| and |kept| (`Kept.abs_sums`, for the L1 rescale). The same bits as
    the two steps apart (the same subtraction, hash and products; StableSum's order does not
    depend on the chunks)."""
    out = torch.empty(x.shape, dtype=torch.result_type(x, base), device=x.device)
    sums = (blend.StableSum(), blend.StableSum()) if l1 else None
    _bernoulli_chunks(x, base, density, mask_key(seed, model_id, name), offset, out, sums)
    totals = None if sums is None else (sums[0].total(), sums[1].total())
    return Kept(out, density, totals)


def bernoulli_abs_sums(
    x: Tensor,
    base: Tensor,
    density: float,
    seed: int,
    model_id: str,
    name: str,
    offset: int,
    sums: tuple[blend.StableSum, blend.StableSum],
) -> None:
    """Add |delta| and |kept| of `bernoulli_delta` to sums, holding neither (the L1 pass over
    the row blocks of a large tensor: only the norms are needed there)."""
    _bernoulli_chunks(x, base, density, mask_key(seed, model_id, name), offset, None, sums)


def _bernoulli_chunks(
    x: Tensor,
    base: Tensor,
    density: float,
    key: int,
    offset: int,
    out: Tensor | None,
    sums: tuple[blend.StableSum, blend.StableSum] | None,
) -> None:
    """DARE on x - base, FUSED_CHUNK entries at a time (flat): the kept values written into out
    (x's shape) when given, else into a reused buffer; with sums, |delta| and |kept| of each
    chunk (two more reused buffers) added to them."""
    fx, fb = x.reshape(-1), base.reshape(-1)
    n = fx.numel()
    size = min(n, FUSED_CHUNK)
    scratch = torch.empty(
        size * (3 if sums else 1), dtype=torch.result_type(x, base), device=x.device
    )
    flat_out = out.view(-1) if out is not None else scratch[:size]
    for start in range(0, n, FUSED_CHUNK):
        stop = min(n, start + FUSED_CHUNK)
        m = stop - start
        dest = flat_out[start:stop] if out is not None else flat_out[:m]
        abs_out = (scratch[size : size + m], scratch[2 * size : 2 * size + m]) if sums else None
        part = (fx[start:stop], fb[start:stop])
        rng.hash_keep_diff(*part, density, key, offset=offset + start, out=dest, abs_out=abs_out)
        if sums is not None and abs_out is not None:
            sums[0].add(abs_out[0])
            sums[1].add(abs_out[1])


# entries per chunk of `bernoulli_delta`: the StableSum's abs buffer size (1 MiB of float32),
# small enough that the delta's chunk, its abs and its kept values stay in cache
FUSED_CHUNK = blend.ABS_CHUNK


def breadcrumbs_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(n_keep, n_top) of Model Breadcrumbs on n entries: keep int(density * n) entries below
    the int(gamma * n) largest ones; the top cut shrinks to n - n_keep when both do not fit,
    so that density is always met."""
    n_keep = min(int(density * n), n)
    return n_keep, min(int(gamma * n), n - n_keep)


def breadcrumbs(
    delta: Tensor,
    density: float,
    gamma: float,
    cuts: tuple[selection.MagnitudeCut, selection.MagnitudeCut | None] | None = None,
) -> Kept:
    """Model Breadcrumbs: drop the top `gamma` fraction by |delta| (outliers), then keep the
    next int(density * numel) entries, i.e. drop the bottom 1 - density - gamma
    (`breadcrumbs_counts`).

    gamma = 0 (or a tensor too small for one outlier) is plain magnitude pruning, never an
    all-zero tensor. Both cuts rank by |delta| with ties in index order, so exactly n_keep
    entries are kept. `cuts`: the whole tensor's (top n_top + n_keep, top n_top) cuts when
    delta is one row block of it (from a first pass over the blocks; consumed in order).
    """
    if cuts is None:
        n = delta.numel()
        n_keep, n_top = breadcrumbs_counts(density, gamma, n)
        top = selection.magnitude_cut(delta, n, n_top) if n_top > 0 else None
        cuts = (selection.magnitude_cut(delta, n, n_top + n_keep), top)
    # keep the top (n_top + n_keep) by magnitude, then remove the top n_top outliers from them:
    # one total order (|delta| descending, index ascending), so the top n_top are among them
    kept = selection.apply_cut_(delta, cuts[0])
    if cuts[1] is not None:
        kept -= selection.apply_cut_(delta, cuts[1])  # x - x = 0 exactly
    return Kept(kept, density)


class Unset:
    """The type of UNSET: an argument not given (None is a value there)."""


UNSET = Unset()

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def della_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA (MAGPRUNE) keep probabilities: within each row (last dimension), entries ranked by
    |delta| get probabilities spread linearly from density - epsilon (smallest) to
    density + epsilon (largest). A 1-entry row gets density. Ties rank by position.
    Returns float32 of delta's shape.
    """
    rows = delta.reshape(1, 1) if delta.dim() == 0 else delta.reshape(-1, delta.shape[-1])
    r, d = rows.shape
    mag = rows.abs()
    # non-negative floats order like their bit patterns as integers, ties included, so a stable
    # integer sort gives the same permutation (1.5x faster on the CPU, float32)
    as_int = _SAME_WIDTH_INT.get(mag.dtype)
    keys = mag if as_int is None else mag.view(as_int)
    if keys.dtype == torch.int32 and native.usable(keys):
        # a radix sort per row (della_keep_prob of 5632 x 2048: 0.54 s against 1.21 s with
        # the sort, one run on the loaded 2-core VM)
        ranks = native.rank_rows(keys.contiguous())
    else:
        order = torch.sort(keys, dim=-1, stable=True).indices  # [R, D] ascending |delta|
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(d, device=delta.device).expand(r, d))
    frac = ranks.float() / (d - 1) if d > 1 else torch.full_like(rows, 0.5)  # [R, D] in [0, 1]
    probs = (density - epsilon) + 2.0 * epsilon * frac
    return probs.clamp(0.0, 1.0).reshape(delta.shape)


def della(
    delta: Tensor,
    density: float,
    epsilon: float,
    seed: int,
    model_id: str,
    name: str,
    offset: int = 0,
) -> Kept:
    """DELLA: keep each entry with its own magnitude-rank probability (see della_keep_prob),
    against counter-based uniforms (`rng.hash_uniform`, keyed like DARE's masks). `offset`:
    flat index of delta's first entry (delta a block of whole rows)."""
    if density >= 1.0:
        return Kept(delta.clone(), 1.0)
    probs = della_keep_prob(delta, density, epsilon)
    key = mask_key(seed, model_id, name)
    u = rng.hash_uniform(delta.numel(), key, offset=offset, device=delta.device)
    # keep as 1.0 / 0.0 written over u (the products of delta * (u < probs), without a bool
    # tensor and its slower mixed-type multiply)
    keep = torch.lt(u.view(delta.shape), probs, out=u.view(delta.shape))
    return Kept(delta * keep, probs)


def rescale(
    delta: Tensor | None, kept: Kept, mode: str, l1: float | None | Unset = UNSET
) -> Tensor:
    """The kept values, rescaled to make up for what was dropped (a new tensor, or
    kept.values itself rescaled in place: `Kept.values` is always the caller's own).

    "l1": match the L1 norm of the unpruned delta (mergekit); `l1`: the whole tensor's factor
    (`blend.l1_factor`) when delta is one row block of it. "inverse_density": divide every kept
    entry by its keep probability (DARE paper, PEFT, DELLA paper): unbiased in expectation.
    """
    if mode == "l1":  # in place: the same products as kept.values * factor, no fresh tensor
        if not isinstance(l1, Unset):
            return blend.scale_by_(kept.values, l1)
        if kept.abs_sums is not None:  # summed as the values were made
            return blend.scale_by_(kept.values, blend.l1_factor(*kept.abs_sums))
        if delta is None:
            raise ValueError("an L1 rescale needs the delta or the kept entries' abs_sums")
        return blend.l1_rescale_(delta, kept.values)
    if mode == "inverse_density":
        if isinstance(kept.prob, Tensor):
            # dropped entries are 0 and may have prob 0: 0 / tiny stays 0
            return kept.values / kept.prob.clamp_min(1e-30)
        return kept.values / kept.prob if kept.prob > 0 else kept.values.clone()
    raise ValueError(f"unknown rescale mode {mode!r}")
