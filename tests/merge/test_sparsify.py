"""Sparsifiers: exact counts on bf16 task vectors (many ties), and row blocks equal to the
whole tensor bit for bit (what the engine's row-block streaming relies on)."""

from __future__ import annotations

import pytest
import torch

from mergekit_rl.merge import blend, native, rng, sparsify


def _bf16_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x - base of two bf16 tensors, in float32: few distinct magnitudes, many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(shape, generator=g) * 1e-3).bfloat16()
    return tuned.float() - base.float()


@pytest.mark.parametrize("shape", [(64, 50), (512, 300)])  # kthvalue and radix paths
@pytest.mark.parametrize("density", [0.05, 0.5, 0.8])
def test_ties_and_breadcrumbs_keep_exactly_k_on_bf16(shape: tuple[int, int], density: float):
    d = _bf16_delta(shape, seed=int(density * 100))
    d[d == 0] = 1e-6  # no zero entries: the count of nonzeros is the count kept
    n = d.numel()
    k = int(density * n)
    assert int((d.abs() >= d.abs().flatten().sort(descending=True).values[k - 1]).sum()) > k
    assert int((sparsify.magnitude(d, density).values != 0).sum()) == k
    gamma = 0.03
    kept = sparsify.breadcrumbs(d, density, gamma).values
    assert int((kept != 0).sum()) == k
    # the dropped outliers are exactly the top int(gamma * n), ties in index order
    order = d.flatten().abs().argsort(descending=True, stable=True)
    n_top = min(int(gamma * n), n - k)
    ref = torch.zeros(n, dtype=torch.bool)
    ref[order[n_top : n_top + k]] = True
    assert torch.equal(kept, d * ref.view(shape))


def test_dare_and_della_masks_in_row_blocks_equal_the_whole_tensor() -> None:
    d = _bf16_delta((37, 64), seed=1)
    whole_dare = sparsify.bernoulli(d, 0.3, 7, "m0", "w").values
    whole_della = sparsify.della(d, 0.5, 0.2, 7, "m0", "w").values
    for rows in (1, 5, 37):
        dare = [
            sparsify.bernoulli(b, 0.3, 7, "m0", "w", offset=i * rows * 64).values
            for i, b in enumerate(d.split(rows))
        ]
        della = [
            sparsify.della(b, 0.5, 0.2, 7, "m0", "w", offset=i * rows * 64).values
            for i, b in enumerate(d.split(rows))
        ]
        assert torch.equal(torch.cat(dare), whole_dare)
        assert torch.equal(torch.cat(della), whole_della)
    # the masks are the counter-based hash keyed by (seed, model, tensor name)
    key = rng.tensor_seed(7, "m0", "w")
    assert torch.equal(whole_dare, d * rng.hash_keep_mask(d.shape, 0.3, key))
    assert not torch.equal(whole_dare, sparsify.bernoulli(d, 0.3, 7, "m1", "w").values)


def test_dare_masks_do_not_depend_on_the_thread_count() -> None:
    d = _bf16_delta((300, 301), seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparsify.della(d, 0.5, 0.1, 3, "m", "t").values
        torch.set_num_threads(max(2, threads))
        many = sparsify.della(d, 0.5, 0.1, 3, "m", "t").values
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_dare_and_della_drop_bitwise_as_delta_times_the_bool_mask() -> None:
    # the masks are applied as 1.0 / 0.0 factors: the same products, signed zeros included
    g = torch.Generator().manual_seed(4)
    d = torch.randn(96, 70, generator=g)
    d[d.abs() < 0.3] = -0.0
    key = sparsify.mask_key(7, "m0", "w")
    dare = sparsify.bernoulli(d, 0.4, 7, "m0", "w").values
    want = d * rng.hash_keep_mask(d.shape, 0.4, key)
    assert torch.equal(dare.view(torch.int32), want.view(torch.int32))
    probs = sparsify.della_keep_prob(d, 0.5, 0.2)
    u = rng.hash_uniform(d.numel(), key).view(d.shape)
    della = sparsify.della(d, 0.5, 0.2, 7, "m0", "w").values
    assert torch.equal(della.view(torch.int32), (d * (u < probs)).view(torch.int32))


@pytest.mark.parametrize("native_path", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_della_ranks_from_the_integer_sort_equal_the_float_sort(
    dtype: torch.dtype, native_path: bool, monkeypatch
) -> None:
    # float32 on the host: the C radix sort per row (`native.rank_rows`); else torch's sort
    if native_path and native.library() is None:
        pytest.skip("no C compiler here")
    if not native_path:
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    g = torch.Generator().manual_seed(5)
    d = (torch.randint(-40, 40, (37, 300), generator=g) * 0.125).to(dtype)  # many ties, zeros
    d[d == 0.5] = float("-0.0")
    got = sparsify.della_keep_prob(d, 0.5, 0.2)
    order = torch.sort(d.abs(), dim=-1, stable=True).indices  # the float sort, as before
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(300).expand(37, 300))
    want = ((0.5 - 0.2) + 0.4 * (ranks.float() / 299)).clamp(0.0, 1.0)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def _two_steps_dare(x, base, density, key, offset):  # noqa: ANN001, ANN202
    """DARE written out unfused: the whole delta, the reference mask, the whole-tensor sums."""
    delta = x - base
    kept = delta * rng.hash_keep_mask(x.shape, density, key, offset=offset)
    sums = []
    for t in (delta, kept):
        acc = blend.StableSum()
        acc.add(t.abs())
        sums.append(acc.total())
    return kept, sums


@pytest.mark.parametrize("chunks", [None, (1000, 777)])  # default sizes; small, uneven ones
@pytest.mark.parametrize("path", ["native", "torch"])
def test_fused_dare_equals_the_two_steps(chunks, path, monkeypatch) -> None:
    """bernoulli_delta (the delta made and dropped chunk by chunk, norms summed on the way) and
    bernoulli_abs_sums give the unfused tensors and sums bit for bit, over several chunks,
    with -0.0, huge and zero-delta entries and a row-block offset."""
    if chunks is not None:
        monkeypatch.setattr(sparsify, "FUSED_CHUNK", chunks[0])
        monkeypatch.setattr(blend, "ABS_CHUNK", chunks[1])
    if path == "torch":
        monkeypatch.setattr(native, "usable", lambda *t: False)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(300, 1001, generator=g)  # 300,300 entries: two default chunks
    x = base + 0.01 * torch.randn(300, 1001, generator=g)
    x.view(-1)[:3] = torch.tensor([-0.0, 3e38, 1.0])
    base.view(-1)[:3] = torch.tensor([0.0, 1.0, 1.0])
    key = sparsify.mask_key(3, "m1", "w")
    for density, offset in ((0.3, 0), (0.9, 123 * 1001)):
        want, sums = _two_steps_dare(x, base, density, key, offset)
        got = sparsify.bernoulli_delta(x, base, density, 3, "m1", "w", offset, l1=True)
        assert torch.equal(got.values.view(torch.int32), want.view(torch.int32))
        assert got.abs_sums is not None
        assert [float(s) for s in got.abs_sums] == [float(s) for s in sums]
        pair = (blend.StableSum(), blend.StableSum())
        sparsify.bernoulli_abs_sums(x, base, density, 3, "m1", "w", offset, pair)
        assert [float(s.total()) for s in pair] == [float(s) for s in sums]
