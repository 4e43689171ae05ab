"""Merge primitives against straightforward float64 / sorting references."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_rl.merge import blend, rng, rounding, selection


def _top_k_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest |x| by a full sort (no ties in the random data used)."""
    flat = x.reshape(-1).abs()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return keep.reshape(x.shape)


# ---- kth_largest / magnitude ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=0.0, max_value=float(torch.tensor(1e30)), allow_nan=False, width=32),
        min_size=1,
    ),
    data=st.data(),
)
def test_kth_largest_equals_sorted_reference(values: list[float], data: st.DataObject) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    assert float(selection.kth_largest(x, k)) == float(torch.sort(x, descending=True).values[k - 1])


@pytest.mark.parametrize("k", [1, 2, 1000, 45_000, 89_999, 90_000])
def test_kth_largest_radix_path_with_ties_and_zeros(k: int) -> None:
    # 90,000 values (radix path), with many exact duplicates and zeros
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 500, (90_000,), generator=g).float() * 0.01
    x[:7000] = 0.0
    expected = torch.sort(x, descending=True).values[k - 1]
    assert selection.kth_largest(x, k) == expected


def test_kth_largest_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        selection.kth_largest(torch.ones(3), 0)
    with pytest.raises(ValueError):
        selection.kth_largest(torch.ones(3), 4)


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (300, 301)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.999, 1.0])
def test_magnitude_mask_and_prune_match_argsort(shape: tuple[int, ...], density: float) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = _top_k_ref(x, int(density * x.numel()))
    assert torch.equal(selection.magnitude_mask(x, density), ref)
    assert torch.equal(selection.magnitude_prune(x, density), x * ref)


def test_magnitude_keeps_exactly_k_ties_in_index_order_and_handles_zeros() -> None:
    x = torch.tensor([3.0, -2.0, 2.0, 0.0, 1.0, -2.0])
    # k = 2: the 2nd largest |x| is 2, tied three times: only the first tie (index 1) is kept
    assert selection.magnitude_mask(x, 2 / 6).tolist() == [True, True, False, False, False, False]
    assert selection.magnitude_prune(x, 2 / 6).tolist() == [3.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert selection.magnitude_prune(x, 4 / 6).tolist() == [3.0, -2.0, 2.0, 0.0, 0.0, -2.0]
    assert selection.magnitude_prune(torch.zeros(5), 0.4).abs().sum() == 0


def _bf16_delta(n: int, seed: int) -> torch.Tensor:
    """A float32 task vector of two bf16 tensors: few distinct magnitudes, many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16()
    return tuned.float() - base.float()


def _exact_top_k_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of the k largest |x|, ties in index order: a stable descending sort."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[x.reshape(-1).abs().argsort(descending=True, stable=True)[:k]] = True
    return keep.reshape(x.shape)


@pytest.mark.parametrize("n", [5000, 200_003])  # kthvalue path and radix path
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
def test_magnitude_prune_keeps_exactly_k_on_bf16_ties(n: int, density: float) -> None:
    d = _bf16_delta(n, seed=n)
    k = int(density * n)
    mag = d.abs()
    kth = mag.sort(descending=True).values[k - 1]
    assert int((mag >= kth).sum()) > k  # ties at the cut: keeping them all would exceed k
    assert int((d == 0).sum()) < n - k  # and enough nonzeros that a count of k is meaningful
    ref = _exact_top_k_ref(d, k)
    got = selection.magnitude_prune(d, density)
    assert int((got != 0).sum()) == int((d * ref != 0).sum())
    assert torch.equal(got, d * ref)
    assert torch.equal(selection.magnitude_mask(d, density), ref)
    assert int(selection.magnitude_mask(d, density).sum()) == k


@pytest.mark.parametrize("accelerator_path", [False, True])
@pytest.mark.parametrize("k", [1, 7, 1000, 50_000, 99_999, 100_000])
def test_radix_select_counts_match_sort(
    k: int, accelerator_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if accelerator_path:  # the integer-histogram finish CUDA uses, run on the CPU
        monkeypatch.setattr(selection, "KTHVALUE_BUCKET_DEVICES", ())
        # and the digits from integer ops (the int16-view shortcut is for little-endian hosts)
        monkeypatch.setattr(selection.sys, "byteorder", "big")
    x = _bf16_delta(100_000, seed=k)
    bits, n_above, n_equal = selection.radix_select(lambda: (x,), k)
    kth = x.abs().sort(descending=True).values[k - 1]
    assert bits == int(kth.view(torch.int32))
    assert n_above == int((x.abs() > kth).sum())
    assert n_equal == int((x.abs() == kth).sum())


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.97, 1.0])
def test_magnitude_cut_streamed_in_row_blocks_equals_whole_tensor(density: float) -> None:
    x = _bf16_delta(300 * 257, seed=3).reshape(300, 257)
    k = int(density * x.numel())
    whole = selection.magnitude_prune(x, density)
    assert int((whole != 0).sum()) == int(
        (x.reshape(-1) * _exact_top_k_ref(x, k).reshape(-1) != 0).sum()
    )
    for rows in (1, 7, 64, 300):
        cut = selection.magnitude_cut(partial(x.split, rows), x.numel(), k)  # called twice
        parts = torch.cat([selection.apply_cut_(b, cut) for b in x.split(rows)])
        assert torch.equal(parts, whole), rows
        assert cut.ties_left == 0


def test_threshold_edges_and_zero_below() -> None:
    x = torch.tensor([0.5, -4.0, 1e-42, -1e-42, 2.0])  # includes subnormals
    assert selection.magnitude_threshold(x, 5) is None
    assert selection.magnitude_threshold(x, 0) == math.inf
    assert selection.magnitude_threshold(x, 2) == 2.0
    assert selection.zero_below(x, 2.0).tolist() == [0.0, -4.0, 0.0, 0.0, 2.0]
    assert torch.equal(selection.zero_below(x, None), x)
    assert selection.zero_below(x, math.inf).abs().sum() == 0
    sub = selection.zero_below(x, float(torch.tensor(1e-42)))
    assert torch.equal(sub, x)  # |x| >= the smallest subnormal-ish threshold: all kept
    y = x.clone()
    selection.zero_below(y, 1.0)
    assert torch.equal(y, x)  # input untouched


# ---- signs -----------------------------------------------------------------------------------


def test_elect_sign_zero_counts_as_plus_list_and_stack_agree() -> None:
    d = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, -1.0, -3.0, 0.0])]
    expected = [1.0, -1.0, -1.0, 1.0]
    assert blend.elect_sign(d).tolist() == expected
    assert blend.elect_sign(torch.stack(d)).tolist() == expected
    assert d[0].tolist() == [1.0, -1.0, 2.0, 0.0]  # not modified


def test_agrees_with_zeros_never_agree() -> None:
    delta = torch.tensor([1.0, -1.0, 0.0, 0.0, 1e-40])
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0])
    assert blend.agrees_with(delta, sign).tolist() == [True, False, False, False, True]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sign_consensus_matches_elementwise_reference(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    weights = [0.5 + i for i in range(n)]
    weighted = [torch.randn(40, 9, generator=g) * (torch.rand(40, 9, generator=g) > 0.3)]
    weighted += [torch.randn(40, 9, generator=g) for _ in range(n - 1)]
    total = sum(d.double() for d in weighted)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    keep = [torch.sign(d.double()) == sign for d in weighted]
    mixed_ref = sum(d.double() * k for d, k in zip(weighted, keep, strict=True))
    div_ref = sum(w * k.double() for w, k in zip(weights, keep, strict=True))
    mixed, divisor = blend.sign_consensus_([d.clone() for d in weighted], weights)
    torch.testing.assert_close(mixed.double(), mixed_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(divisor.double(), div_ref, rtol=0, atol=1e-6)


# ---- interpolation ---------------------------------------------------------------------------


def test_slerp_rows_matches_slerp_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    b[1] = a[1] * 3.0  # parallel -> lerp
    b[2] = -a[2]  # anti-parallel -> lerp
    a[3] = 0.0  # zero norm -> lerp
    for t in (0.0, 0.3, 1.0):
        rows = blend.slerp_rows(a, b, t)
        for i in range(6):
            torch.testing.assert_close(rows[i], blend.slerp(a[i], b[i], t), rtol=1e-6, atol=1e-7)


def test_lerp_accepts_tensor_t() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    t = torch.tensor([[0.25], [0.75]])
    assert blend.lerp(a, b, t).tolist() == [[0.25] * 3, [0.75] * 3]


# ---- random masks ----------------------------------------------------------------------------


def test_tensor_seed_is_stable() -> None:
    # a fixed value: masks of saved recipes must not change between releases
    assert rng.tensor_seed(0, "a", "b") == rng.tensor_seed(0, "a", "b")
    assert rng.tensor_seed(0, "a", "b") != rng.tensor_seed(0, "ab")
    assert rng.tensor_seed(1, "a") != rng.tensor_seed(0, "a")
    assert 0 <= rng.tensor_seed(123, "m") < 2**63


def test_l1_rescale_matches_norm_and_keeps_zero() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    masked = x * torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = blend.l1_rescale(x, masked)
    assert out.abs().sum().item() == pytest.approx(10.0)
    assert out.tolist() == pytest.approx([0.0, -10 / 3, 0.0, -40 / 6])
    assert blend.l1_rescale(x, torch.zeros(4)).abs().sum() == 0


# -- counter-based random numbers ----------------------------------------------------------------


def _words(bits):
    return [int(b) & 0xFFFFFFFF for b in bits]


def test_hash_bits_match_the_python_reference():
    # int32 tensor arithmetic must wrap exactly like the mod-2**32 reference
    key = rng.tensor_seed(7, "model", "w")
    assert _words(rng.hash_bits(300, key)) == [rng.hash_word(key, i) for i in range(300)]
    off = 2**32 - 5  # across the 2**32 boundary, where the high word enters
    got = _words(rng.hash_bits(10, key, offset=off))
    assert got == [rng.hash_word(key, off + i) for i in range(10)]


def test_hash_bits_is_a_pure_function_of_key_and_index():
    key = rng.tensor_seed(7, "model", "w")
    full = rng.hash_bits(5000, key)
    assert full.dtype == torch.int32
    assert torch.equal(rng.hash_bits(1234, key, offset=1000), full[1000:2234])
    old = dict(rng.HASH_CHUNK)
    try:
        rng.HASH_CHUNK["cpu"] = 333
        assert torch.equal(rng.hash_bits(5000, key), full)
    finally:
        rng.HASH_CHUNK.update(old)
    assert not torch.equal(rng.hash_bits(5000, key + 1), full)


def test_hash_bits_are_uniform_and_independent():
    bits = rng.hash_bits(1 << 18, rng.tensor_seed(0, "u")).long() & 0xFFFFFFFF
    for b in range(32):  # each bit is set about half the time
        frac = float(((bits >> b) & 1).double().mean())
        assert abs(frac - 0.5) < 0.01, (b, frac)
    u = (bits >> 8).double() / 2**24
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]  # neighbours uncorrelated
    assert abs(float(corr)) < 0.01
    # keys that differ by one bit give unrelated streams, not shifted copies
    other = rng.hash_bits(1 << 18, rng.tensor_seed(0, "u") ^ 1).long() & 0xFFFFFFFF
    v = (other >> 8).double() / 2**24
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01
    assert (bits == other).double().mean() < 0.001


def test_hash_keep_mask_density_and_exact_edges():
    key = rng.tensor_seed(3, "m", "t")
    m = rng.hash_keep_mask((400, 500), 0.01, key)
    assert m.shape == (400, 500) and m.dtype == torch.bool
    assert abs(int(m.sum()) - 2000) < 5 * 44.5  # Binomial(200000, 0.01): sd ~44.5
    assert bool(rng.hash_keep_mask((10, 10), 1.0, key).all())
    assert not bool(rng.hash_keep_mask((10, 10), 0.0, key).any())
    # a smaller density keeps a subset of a larger one (same bits, lower cut)
    small, big = rng.hash_keep_mask((1000,), 0.1, key), rng.hash_keep_mask((1000,), 0.3, key)
    assert bool((small <= big).all())


@pytest.mark.parametrize("chunk", [None, 7, 333])
def test_hash_keep_mask_and_uniform_match_the_python_reference(chunk: int | None) -> None:
    # the mask compares the word's top 31 bits with keep_threshold, and the uniform is the top
    # 24 bits / 2**24, whatever the chunking; offsets across the 2**32 boundary included
    key = rng.tensor_seed(5, "m", "w")
    old = dict(rng.HASH_CHUNK)
    try:
        if chunk is not None:
            rng.HASH_CHUNK["cpu"] = chunk
        for off, n in ((0, 1000), (2**32 - 300, 600)):
            words = [rng.hash_word(key, off + i) for i in range(n)]
            for density in (0.0, 1e-9, 0.1, 0.5, 0.7, 1.0 - 1e-9):
                cut = rng.keep_threshold(density)
                ref = torch.tensor([(w >> 1) < cut for w in words])
                got = rng.hash_keep_mask((n,), density, key, offset=off)
                assert torch.equal(got, ref), (off, density)
            u_ref = torch.tensor([(w >> 8) * 2.0**-24 for w in words], dtype=torch.float32)
            assert torch.equal(rng.hash_uniform(n, key, offset=off), u_ref)
    finally:
        rng.HASH_CHUNK.update(old)
    # at the cut exactly: a density whose threshold equals an entry's top 31 bits drops that
    # entry, one step higher keeps it (an off-by-one in the comparison fails here)
    for i in (3, 500, 999):
        top31 = rng.hash_word(key, i) >> 1
        for t, kept in ((top31, False), (top31 + 1, True)):
            assert rng.keep_threshold(t / 2**31) == t
            assert bool(rng.hash_keep_mask((1000,), t / 2**31, key)[i]) == kept


def test_hash_uniform_grid():
    u = rng.hash_uniform(1 << 16, rng.tensor_seed(1, "x"))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())  # on the 2**-24 grid
    assert abs(float(u.double().mean()) - 0.5) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hash_bits_identical_on_cuda():
    key = rng.tensor_seed(11, "a")
    assert torch.equal(rng.hash_bits(70000, key), rng.hash_bits(70000, key, device="cuda").cpu())
    off = 2**32 - 3
    cpu = rng.hash_bits(10, key, offset=off)
    assert torch.equal(cpu, rng.hash_bits(10, key, offset=off, device="cuda").cpu())


@pytest.mark.parametrize("n", [0, 5, 8, 61, 4099, 200_003])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.6, 1.0])
def test_nonzero_flat_equals_nonzero_at_any_size_and_density(n: int, density: float) -> None:
    # sizes that are and are not multiples of a word (8), densities on both sides of the
    # words-first cut-over; a True in the tail past the last whole word
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    if n % 8:
        mask[-1] = True
    expected = [i for i, m in enumerate(mask.tolist()) if m]
    got = selection.nonzero_flat(mask.view(-1, 1) if n else mask)
    assert got.dtype == torch.int64
    assert got.tolist() == expected


def test_nonzero_flat_on_views_that_start_mid_word() -> None:
    base = torch.rand(1003, generator=torch.Generator().manual_seed(0)) < 0.01
    for start in (0, 3, 8, 11):
        view = base[start:]
        assert selection.nonzero_flat(view).tolist() == view.nonzero().squeeze(1).tolist()


# ---- exactness of the fast paths (the outputs are pinned bit for bit) -------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # signed zeros and NaN payloads included


def _signed_deltas(seed: int) -> list[torch.Tensor]:
    """Two weighted deltas with exact zeros of both signs and many disagreements."""
    g = torch.Generator().manual_seed(seed)
    ds = [torch.randn(5000, generator=g) for _ in range(2)]
    for d in ds:
        d[torch.rand(5000, generator=g) < 0.4] = 0.0
        d[torch.rand(5000, generator=g) < 0.2] = -0.0
    return ds


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0, 1.0], [1.0, -1.0], [0.5, 0.0]])
def test_nonzero_divisor_divides_exactly_like_replacing_zeros_by_one(weights: list[float]) -> None:
    ds = _signed_deltas(1)
    weighted = [d * w for d, w in zip(ds, weights, strict=True)]
    mixed, divisor = blend.sign_consensus_(weighted, weights)
    assert divisor is not None and bool((divisor == 0).any())
    want = mixed / divisor.clone().masked_fill_(divisor == 0, 1.0)
    got = mixed / blend.nonzero_divisor_(divisor.clone(), weights)
    assert torch.equal(_bits(got), _bits(want))
    # without the divisor, the same mixed sum
    again, none = blend.sign_consensus_(
        [d * w for d, w in zip(ds, weights, strict=True)], weights, with_divisor=False
    )
    assert none is None and torch.equal(_bits(again), _bits(mixed))


def test_weighted_sum_first_weight_one_is_bitwise_the_two_step_sum() -> None:
    a, b, c = _signed_deltas(2) + [torch.randn(5000)]
    for ws in ([1.0, 1.0], [1.0, 0.3, -2.0], [0.5, 1.0]):
        ts = [a, b, c][: len(ws)]
        want = ts[0] * ws[0]
        for x, w in zip(ts[1:], ws[1:], strict=True):
            want.add_(x, alpha=w)
        assert torch.equal(_bits(blend.weighted_sum(ts, ws)), _bits(want))
    # a first tensor of another dtype keeps its dtype, as before
    assert blend.weighted_sum([a.bfloat16(), b], [1.0, 1.0]).dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [None, 333])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_keep_is_bitwise_x_times_the_keep_mask(chunk: int | None, dtype: torch.dtype) -> None:
    x = torch.cat(_signed_deltas(3)).to(dtype).view(100, 100)
    key = rng.tensor_seed(0, "m", "w")
    old = dict(rng.HASH_CHUNK)
    try:
        if chunk is not None:
            rng.HASH_CHUNK["cpu"] = chunk
        for density, off in ((0.5, 0), (0.1, 2**32 - 5000), (0.0, 7), (1.0, 0)):
            want = x * rng.hash_keep_mask(x.shape, density, key, offset=off)
            got = rng.hash_keep(x, density, key, offset=off)
            assert got.shape == x.shape and got.dtype == dtype
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), density
            assert got.data_ptr() != x.data_ptr()
    finally:
        rng.HASH_CHUNK.update(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_is_bitwise_the_out_of_place_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(300, 70, generator=g).to(dtype), torch.randn(300, 70, generator=g).to(dtype)
    a0, b0 = a.clone(), b.clone()
    for t in (0.0, 0.3, 0.5, 1.0):
        a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
        # the angle from fixed-order float64 sums (the same whole or in row blocks)
        ab, aa, bb = (blend.stable_sum(u * v) for u, v in ((a64, b64), (a64, a64), (b64, b64)))
        cos = float((ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))
        theta = torch.arccos(torch.tensor(cos, dtype=torch.float64))
        s0 = float(torch.sin((1.0 - t) * theta) / torch.sin(theta))
        s1 = float(torch.sin(t * theta) / torch.sin(theta))
        want = a * s0 + b * s1
        got = blend.slerp(a, b, t)
        assert got.dtype == dtype and torch.equal(got, want)
        # the textbook angle (dot of the normalised vectors) agrees to float64 rounding
        dot = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1.0, 1.0))
        assert cos == pytest.approx(dot, rel=1e-12, abs=1e-15)
    assert torch.equal(a, a0) and torch.equal(b, b0)  # the inputs are not divided in place


@pytest.mark.parametrize("n", [1, 5, 16384, 16385, 100_000])
def test_stable_sum_in_pieces_equals_the_whole(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, generator=g).to(dtype)
        cuts = sorted(torch.randint(0, n + 1, (6,), generator=g).tolist())
        acc = blend.StableSum()
        for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
            acc.add(x[lo:hi])  # empty pieces and pieces shorter than a row included
        assert torch.equal(acc.total(), blend.stable_sum(x))
        scale = float(x.double().abs().sum()) + 1.0  # float32 row sums: ~1e-7 of the scale
        assert float(acc.total()) == pytest.approx(float(x.double().sum()), abs=1e-6 * scale)


def test_slerp_sums_and_weights_are_the_same_in_row_blocks(monkeypatch) -> None:
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(97, 300, generator=g), torch.randn(97, 300, generator=g)
    whole = blend.slerp_sums([(a, b)])
    monkeypatch.setattr(blend, "REDUCE_CHUNK", 1000)  # pieces inside each block too
    for rows in (1, 7, 50):
        blocks = [(a[i : i + rows], b[i : i + rows]) for i in range(0, 97, rows)]
        parts = blend.slerp_sums(blocks)
        assert all(torch.equal(x, y) for x, y in zip(parts, whole, strict=True))
        w = blend.slerp_weights(parts, 0.3)
        got = torch.cat([blend.slerp(x, y, 0.3, weights=w) for x, y in blocks])
        assert torch.equal(got, blend.slerp(a, b, 0.3))
    assert blend.slerp_weights(blend.slerp_sums([(a, 2 * a)]), 0.3).lerp  # parallel: lerp
    assert blend.slerp_weights(blend.slerp_sums([(a * 0, b)]), 0.3).lerp  # zero: lerp


def test_gram_sums_are_the_stable_sums_of_the_products_whatever_the_pieces(monkeypatch) -> None:
    # karcher's and model_stock's whole-tensor quantities: G[i, j] = sum of x_i * x_j in
    # float64, the same bits in row blocks and chunks (through the reused scratch) as whole
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(97, 300, generator=g) for _ in range(3)]
    want = torch.tensor(
        [[float(blend.stable_sum(x.double() * y.double())) for y in xs] for x in xs],
        dtype=torch.float64,
    )
    assert torch.equal(blend.gram_sums([xs]), want)
    monkeypatch.setattr(blend, "REDUCE_CHUNK", 1000)  # several chunks, a short last one
    for rows in (1, 7, 50):
        pieces = [[x[i : i + rows] for x in xs] for i in range(0, 97, rows)]
        assert torch.equal(blend.gram_sums(pieces), want)
    naive = torch.stack([torch.stack([(x.double() * y.double()).sum() for y in xs]) for x in xs])
    torch.testing.assert_close(want, naive, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_sums_are_stable_sums_of_the_float64_products(dtype, kernel, monkeypatch) -> None:
    # the pass widens into a reused scratch (with the C kernel, or torch ops): its sums are
    # those of the whole float64 products, from the stored dtype as from float32 (bf16 widens
    # exactly)
    from mergekit_rl.merge import native

    if kernel and native.library() is None:
        pytest.skip("no C compiler here")
    if not kernel:
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    g = torch.Generator().manual_seed(9)
    a, b = (torch.randn(70_001, generator=g).to(dtype) for _ in range(2))
    want = [blend.stable_sum(x.double() * y.double()) for x, y in ((a, a), (b, b), (a, b))]
    monkeypatch.setattr(blend, "REDUCE_CHUNK", 20_000)  # a short last chunk too
    for got in (blend.slerp_sums([(a, b)]), blend.slerp_sums([(a.float(), b.float())])):
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    for step in (5000, 16384, 16385, 40_000):  # rows carried across pieces
        pieces = [(a[i : i + step], b[i : i + step]) for i in range(0, a.numel(), step)]
        got = blend.slerp_sums(pieces)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_add_at_many_rounds_each_tensor_as_alone(dtype) -> None:
    # three tensors, one of them with repeats carrying 0 (OnDARE's draws past the end), their
    # bits drawn together: each tensor ends as stochastic_add_at_ with its own key leaves it
    gen = torch.Generator().manual_seed(0)
    sizes, keys = [1000, 37, 5000], [rng.tensor_seed(1, str(i)) for i in range(3)]
    flats = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    idxs = [torch.randperm(n, generator=gen)[: n // 3].sort().values for n in sizes]
    idxs[2] = torch.cat([idxs[2], torch.full((5,), sizes[2] - 1)])
    vals = [torch.randn(i.numel(), generator=gen) * 2e-3 for i in idxs]  # around an ulp
    vals[2][-5:] = 0.0
    bits = rng.hash_bits_many([i.numel() for i in idxs], keys).split([i.numel() for i in idxs])
    together = [f.clone() for f in flats]
    rounding.stochastic_add_at_many_(together, idxs, vals, bits)
    for f, g, i, v, k in zip(flats, together, idxs, vals, keys, strict=True):
        alone = f.clone()
        rounding.stochastic_add_at_(alone, i, v, k)
        assert torch.equal(g.view(torch.int16), alone.view(torch.int16))
    assert sum(int((g != f).sum()) for f, g in zip(flats, together, strict=True)) > 100


def test_sparse_draws_of_an_empty_tensor_are_empty() -> None:
    # hash_sparse_keep(0, ...) clamped its draws to index -1 (numel - 1): a write there lands
    # on another tensor's memory
    idx, valid = rng.hash_sparse_keep(0, 0.01, key=3)
    assert idx.numel() == 0 and valid.numel() == 0 and idx.dtype == torch.int64
    assert rng.sparse_draws(0, 0.5) == 0
    # empty segments first, in the middle and last: the others draw what they draw alone
    for numels in ([0, 50, 0, 7, 0], [0], [0, 0], [30, 0]):
        keys = [rng.tensor_seed(2, str(i)) for i in range(len(numels))]
        idx, valid, draws = rng.hash_sparse_keep_many(numels, 0.3, keys)
        assert draws == [rng.sparse_draws(n, 0.3) for n in numels]
        parts = zip(idx.split(draws), valid.split(draws), numels, keys, strict=True)
        for i, v, n, k in parts:
            want = rng.hash_sparse_keep(n, 0.3, k)
            assert torch.equal(i, want[0]) and torch.equal(v, want[1]), (numels, n)
            assert ((i >= 0) & (i < max(n, 1))).all()


@pytest.mark.parametrize("density", [1e-6, 1.5e-6, 4e-6, 9.9e-5, rng.GAP_FLOAT32_MIN_DENSITY])
def test_geometric_gaps_are_exact_at_the_smallest_densities(density: float) -> None:
    # at reserve_p 1e-6 the table holds ~2.2e7 cuts: gaps above 2**24, where a float32 estimate
    # is no longer an integer and was off by one; every u next to a cut must find its own gap
    cuts = rng.gap_cuts(density)
    last = cuts.numel() - 2
    near = torch.arange((1 << 24) - 3000, (1 << 24) + 3000)  # around 2**24, where there are
    js = torch.cat(
        [torch.arange(1, 2000), near[near <= last], torch.arange(last - 3000, last + 1),
         torch.randint(1, last, (20_000,), generator=torch.Generator().manual_seed(0))]
    )  # fmt: skip
    d = cuts[js]
    u = torch.cat([d, d - 1, d + 1, torch.tensor([0, 1, (1 << 31) - 1])]).clamp(0, (1 << 31) - 1)
    want = cuts.numel() - torch.searchsorted(cuts.flip(0), u, right=True)  # 1 + max{D_j > u}
    got = rng.geometric_gaps(u, density)
    assert torch.equal(got, want), int((got != want).sum())
    assert last < 1 << 24 or int(want.max()) > 1 << 24
