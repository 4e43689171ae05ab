"""Merge methods on row blocks equal the whole-tensor merge bit for bit (engine row blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from mergekit_rl.merge import blocks
from mergekit_rl.merge.registry import TensorContext, get_method


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    """A bf16-valued base and n fine-tunes in float32: task vectors with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    xs = [(base + torch.randn(shape, generator=g) * 1e-3).bfloat16().float() for _ in range(n)]
    return base, xs


def _stream(tensors: list[Tensor], rows: int):
    """The engine's stream: (block with .offset, the rows of every input), in order."""
    row = tensors[0][0].numel()

    def stream() -> Iterator[tuple[Any, list[Tensor]]]:
        for start in range(0, tensors[0].shape[0], rows):
            blk = SimpleNamespace(offset=start * row)
            yield blk, [t[start : start + rows] for t in tensors]

    return stream


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"weight": 0.7}, {}),
    "task_arithmetic": ({"weight": 0.5}, {"lambda": 0.9}),
    "ties": ({"density": 0.3, "weight": 0.8}, {}),
    "dare_linear": ({"density": 0.4}, {"rescale_mode": "inverse_density"}),
    "dare_ties": ({"density": 0.6}, {"rescale": False}),
    "della": ({"density": 0.5, "epsilon": 0.2}, {"rescale_mode": "inverse_density"}),
    "della_linear": ({"density": 0.5, "epsilon": 0.1}, {"rescale": False}),
    "model_stock": ({}, {"filter_wise": True}),
    "passthrough": ({"scale": 0.5}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_blocks_equal_the_whole_tensor(name: str, rows: int) -> None:
    method = get_method(name)
    n = 1 if method.max_models == 1 else 3
    base, xs = _inputs((40, 24), n, seed=len(name))
    mp, gp = CASES[name]
    mps = [dict(mp) for _ in range(n)]
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", tuple(f"m{i}" for i in range(n)), 5)
    use_base = method.needs_base
    whole = method.run(ctx, xs, base if use_base else None, mps, gp)
    tensors = [base, *xs] if use_base else xs
    stream = _stream(tensors, rows)
    parts = blocks.merge_blocks(method, ctx, whole.shape, stream, use_base, mps, gp, n_blocks=99)
    assert parts is not None
    got = torch.cat([p[0] for p in parts])
    assert torch.equal(got, whole)


def test_ties_blocks_keep_exactly_k_per_model() -> None:
    # one model, weight 1, no election conflict: the kept count is visible in the output
    base, xs = _inputs((50, 30), 1, seed=3)
    method, ctx = get_method("ties"), TensorContext("w", ("m0",), 0)
    stream = _stream([base, *xs], 7)
    parts = blocks.merge_blocks(method, ctx, (50, 30), stream, True, [{"density": 0.2}], {}, 8)
    assert parts is not None
    # a tensor of few blocks is merged whole (one read instead of three)
    assert (
        blocks.merge_blocks(method, ctx, (50, 30), stream, True, [{"density": 0.2}], {}, 4) is None
    )
    got = torch.cat([p[0] for p in parts])
    assert int((got != base).sum()) == int(0.2 * 1500)


@pytest.mark.parametrize("min_keep", [1, 0])
def test_ties_blocks_keep_mergekits_one_entry_at_tiny_density(min_keep: int) -> None:
    """int(0.0005 * 1500) = 0: mergekit's rule (min_keep 1, the default) keeps the largest
    entry in row blocks as whole; `topk_count: floor` (min_keep 0) keeps none."""
    base, xs = _inputs((50, 30), 1, seed=4)
    method = get_method("ties")
    ctx = TensorContext("w", ("m0",), 0, min_keep=min_keep)
    mps = [{"density": 0.0005}]
    parts = blocks.merge_blocks(method, ctx, (50, 30), _stream([base, *xs], 7), True, mps, {}, 8)
    assert parts is not None
    got = torch.cat([p[0] for p in parts])
    assert torch.equal(got, method.run(ctx, xs, base, mps, {}))
    delta = xs[0] - base
    want = base.clone()
    if min_keep:
        top = delta.abs().flatten().argmax()  # the one largest change (naive reference)
        want.view(-1)[top] = xs[0].view(-1)[top]
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "name,gp,shape",
    [
        ("dare_linear", {}, (8, 8)),  # L1 rescale by default: whole-tensor norms
        ("ties", {"rescale": True}, (8, 8)),
        ("slerp", {"t": 0.5}, (8, 8)),
        ("breadcrumbs", {}, (8, 8)),
        ("della_linear", {"rescale": False}, (64,)),  # one row: its ranks span the tensor
        ("model_stock", {}, (8, 8)),
    ],
)
def test_merges_that_need_the_whole_tensor_are_not_blocked(name: str, gp: dict, shape) -> None:
    assert blocks.block_mode(get_method(name), shape, gp) is None
