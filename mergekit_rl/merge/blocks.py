"""Merge methods on row blocks of one tensor (the engine's streaming of huge tensors).

A row block holds whole rows (dim 0) of every input, so a method whose output rows depend only
on the same input rows runs on blocks unchanged: elementwise ones (linear, task arithmetic,
passthrough), the random sparsifiers (their masks hash each entry's flat index, passed as
`TensorContext.offset`), and the per-row ones (DELLA's ranks, model_stock filter_wise) when the
tensor has at least 2 dimensions. Whole-tensor quantities come from first passes over the
blocks, then the blocks are merged in order:
- TIES: each task vector's global magnitude cut (two reads), each block consuming its share
  of the ties; Model Breadcrumbs: two cuts per task vector (the kept band's top and its
  outliers), from the same two reads;
- an L1 rescale: each model's whole-tensor factor, from the stable sums of |delta| and
  |kept delta| (one read, after the cuts when there are some);
- karcher and model_stock (one cosine per tensor): the float64 Gram matrix of their vectors
  (one read), from which karcher's mean is a weighted sum of the inputs;
- slerp and nuslerp (flattened): the angle, from float64 stable sums of a^2, b^2 and a.b
  (one read); nuslerp per row (its default vectors are rows of the last dimension) streams
  as is.
So no float32 copy of the whole tensor is ever made, and the result is bit-identical to the
whole-tensor merge (tests/merge/test_blocks.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import blend, methods, selection, sparsify, task_vectors
from .registry import MergeMethod, TensorContext

ROW_LOCAL = {"linear", "task_arithmetic", "passthrough", "dare_linear", "dare_ties"}
PER_ROW = {"della", "della_linear", "model_stock"}  # rows of the last dimension
NEEDS_CUTS = {"ties", "breadcrumbs", "breadcrumbs_ties"}
BREADCRUMBS = {"breadcrumbs", "breadcrumbs_ties"}  # cut pairs: (top n_top + n_keep, top n_top)
NEEDS_ANGLE = {"slerp", "nuslerp"}
# the Gram matrix of these vectors (inputs, base) over the whole tensor, from a first pass
GRAM_VECTORS: dict[str, Callable[[list[Tensor], Tensor | None], list[Tensor]]] = {
    "karcher": lambda models, base: models,
    "model_stock": methods.model_stock_vectors,  # type: ignore[dict-item]  # base: never None
}

# (block with .offset, float32 inputs: base first when the method has one) per block, in order
Stream = Callable[[], Iterator[tuple[Any, list[Tensor]]]]


def block_mode(
    method: MergeMethod, shape: tuple[int, ...], global_params: dict[str, Any]
) -> str | None:
    """ "rows" (each block on its own), "cuts" (global magnitude cuts first), "angle" (the
    slerp angle first), "gram" (the Gram matrix first) or None (whole). An L1 rescale adds a
    pass to any of them
    (`needs_l1`)."""
    try:
        gp = method.global_params.model_validate(global_params)
    except ValueError:
        return None  # the whole-tensor run reports the error
    if method.name in ROW_LOCAL:
        return "rows"
    if method.name == "model_stock" and not gp.filter_wise:  # type: ignore[attr-defined]
        return "gram"  # one cosine over the whole tensor
    if method.name in PER_ROW and len(shape) >= 2:
        return "rows"
    if method.name == "karcher":
        return "gram"
    if method.name in NEEDS_CUTS:
        return "cuts"
    if method.name == "nuslerp" and not gp.nuslerp_flatten:  # type: ignore[attr-defined]
        # vectors along the last dimension are whole rows; along the first, whole columns
        row_wise = gp.nuslerp_row_wise  # type: ignore[attr-defined]
        return "rows" if not row_wise and len(shape) >= 2 else None
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
    cuts = None
    if mode == "cuts" and method.name in BREADCRUMBS:
        parsed = [method.model_params.model_validate(p) for p in model_params]
        cuts = _breadcrumbs_cuts(stream, shape, parsed)
    elif mode == "cuts":
        cuts = _cuts(stream, shape, model_params, ctx.min_keep)
    angle = None
    if mode == "angle":
        angle = _angle(method, ctx, stream, has_base, model_params, global_params)
    gram = None
    if mode == "gram":
        split = (lambda xs: (xs[1:], xs[0])) if has_base else (lambda xs: (xs, None))
        vectors = GRAM_VECTORS[method.name]
        gram = blend.gram_sums(vectors(*split(xs)) for _, xs in stream())
    whole = replace(ctx, cuts=cuts, slerp=angle, gram=gram)
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


def _angle(
    method: MergeMethod,
    ctx: TensorContext,
    stream: Stream,
    has_base: bool,
    model_params: list[dict[str, Any]],
    global_params: dict[str, Any],
) -> blend.SlerpWeights:
    """The whole tensor's slerp weights: slerp from the base (xs[0]) to the model (xs[1]),
    nuslerp between its two models (or their task vectors over the base). One read."""
    if method.name == "slerp":
        t = method.global_params.model_validate(global_params).t  # type: ignore[attr-defined]
        return _slerp_angle((xs for _, xs in stream()), t)
    t = methods.nuslerp_t(ctx, [method.model_params.model_validate(p) for p in model_params])

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for _, xs in stream():
            yield methods.nuslerp_pair(xs[1:], xs[0]) if has_base else (xs[0], xs[1])

    return blend.slerp_weights(
        blend.slerp_sums(pairs()), t, parallel_cos=methods.NUSLERP_PARALLEL_COS
    )


def _cuts(
    stream: Stream, shape: tuple[int, ...], model_params: list[dict[str, Any]], min_keep: int
) -> tuple[selection.MagnitudeCut, ...]:
    """Every model's magnitude cut of its whole task vector: two reads of the blocks."""
    numel = math.prod(shape)
    ks = [sparsify.magnitude_k(float(p.get("density", 1.0)), numel, min_keep) for p in model_params]
    return tuple(selection.delta_magnitude_cuts(lambda: (xs for _, xs in stream()), numel, ks))


def _slerp_angle(pieces: Iterable[list[Tensor]], t: float) -> blend.SlerpWeights:
    """slerp's weights from the base (pieces' first tensor) to the model (their second), over
    the whole tensor given as pieces in order: one read."""
    return blend.slerp_weights(blend.slerp_sums((xs[0], xs[1]) for xs in pieces), t)


def _breadcrumbs_cuts(
    stream: Stream, shape: tuple[int, ...], model_params: list[Any]
) -> tuple[tuple[selection.MagnitudeCut, selection.MagnitudeCut | None], ...]:
    """Every model's Model Breadcrumbs cuts of its whole task vector (the top n_top + n_keep
    entries, and the top n_top outliers or None): one radix select of 2N cuts, two reads."""
    numel, n = math.prod(shape), len(model_params)
    counts = [sparsify.breadcrumbs_counts(p.density, p.gamma, numel) for p in model_params]
    ks = [n_top + n_keep for n_keep, n_top in counts] + [n_top for _, n_top in counts]

    def blocks() -> Iterator[list[Tensor]]:  # [base, x_1..x_N, x_1..x_N]: each delta twice
        return ([*xs, *xs[1:]] for _, xs in stream())

    cuts = selection.delta_magnitude_cuts(blocks, numel, ks)
    return tuple((cuts[i], cuts[n + i] if counts[i][1] > 0 else None) for i in range(n))


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


def elementwise_form(
    method: MergeMethod,
    has_base: bool,
    model_params: list[dict[str, Any]],
    global_params: dict[str, Any],
    pieces: Callable[[], Iterator[list[Tensor]]],
) -> blend.Elementwise | None:
    """The merge of one tensor as a fused row-local blend, or None: another method, or
    parameters the method itself rejects (its run reports them). pieces() yields the inputs
    as stored (base first), whole or in row blocks: slerp's angle comes from a pass over them
    (float64 sums of values that bf16 and float32 hold exactly: the float32 path's angle)."""
    if method not in FUSED_BUILTINS or not method.min_models <= len(model_params):
        return None
    try:
        gp = method.global_params.model_validate(global_params)
        mps = [method.model_params.model_validate(p) for p in model_params]
    except ValueError:
        return None
    if method.name == "slerp" and has_base and len(mps) == 1:
        angle = _slerp_angle(pieces(), gp.t)
        return blend.Elementwise("slerp", t=gp.t, angle=angle)
    weights = [p.weight for p in mps]
    divisor = sum(weights) if getattr(gp, "normalize", False) else None
    if divisor is not None and abs(divisor) < 1e-8:
        return None  # the method's division-by-zero error
    if method.name == "linear" and not has_base:
        return blend.Elementwise("linear", tuple(weights), divisor)
    if method.name == "task_arithmetic" and has_base:
        return blend.Elementwise("task_arithmetic", tuple(weights), divisor, gp.lambda_)
    return None


# the built-in methods with a fused form (identity: not a plugin registered under their names)
FUSED_BUILTINS = tuple(
    m for m in methods.BUILTINS if m.name in ("linear", "task_arithmetic", "slerp")
)
