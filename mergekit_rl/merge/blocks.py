"""Merge methods on row blocks of one tensor (the engine's streaming of huge tensors).

A row block holds whole rows (dim 0) of every input, so a method whose output rows depend only
on the same input rows runs on blocks unchanged: elementwise ones (linear, task arithmetic,
passthrough), the random sparsifiers (their masks hash each entry's flat index, passed as
`TensorContext.offset`), and the per-row ones (DELLA's ranks, model_stock filter_wise) when the
tensor has at least 2 dimensions. TIES needs each task vector's global magnitude cut first: one
streaming pass (two reads) finds every model's cut, then the blocks are merged in order, each
consuming its share of the ties. L1 rescaling needs whole-tensor norms: those merges stay whole.
The result is bit-identical to the whole-tensor merge (tests/merge/test_blocks.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from torch import Tensor

from . import core, sparsify
from .registry import MergeMethod, TensorContext

ROW_LOCAL = {"linear", "task_arithmetic", "passthrough", "dare_linear", "dare_ties"}
PER_ROW = {"della", "della_linear", "model_stock"}  # rows of the last dimension
NEEDS_CUTS = {"ties"}
# a merge needing cuts reads its inputs three times in blocks: a tensor of at most this many
# blocks is merged whole instead (one read; the 1.5B models' 32000 x 2048 embedding, 4 blocks of
# the default size, stays whole, a 256k-vocabulary one streams)
WHOLE_CUTS_MAX_BLOCKS = 4

# (block with .offset, float32 inputs: base first when the method has one) per block, in order
Stream = Callable[[], Iterator[tuple[Any, list[Tensor]]]]


def block_mode(
    method: MergeMethod, shape: tuple[int, ...], global_params: dict[str, Any]
) -> str | None:
    """ "rows" (each block on its own), "cuts" (global magnitude cuts first) or None (whole)."""
    try:
        gp = method.global_params.model_validate(global_params)
    except ValueError:
        return None  # the whole-tensor run reports the error
    if getattr(gp, "rescale", False) and getattr(gp, "rescale_mode", "l1") == "l1":
        return None  # L1 norm matching: sums over the whole tensor
    if method.name in ROW_LOCAL:
        return "rows"
    if method.name in PER_ROW and len(shape) >= 2:
        if method.name == "model_stock" and not getattr(gp, "filter_wise", False):
            return None  # one cosine over the whole tensor
        return "rows"
    if method.name in NEEDS_CUTS:
        return "cuts"
    return None


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
    runs whole."""
    mode = block_mode(method, shape, global_params)
    if mode is None or (mode == "cuts" and n_blocks <= WHOLE_CUTS_MAX_BLOCKS):
        return None
    cuts = None
    if mode == "cuts":
        numel = math.prod(shape)
        ks = [
            sparsify.magnitude_k(float(p.get("density", 1.0)), numel, ctx.min_keep)
            for p in model_params
        ]

        def deltas() -> Iterator[list[Tensor]]:
            for _, xs in stream():
                yield [x - xs[0] for x in xs[1:]]

        cuts = tuple(core.magnitude_cuts(deltas, numel, ks))

    def results() -> Iterator[list[Tensor]]:
        for blk, xs in stream():
            base, models = (xs[0], xs[1:]) if has_base else (None, xs)
            bctx = replace(ctx, offset=blk.offset, cuts=cuts)
            yield [method.run(bctx, models, base, model_params, global_params)]

    return results()
