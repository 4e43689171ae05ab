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
from tests.merge.test_methods import ref_dare_keep, ref_slerp, ref_task_vectors


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
    "model_stock:whole": ({}, {}),  # one cosine: the Gram matrix from a first pass
    "karcher": ({}, {"max_iter": 50, "tol": 1e-9}),  # its mean: a weighted sum of the inputs
    "breadcrumbs": ({"density": 0.5, "gamma": 0.1, "weight": 0.7}, {}),
    "breadcrumbs_ties": ({"density": 0.3, "gamma": 0.05}, {}),
    "breadcrumbs:gamma0": ({"density": 0.4, "gamma": 0.0}, {}),  # no outlier cut
    "passthrough": ({"scale": 0.5}, {}),
    # whole-tensor quantities from a first pass over the blocks
    "dare_ties:l1": ({"density": 0.6, "weight": 0.7}, {}),  # the default L1 rescale
    "dare_linear:l1": ({"density": 0.4}, {"normalize": True}),
    "ties:l1": ({"density": 0.3, "weight": 0.8}, {"rescale": True}),
    "della:l1": ({"density": 0.5, "epsilon": 0.2}, {}),
    "della_linear:l1": ({"density": 0.5, "epsilon": 0.1}, {"rescale": True}),
    "slerp": ({}, {"t": 0.3}),
    "nuslerp": ({"weight": 0.6}, {}),  # flattened: the angle from a first pass
    "nuslerp:rows": ({"weight": 0.6}, {"nuslerp_flatten": False}),  # per row: no first pass
}


def test_nuslerp_of_two_models_without_a_base_streams_its_angle() -> None:
    _, xs = _inputs((40, 24), 2, seed=21)
    method, ctx = get_method("nuslerp"), TensorContext("w", ("m0", "m1"), 0)
    mps = [{"weight": 0.3}, {"weight": 0.9}]
    whole = method.run(ctx, xs, None, mps, {})
    parts = blocks.merge_blocks(method, ctx, (40, 24), _stream(xs, 7), False, mps, {}, 6)
    assert parts is not None
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_blocks_equal_the_whole_tensor(name: str, rows: int) -> None:
    method = get_method(name.split(":")[0])
    n = method.max_models if method.max_models in (1, 2) else 3
    base, xs = _inputs((40, 24), n, seed=len(name))
    mp, gp = CASES[name]
    mps = [dict(mp) for _ in range(n)]
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", tuple(f"m{i}" for i in range(n)), 5)
    use_base = method.needs_base or name.startswith("nuslerp")  # nuslerp of task vectors
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
    for n_blocks in (2, 8):  # few blocks stream too: the cuts come from a first pass
        parts = blocks.merge_blocks(
            method, ctx, (50, 30), stream, True, [{"density": 0.2}], {}, n_blocks
        )
        assert parts is not None
        got = torch.cat([p[0] for p in parts])
        assert int((got != base).sum()) == int(0.2 * 1500)


def _streamed(name: str, tensors: list[Tensor], rows: int, mps: list, gp: dict) -> Tensor:
    method = get_method(name)
    ctx = TensorContext("w", tuple(f"m{i}" for i in range(len(mps))), 5)
    shape = tuple(tensors[0].shape)
    parts = blocks.merge_blocks(method, ctx, shape, _stream(tensors, rows), True, mps, gp, 9)
    assert parts is not None
    return torch.cat([p[0] for p in parts])


def test_dare_ties_l1_blocks_match_a_naive_reference() -> None:
    # the L1 factors come from a first pass: the merged task vector of one model keeps the
    # whole tensor's L1 norm, which no single block has
    base, xs = _inputs((60, 40), 2, seed=11)
    mps = [{"density": 0.3, "weight": 1.0}, {"density": 0.5, "weight": 0.6}]
    got = _streamed("dare_ties", [base, *xs], 7, mps, {})
    keeps = [ref_dare_keep(base.shape, p["density"], 5, f"m{i}", "w") for i, p in enumerate(mps)]
    want = ref_task_vectors(xs, base, [1.0, 0.6], keeps, rescale="l1", elect=True, normalize=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    one = _streamed("dare_linear", [base, xs[0]], 7, [{"density": 0.3}], {})
    l1 = float((one.double() - base.double()).abs().sum())
    assert l1 == pytest.approx(float((xs[0].double() - base.double()).abs().sum()), rel=1e-5)


def test_slerp_blocks_match_a_naive_reference() -> None:
    base, xs = _inputs((60, 40), 1, seed=12)
    got = _streamed("slerp", [base, xs[0]], 8, [{}], {"t": 0.4})
    torch.testing.assert_close(got.double(), ref_slerp(base, xs[0], 0.4), rtol=1e-5, atol=1e-7)


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
        ("della_linear", {"rescale": False}, (64,)),  # one row: its ranks span the tensor
        ("model_stock", {"filter_wise": True}, (64,)),  # one row: its cosine spans it
        ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, (8, 8)),  # columns
    ],
)
def test_merges_that_need_the_whole_tensor_are_not_blocked(name: str, gp: dict, shape) -> None:
    assert blocks.block_mode(get_method(name), shape, gp) is None


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_the_l1_pass_records_della_masks_and_dare_draws_again(name, monkeypatch) -> None:
    # DELLA's per-row sort runs once per block (the L1 pass records its masks); DARE's hash is
    # cheaper than a recorded mask, so its pass sums the norms chunk by chunk and the merge
    # pass draws again; the merge is still the whole-tensor one bit for bit
    from mergekit_rl.merge import sparsify

    base, xs = _inputs((40, 24), 2, seed=4)
    mps = [{"density": 0.5, "weight": 0.6}, {"density": 0.3}]
    if name == "della":
        mps = [{**p, "epsilon": 0.1} for p in mps]
    gp: dict = {}
    method, ctx = get_method(name), TensorContext("w", ("m0", "m1"), 5)
    whole = method.run(ctx, xs, base, mps, gp)
    draws = []
    for real in (sparsify.della, sparsify.bernoulli_delta, sparsify.bernoulli_abs_sums):
        spy = (lambda f: lambda *a, **k: draws.append(f.__name__) or f(*a, **k))(real)
        monkeypatch.setattr(sparsify, real.__name__, spy)
    stream = _stream([base, *xs], 8)
    parts = blocks.merge_blocks(method, ctx, (40, 24), stream, True, mps, gp, 5)
    assert parts is not None
    got = torch.cat([p[0] for p in parts])
    if name == "della":  # 5 blocks x 2 models, in the first pass only
        assert draws == ["della"] * 10
    else:  # the first pass sums, the merge pass draws: 5 blocks x 2 models each
        assert draws == ["bernoulli_abs_sums"] * 10 + ["bernoulli_delta"] * 10
    assert torch.equal(got, whole)
