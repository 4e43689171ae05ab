"""Merge methods on row blocks of one tensor (the engine's streaming of huge tensors).

A row block holds whole rows (dim 0) of every input, so a method whose output rows depend only
on the same input rows runs on blocks unchanged: elementwise ones (linear, task arithmetic,
passthrough), the random sparsifiers (their masks hash each entry's flat index, passed as
`TensorContext.offset`), and the per-row ones (DELLA's ranks, model_stock filter_wise) when the
tensor has at least 2 dimensions. Whole-tensor quantities come from first passes over the
blocks, then the blocks are merged in order:
- TIES: each task vector's global magnitude cut (two reads), each block consuming its share
  of the ties;
- an L1 rescale: each model's whole-tensor factor, from the stable sums of |delta| and
  |kept delta| (one read, after the cuts when there are some);
- slerp: the angle, from float64 stable sums of a^2, b^2 and a.b (one read).
So no float32 copy of the whole tensor is ever made, and the result is bit-identical to the
whole-tensor merge (tests/merge/test_blocks.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import blend, selection, sparsify, task_vectors
from .registry import MergeMethod, TensorContext

ROW_LOCAL = {"linear", "task_arithmetic", "passthrough", "dare_linear", "dare_ties"}
PER_ROW = {"della", "della_linear", "model_stock"}  # rows of the last dimension
NEEDS_CUTS = {"ties"}
NEEDS_ANGLE = {"slerp"}

# (block with .offset, float32 inputs: base first when the method has one) per block, in order
Stream = Callable[[], Iterator[tuple[Any, list[Tensor]]]]


def block_mode(
    method: MergeMethod, shape: tuple[int, ...], global_params: dict[str, Any]
) -> str | None:
    """ "rows" (each block on its own), "cuts" (global magnitude cuts first), "angle" (the
    slerp angle first) or None (whole). An L1 rescale adds a pass to any of them
    (`needs_l1`)."""
    try:
        method.global_params.model_validate(global_params)
    except ValueError:
        return None  # the whole-tensor run reports the error
    if method.name in ROW_LOCAL:
        return "rows"
    if method.name in PER_ROW and len(shape) >= 2:
        if method.name == "model_stock" and not global_params.get("filter_wise", False):
            return None  # one cosine over the whole tensor
        return "rows"
    if method.name in NEEDS_CUTS:
        return "cuts"
    if method.name in NEEDS_ANGLE:
        return "angle"
    return None


def needs_l1(method: MergeMethod, global_params: dict[str, Any]) -> bool:
    """True when the merge rescales each kept delta to its whole-tensor L1 norm."""
    gp = method.global_params.model_validate(global_params)
    return bool(getattr(gp, "rescale", False)) and getattr(gp, "rescale_mode", "l1") == "l1"


def merge_blocks(
    method: MergeMethod,
    ctx: TensorContext,
    shape: tuple[int, ...],
    stream: Stream,
    has_base: bool,
    model_params: list[dict[str, Any]],
    global_params: dict[str, Any],
    n_blocks: int,
) -> Iterator[list[Tensor]] | None:
    """The merged rows of each block of `stream` (n_blocks of them), or None when this merge
    runs whole. The first passes (cuts, L1 factors, angle) run before this returns."""
    mode = block_mode(method, shape, global_params)
    if mode is None:
        return None
    cuts = _cuts(stream, shape, model_params, ctx.min_keep) if mode == "cuts" else None
    angle = None
    if mode == "angle":
        t = method.global_params.model_validate(global_params).t  # type: ignore[attr-defined]
        angle = blend.slerp_weights(blend.slerp_sums((xs[0], xs[1]) for _, xs in stream()), t)
    whole = replace(ctx, cuts=cuts, slerp=angle)
    masks = None
    if needs_l1(method, global_params):
        factors, masks = _l1_factors(method, whole, stream, model_params)
        whole = replace(whole, l1_factors=factors)

    def results() -> Iterator[list[Tensor]]:
        for j, (blk, xs) in enumerate(stream()):
            base, models = (xs[0], xs[1:]) if has_base else (None, xs)
            bctx = replace(whole, offset=blk.offset)
            if masks is not None:
                bctx = replace(bctx, keep_masks=tuple(_unpack(m[j], xs[0]) for m in masks))
            yield [method.run(bctx, models, base, model_params, global_params)]

    return results()


def _cuts(
    stream: Stream, shape: tuple[int, ...], model_params: list[dict[str, Any]], min_keep: int
) -> tuple[selection.MagnitudeCut, ...]:
    """Every model's magnitude cut of its whole task vector: two reads of the blocks."""
    numel = math.prod(shape)
    ks = [sparsify.magnitude_k(float(p.get("density", 1.0)), numel, min_keep) for p in model_params]
    return tuple(selection.delta_magnitude_cuts(lambda: (xs for _, xs in stream()), numel, ks))


# random sparsifiers whose keep decisions the L1 pass records (bit-packed, 1 bit per entry and
# model) so the merge pass does not draw them again: DELLA's per-row sort. DARE's drop is drawn
# again instead (on the host its first pass only sums norms, `task_vectors.add_l1_sums`): its
# hash is a C loop of ~1 ns per entry, less than recording the mask, unpacking it and
# multiplying by a bool tensor (a 32000 x 1024 dare_ties embedding in 2 blocks: 1.17 against
# 1.40 s, min of 7, shared 2-core VM; the same bits)
RECORDED_MASKS = {"della", "della_linear"}


def _l1_factors(
    method: MergeMethod, ctx: TensorContext, stream: Stream, model_params: list[dict[str, Any]]
) -> tuple[tuple[float | None, ...], list[list[np.ndarray]] | None]:
    """Every model's L1 rescale factor over the whole tensor: one read of the blocks, the
    magnitudes of each delta and of its kept entries summed as `stable_sum` sums them whole.
    The cuts are copied: this pass consumes their ties as the merge pass will. Also, for
    RECORDED_MASKS on the host, each model's keep mask per block, bit-packed (kept != 0: a
    dropped entry and a kept zero give the same product)."""
    n = len(model_params)
    sums = [(blend.StableSum(), blend.StableSum()) for _ in range(n)]
    cuts = None if ctx.cuts is None else tuple(copy.copy(c) for c in ctx.cuts)
    record = method.name in RECORDED_MASKS
    masks: list[list[np.ndarray]] | None = [[] for _ in range(n)] if record else None
    for blk, xs in stream():
        bctx = replace(ctx, offset=blk.offset, cuts=cuts)
        if task_vectors.add_l1_sums(method, bctx, xs[1:], xs[0], model_params, sums):
            continue  # DARE: summed chunk by chunk, nothing to record
        terms = task_vectors.l1_terms(method, bctx, xs[1:], xs[0], model_params)
        masks = masks if xs[0].device.type == "cpu" else None
        for i, (delta, kept) in enumerate(terms):
            sums[i][0].add_abs(delta)  # |delta| summed through a small buffer, no copy
            sums[i][1].add_abs(kept)
            if masks is not None:
                masks[i].append(np.packbits((kept != 0).reshape(-1).numpy()))
        del terms
    return tuple(blend.l1_factor(d.total(), k.total()) for d, k in sums), masks


def _unpack(packed: np.ndarray, like: Tensor) -> Tensor:
    """A block's bool keep mask from its packed bits, shaped like the block."""
    bits = np.unpackbits(packed, count=like.numel())
    return torch.from_numpy(bits).view(torch.bool).view(like.shape)
