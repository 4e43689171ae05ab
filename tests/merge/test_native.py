"""The C host kernels (`merge/native.py`) against their pure-torch fallbacks and by hand."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mergekit_rl.merge import blend, native, rng, rounding, selection, sparsify
from tests.conftest import load_state

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


def fallback(monkeypatch) -> None:
    monkeypatch.setattr(native, "usable", lambda *tensors: False)


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch) -> str:
    """Runs a test on the C kernels (skipped without a compiler), then on the torch paths."""
    if request.param == "native" and native.library() is None:
        pytest.skip("no C compiler here")
    if request.param == "torch":
        fallback(monkeypatch)
    return request.param


def both_paths(monkeypatch) -> Iterator[str]:
    """For comparing the two in one test: yields "native" (where the library exists), then
    switches to the torch paths and yields "torch"."""
    if native.library() is not None:
        yield "native"
    fallback(monkeypatch)
    yield "torch"


@needs_native
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 3_000_001])
@pytest.mark.parametrize("threads", [1, 3])
def test_at_least_equals_abs_compare_nonzero(n: int, threads: int, monkeypatch) -> None:
    monkeypatch.setattr(native, "PARALLEL_MIN", 1000)  # several ranges even for small n
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=gen)
        if n >= 7:  # the edges: -0.0, +0.0, NaN, +-inf, and values exactly at the bound
            x[:7] = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1.5, -1.5])
        for bound in (0.0, 1.5, 2.5, float("inf")):
            expected = (x.abs() >= bound).nonzero().squeeze(1)
            got = native.at_least(x, bound, cap=n + 1)
            assert got is not None and torch.equal(got[0], expected), bound
            assert torch.equal(got[1], x[expected].abs())
            if expected.numel() > 0:  # more than cap: None
                assert native.at_least(x, bound, cap=expected.numel() - 1) is None
                assert torch.equal(native.at_least(x, bound, cap=expected.numel())[0], expected)
    finally:
        torch.set_num_threads(1)


@needs_native
def test_positions_is_a_sorted_lookup() -> None:
    keys = torch.tensor([2, 5, 9, 10, 40], dtype=torch.int64)
    queries = torch.tensor([0, 2, 3, 9, 10, 11, 40, 41], dtype=torch.int64)
    assert native.positions(keys, queries).tolist() == [-1, 0, -1, 2, 3, -1, 4, -1]
    assert native.positions(keys, queries[:0]).numel() == 0


def test_sorted_positions_and_indices_at_least_on_both_paths(path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randperm(100_000, generator=gen)[:3000].sort().values
    queries = torch.cat([keys[::3], torch.randint(0, 100_000, (2000,), generator=gen)])
    queries = queries.unique()
    pos = selection.sorted_positions(keys, queries)
    where = {int(k): i for i, k in enumerate(keys)}
    assert pos.tolist() == [where.get(int(q), -1) for q in queries]
    assert selection.sorted_positions(keys[:0], queries).eq(-1).all()
    x = torch.randn(50_000, generator=gen)
    idx, mag = selection.indices_at_least(x, 2.0, cap=50_000)
    assert torch.equal(idx, (x.abs() >= 2.0).nonzero().squeeze(1))
    assert torch.equal(mag, x[idx].abs())
    assert selection.indices_at_least(x, 2.0, cap=10) is None
    half = x.to(torch.bfloat16)  # other dtypes take the torch path
    expected = (half.float().abs() >= 2.0).nonzero().squeeze(1)
    assert torch.equal(selection.indices_at_least(half, 2.0, cap=50_000)[0], expected)


def test_no_compiler_means_no_library(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert not native.usable(torch.zeros(3))
        monkeypatch.delenv("CC")
        monkeypatch.setenv("RLMERGE_NATIVE", "0")
        assert native.library() is None  # switched off
    finally:
        native.library.cache_clear()


@needs_native
def test_build_goes_to_the_cache_once(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "mergekit_rl").glob("native-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None  # loaded, not rebuilt
        assert built[0].stat().st_mtime_ns == stamp
        assert not [p for p in (tmp_path / "mergekit_rl").iterdir() if p.is_dir()]  # no temp left
    finally:
        native.library.cache_clear()


@needs_native
def test_native_hash_equals_the_torch_hash_and_the_reference(monkeypatch) -> None:
    monkeypatch.setattr(native, "PARALLEL_MIN", 1000)
    torch.set_num_threads(3)
    try:
        key = rng.tensor_seed(5, "model", "w")
        cases = [(100_003, 0), (5000, 2**32 - 1234), (7, 3 * 2**32 + 11)]  # one crosses 2**32
        fast = [rng.hash_bits(n, key, offset=off) for n, off in cases]
        many = rng.hash_bits_many([10, 0, 70_001], [key, key + 1, key + 2])
    finally:
        torch.set_num_threads(1)
    for (n, off), got in zip(cases, fast, strict=True):  # the first and last 50 by hand
        some = sorted(set(range(min(n, 50))) | set(range(max(0, n - 50), n)))
        words = (got.long() & 0xFFFFFFFF)[some].tolist()
        assert words == [rng.hash_word(key, off + i) for i in some], (n, off)
    fallback(monkeypatch)
    for (n, off), got in zip(cases, fast, strict=True):
        assert torch.equal(got, rng.hash_bits(n, key, offset=off)), (n, off)
    assert torch.equal(many, rng.hash_bits_many([10, 0, 70_001], [key, key + 1, key + 2]))


@needs_native
@pytest.mark.parametrize("case", ["smooth", "tied", "all_equal", "zeros"])
def test_top_k_positions_keeps_ties_in_index_order(case: str) -> None:
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(40_000, generator=gen).abs()
    if case == "tied":
        v = v.round(decimals=1)  # thousands of ties at every value
    if case == "all_equal":
        v = torch.full((40_000,), 0.5)
    if case == "zeros":
        v = torch.zeros(40_000)
        v[[5, 17]] = 1.0
    for k in [1, 2, 7, 13_333, 39_999, 40_000]:
        got = native.top_k_positions(v, k)
        # by hand: a stable descending sort
        expected = torch.sort(v, descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(got, expected), k


def test_top_magnitude_indices_on_both_paths(path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for x in (
        torch.randn(300_000, generator=gen),
        torch.randn(300_000, generator=gen).round(decimals=2),
    ):
        for k in (1, 3000, 70_000):
            expected = torch.sort(x.abs(), descending=True, stable=True).indices[:k].sort().values
            assert torch.equal(selection.top_magnitude_indices(x, k), expected), k
            assert torch.equal(selection.top_indices_of_magnitudes(x.abs(), k), expected), k


@pytest.mark.parametrize("scale", [1e-4, 2.0])
def test_stochastic_add_at_is_the_same_on_both_paths(scale: float, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    idx = torch.randperm(n, generator=gen)[:5000].sort().values
    # 1e-4: mostly far below half an ulp; 2.0: sums that cross zero or change binade, where
    # new - old is not a bf16 number (the torch path must still write new exactly)
    val = torch.randn(5000, generator=gen) * scale
    # repeats that carry 0 (OnDARE's draws past the end): they must leave the entry alone
    idx = torch.cat([idx, torch.full((7,), n - 1)])
    val = torch.cat([val, torch.zeros(7)])
    key = rng.tensor_seed(3, "w")
    results = []
    for _ in both_paths(monkeypatch):
        flat = base.clone()
        rounding.stochastic_add_at_(flat, idx, val, key)
        results.append(flat)
    # by hand: stochastic_round of each sum, the hash bit of element j of idx for entry idx[j]
    expected = base.clone()
    expected[idx[:5000]] = rounding.stochastic_round(
        base[idx[:5000]].float() + val[:5000], torch.bfloat16, key
    )
    for flat in results:
        assert torch.equal(flat.view(torch.int16), expected.view(torch.int16))
    moved = (results[0] != base).sum()
    assert 0 < moved <= 5000  # some sums rounded up or down to a neighbour (1e-4: most stayed)
    if scale == 1e-4:
        assert moved < 1000


def test_hash_masks_and_uniforms_are_the_same_on_both_paths(monkeypatch) -> None:
    key = rng.tensor_seed(9, "m", "t")
    shape, n = (300, 1001), 300 * 1001
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in both_paths(monkeypatch):
        runs.append(
            (
                rng.hash_keep_mask(shape, 0.3, key, offset=5),
                rng.hash_keep(x, 0.3, key),
                rng.hash_uniform(n, key, offset=2**32 - 1000),  # across the 2**32 boundary
            )
        )
    for a, b in zip(runs[0], runs[-1], strict=True):
        assert torch.equal(a, b)
    mask, kept, u = runs[0]
    words = (rng.hash_bits(50, key, offset=5).long() & 0xFFFFFFFF) >> 1
    assert mask.reshape(-1)[:50].tolist() == (words < rng.keep_threshold(0.3)).tolist()
    assert torch.equal(kept, x * rng.hash_keep_mask(shape, 0.3, key))
    assert float(u.min()) >= 0 and float(u.max()) < 1


# the guard test runs in a child process: an out-of-bounds write may segfault, which must fail
# the test rather than end pytest
GUARD_SCRIPT = r"""
import torch
from mergekit_rl.merge import blend, native, rng, rounding, selection, sparsify
from tests.conftest import load_state

assert native.library() is not None
flat = torch.zeros(8, dtype=torch.bfloat16)
val = torch.ones(3)
for bad in ([0, 1, -1], [0, 8, 2], [-(1 << 40), 0, 1]):
    idx = torch.tensor(bad, dtype=torch.int64)
    try:
        native.add_at_bf16_rounded_(flat, idx, val, rng._chunk_words(5, 0))
    except IndexError as e:
        assert "outside [0, 8)" in str(e), e
    else:
        raise SystemExit(f"no error for {bad}")
    assert torch.equal(flat, torch.zeros(8, dtype=torch.bfloat16)), "written before the check"
    try:  # the primitive the optimizer calls
        rounding.stochastic_add_at_(flat, idx, val, 5)
    except IndexError:
        pass
    else:
        raise SystemExit(f"stochastic_add_at_: no error for {bad}")
lib = native.library()
out = torch.empty(2, dtype=torch.int64)
work = torch.empty(3)
v = torch.tensor([1.0, float("nan"), 2.0])
for k in (0, 4, -1):
    assert lib.top_k_positions(v.data_ptr(), 3, k, work.data_ptr(), out.data_ptr()) == -1
print("guarded")
"""


@needs_native
def test_the_bf16_add_kernel_refuses_out_of_range_indices_without_writing() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "guarded" in done.stdout, (done.returncode, done.stderr)


def test_the_rounded_add_keeps_inf_and_nan_on_both_paths(monkeypatch) -> None:
    # weights: +-inf and NaN (left as they are), finite ones; updates: ordinary, NaN with the
    # payload whose integer add overflowed (0x7FFFFFFF, and the negative 0xFFFFFFFF), +-inf
    bf16 = torch.bfloat16
    inf, nan = math.inf, math.nan
    base = torch.tensor([inf, -inf, nan, 1.0, -2.0, 3.0, 0.5, 1.0, 4.0], dtype=bf16)
    val = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, inf, -inf])
    payloads = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    val[3:6] = payloads
    val[6] = 0.25
    idx = torch.arange(9)
    results = []
    for _ in both_paths(monkeypatch):
        for key in range(20):  # whatever the random bits
            flat = base.clone()
            rounding.stochastic_add_at_(flat, idx, val, key)
            results.append(flat.view(torch.int16))
    for got in results:
        assert torch.equal(got, results[0])
    got = results[0].view(bf16).float()
    assert got[0] == inf and got[1] == -inf and got[2].isnan()  # weights left as they are
    assert got[3:6].isnan().all()  # NaN updates give NaN, never +-0
    assert got[7] == inf and got[8] == -inf
    assert results[0][3] == 0x7FC0  # torch's quiet NaN on both paths
    # the dense rounded write (weight decay, dense pushes) and the rounding itself
    x = torch.tensor([inf, -inf, 1.5, 2.0, 3.0], dtype=torch.float32)
    x[2:] = payloads
    for key in range(20):
        r = rounding.stochastic_round(x, bf16, key).float()
        assert r[0] == inf and r[1] == -inf and r[2:].isnan().all(), r


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_delta_magnitude_cuts_equal_on_both_paths_and_the_reference(
    rows: int, threads: int, monkeypatch
) -> None:
    # bf16-valued inputs: many exact ties, and an all-zero task vector (every entry ties); the
    # cuts must equal magnitude_cut of the whole task vector, k = 0 and k = n included
    monkeypatch.setattr(native, "PARALLEL_MIN", 100)  # several histogram ranges
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(rows)
        base = (torch.randn(64, 50, generator=gen) * 0.02).bfloat16().float()
        xs = [(base + torch.randn(64, 50, generator=gen) * 1e-3).bfloat16().float() for _ in "ab"]
        xs.append(base.clone())  # an all-zero task vector: every entry ties
        n = base.numel()

        def blocks():
            for s in range(0, 64, rows):
                yield [base[s : s + rows], *(x[s : s + rows] for x in xs)]

        for path in both_paths(monkeypatch):
            for ks in ([int(0.3 * n), 1, n // 2], [0, n, n - 1]):
                cuts = selection.delta_magnitude_cuts(blocks, n, ks)
                for i, k in enumerate(ks):
                    want = selection.magnitude_cut(xs[i] - base, n, k)
                    c = cuts[i]
                    assert (c.threshold, c.ties_left, c.ties_total) == (
                        want.threshold,
                        want.ties_left,
                        want.ties_total,
                    ), (path, i, k)
    finally:
        torch.set_num_threads(1)


@needs_native
@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (7, 300), (40, 2048)])
@pytest.mark.parametrize("threads", [1, 3])
def test_rank_rows_equals_a_stable_sort_and_scatter(shape, threads: int, monkeypatch) -> None:
    # keys as DELLA makes them (|x| as int32 bits): ties, zeros, 1-bit and 31-bit differences,
    # NaN's bits (above inf's) and rows whose keys share their high bytes (skipped digits)
    monkeypatch.setattr(native, "PARALLEL_MIN", 64)  # several row ranges even for small rows
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(shape[1])
        x = (torch.randn(shape, generator=gen) * 0.02).bfloat16().float()  # many exact ties
        if shape[0] >= 3 and shape[1] >= 8:
            x[0, :8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1e-45, 1.0, 1.0, 3e38])
            x[1] = 1.0 + torch.arange(shape[1]) * 2.0**-23  # one key per low-bit step
            x[2] = 0.5  # a row of one value: every digit skipped
        keys = x.abs().view(torch.int32)
        order = torch.sort(keys, dim=-1, stable=True).indices
        want = torch.empty_like(order).scatter_(-1, order, torch.arange(shape[1]).expand(shape))
        assert torch.equal(native.rank_rows(keys.contiguous()), want)
    finally:
        torch.set_num_threads(1)


def _counted_blocks(tensors: list[torch.Tensor], rows: int, passes: list[int]):
    """blocks() of [base, x_1, ...] in row blocks, counting the passes over them."""

    def blocks():
        passes.append(1)
        for s in range(0, tensors[0].shape[0], rows):
            yield [t[s : s + rows] for t in tensors]

    return blocks


def _assert_cuts_equal_the_reference(cuts, base, xs, ks) -> None:
    for c, x, k in zip(cuts, xs, ks, strict=True):
        want = selection.magnitude_cut(x - base, base.numel(), k)
        assert (c.threshold, c.ties_left, c.ties_total) == (
            want.threshold,
            want.ties_left,
            want.ties_total,
        )


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_delta_cuts_take_one_pass_when_the_sampled_window_holds_the_kth(
    threads: int, monkeypatch
) -> None:
    monkeypatch.setattr(native, "PARALLEL_MIN", 5000)  # several ranges, each its own window part
    torch.set_num_threads(threads)
    try:
        base, xs = _ties_inputs(3, (300, 130), seed=4)
        n = base.numel()
        for ks in ([n // 2, n // 10, 1], [n - 1, int(0.9 * n), n // 3]):
            passes: list[int] = []
            cuts = selection.delta_magnitude_cuts(_counted_blocks([base, *xs], 70, passes), n, ks)
            assert len(passes) == 1, ks
            _assert_cuts_equal_the_reference(cuts, base, xs, ks)
    finally:
        torch.set_num_threads(1)


@needs_native
def test_delta_cuts_take_a_second_pass_when_the_guess_misses_or_overflows(monkeypatch) -> None:
    # the first block (the sample) differs from the rest. Model 0: tiny task vectors there,
    # large ones after, so the window guessed misses the k-th largest of the whole tensor.
    # Model 1: |N(0, 1)| there, 0.25 + tiny after, k at 80%: the window around 0.25 holds
    # the k-th largest but far more of the later blocks' entries than planned (overflow).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 100, generator=g)
    x0 = base + torch.randn(400, 100, generator=g) * 1e-3
    x0[50:] = base[50:] + torch.randn(350, 100, generator=g)
    x1 = base + torch.randn(400, 100, generator=g)
    x1[50:] = base[50:] + 0.25 + torch.rand(350, 100, generator=g) * 1e-3
    n = base.numel()
    ks = [n // 4, int(0.8 * n)]
    scans = []
    real = native.delta_hist_window
    monkeypatch.setattr(native, "delta_hist_window", lambda *a: scans.append(r := real(*a)) or r)
    passes: list[int] = []
    cuts = selection.delta_magnitude_cuts(_counted_blocks([base, x0, x1], 50, passes), n, ks)
    assert len(passes) == 2
    assert any(bits is None for _, bits in scans[1::2])  # model 1 overflowed
    _assert_cuts_equal_the_reference(cuts, base, [x0, x1], ks)


# ---- TIES' merge pass -----------------------------------------------------------------------------


def _ties_inputs(n: int, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, list]:
    """A bf16-valued base and n fine-tunes (float32): task vectors with many exact ties at any
    threshold, exact zeros, and -0.0 deltas (x = -0.0 over a +0.0 base entry)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    base.view(-1)[::11] = 0.0
    xs = []
    for i in range(n):
        x = (base + torch.randn(shape, generator=g) * 1e-3).bfloat16().float()
        x.view(-1)[i::5] = base.view(-1)[i::5]  # delta +-0 (and -0.0 where base is -0.0)
        x.view(-1)[::11] = -0.0  # over base +0.0: delta -0.0
        xs.append(x)
    return base, xs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _ties_both_paths(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    densities: list[float],
    weights: list[float],
    normalize: bool,
    lam: float,
    rows: int,
) -> tuple[list, list, list]:
    """(native outputs, torch outputs, [cut states after each block, per path]) of
    `blend.ties_merge` over row blocks of `rows` rows, each path with its own copy of the
    whole-tensor cuts; fails if the C kernel did not run."""
    numel = base.numel()
    cuts = [
        selection.magnitude_cut(x - base, numel, sparsify.magnitude_k(d, numel))
        for x, d in zip(xs, densities, strict=True)
    ]
    results, states, calls = {}, {}, []
    real = native.ties_merge
    with pytest.MonkeyPatch.context() as mp:  # the torch path only until this returns
        mp.setattr(native, "ties_merge", lambda *a: calls.append(1) or real(*a))
        for path in both_paths(mp):
            mine = [copy.copy(c) for c in cuts]
            outs, seen = [], []
            for s in range(0, base.shape[0], rows):
                b, xb = base[s : s + rows], [x[s : s + rows] for x in xs]
                outs.append(blend.ties_merge(b, xb, mine, weights, normalize=normalize, lam=lam))
                seen.append([(c.ties_left, c.ties_total) for c in mine])
            results[path], states[path] = outs, seen
    assert calls, "the C kernel never ran"
    return results["native"], results["torch"], [states["native"], states["torch"]]


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [64, 7])  # whole, and row blocks whose ties span blocks
@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (True, 0.7), (False, 1.0), (False, 1.3)])
def test_ties_merge_is_bitwise_the_torch_steps(
    n: int, rows: int, normalize: bool, lam: float, monkeypatch
) -> None:
    monkeypatch.setattr(native, "PARALLEL_MIN", 300)  # several ranges per block: quota split
    torch.set_num_threads(3)
    try:
        base, xs = _ties_inputs(n, (64, 37), seed=n)
        for densities, weights in (
            ([0.3, 0.5, 0.05, 1.0], [1.0, 0.6, 0.8, 0.5]),  # all > 0: the divisor clamp
            ([0.5, 0.2, 0.9, 0.01], [0.7, 0.0, -0.4, 1.2]),  # a zero and a negative weight
            ([0.0, 0.6, 0.45, 0.3], [-1.0, 1.0, 0.3, 0.3]),  # density 0: nothing kept
        ):
            got, want, (s_got, s_want) = _ties_both_paths(
                base, xs, densities[:n], weights[:n], normalize, lam, rows
            )
            for g, w in zip(got, want, strict=True):
                assert torch.equal(_bits(g), _bits(w)), (densities, weights)
            assert s_got == s_want  # the cuts consumed their ties alike, block by block
    finally:
        torch.set_num_threads(1)


@needs_native
def test_ties_merge_cuts_that_keep_only_some_ties_really_do(monkeypatch) -> None:
    # the inputs above make quota cuts (ties_left < ties_total) at these densities: the case
    # where the two paths could disagree on which ties are kept
    base, xs = _ties_inputs(2, (64, 37), seed=2)
    cut = selection.magnitude_cut(xs[0] - base, base.numel(), int(0.3 * base.numel()))
    assert 0 < cut.ties_left < cut.ties_total
    assert selection.kernel_cut(cut).mode == 3


@needs_native
def test_ties_merge_with_nan_and_inf_inputs(monkeypatch) -> None:
    base, xs = _ties_inputs(3, (40, 29), seed=9)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-42])
    for i, x in enumerate(xs):
        x.view(-1)[7 * i : 7 * i + 6] = specials.roll(i)
        x.view(-1)[500 + i] = float("inf")  # the same entry in another model: inf - inf later
    base.view(-1)[900:906] = specials
    for normalize, lam in ((True, 1.0), (True, 0.5), (False, 2.0)):
        got, want, (s_got, s_want) = _ties_both_paths(
            base, xs, [0.4, 0.6, 0.2], [1.0, -0.5, 0.25], normalize, lam, 9
        )
        for g, w in zip(got, want, strict=True):
            assert torch.equal(_bits(g), _bits(w))
        assert s_got == s_want


@needs_native
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("weights", [[0.3, 0.7, 1.0, 2.0], [1.0, 0.0, -0.5, 0.2]])
@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (True, 0.9), (False, 1.0), (False, 0.4)])
def test_ties_consensus_is_bitwise_the_torch_steps(
    n: int, weights: list[float], normalize: bool, lam: float, monkeypatch
) -> None:
    # the weighted deltas of dare_ties / della / breadcrumbs_ties: dropped entries (+-0.0),
    # exact cancellations between models, and odd sizes (a partial last chunk)
    monkeypatch.setattr(native, "PARALLEL_MIN", 1000)
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(n)
        base = torch.randn(3001, generator=g)
        base[::13] = -0.0
        ds = [
            torch.randn(3001, generator=g) * (torch.rand(3001, generator=g) > 0.5) for _ in range(n)
        ]
        for d in ds:
            d[::7] = -0.0
        if n > 1:
            ds[1][::3] = -ds[0][::3]  # the sum is exactly 0: + is elected
        weights = weights[:n]
        weighted = [d * w for d, w in zip(ds, weights, strict=True)]
        outs = []
        for _ in both_paths(monkeypatch):
            outs.append(
                blend.ties_consensus_(
                    [d.clone() for d in weighted], weights, base, normalize=normalize, lam=lam
                )
            )
        assert len(outs) == 2 and torch.equal(_bits(outs[0]), _bits(outs[1]))
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_ties_primitives_write_into_a_given_buffer(path: str, monkeypatch) -> None:
    # a caller's pooled buffer: the result is that buffer, on both paths, with the same bits
    if path == "native" and native.library() is None:
        pytest.skip("no C compiler here")
    base, xs = _ties_inputs(2, (30, 41), seed=5)
    cuts = [selection.magnitude_cut(x - base, base.numel(), 500) for x in xs]
    want = blend._ties_merge_torch(
        base, xs, [copy.copy(c) for c in cuts], [0.6, 0.4], True, 0.8, None
    )
    tail_want = blend._consensus_torch([x - base for x in xs], [0.6, 0.4], base, False, 1.0, None)
    if path == "torch":
        fallback(monkeypatch)
    buf = torch.full_like(base, float("nan"))
    got = blend.ties_merge(base, xs, cuts, [0.6, 0.4], normalize=True, lam=0.8, out=buf)
    assert got is buf and torch.equal(_bits(buf), _bits(want))
    buf = torch.full_like(base, float("nan"))
    tail = blend.ties_consensus_([x - base for x in xs], [0.6, 0.4], base, normalize=False, out=buf)
    assert tail is buf and torch.equal(_bits(buf), _bits(tail_want))


@needs_native
def test_ties_kernels_are_probed_against_torch(monkeypatch) -> None:
    assert blend._ties_kernels_agree.__wrapped__()
    # a kernel that rounds one step differently (here: the final add) is caught and unused
    real = native.ties_merge

    def off_by_one_ulp(out, *args):
        met = real(out, *args)
        out.view(torch.int32).add_(1)
        return met

    monkeypatch.setattr(native, "ties_merge", off_by_one_ulp)
    assert not blend._ties_kernels_agree.__wrapped__()


TIES_RECIPES = {
    # a negative and a zero weight; normalize (the default) with lambda
    "ties": "merge_method: ties\nparameters: {lambda: 0.9}\n",
    "ties_floor": "merge_method: ties\nparameters: {normalize: false}\n",
    "dare_ties": "merge_method: dare_ties\nparameters: {rescale: false, normalize: true}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nparameters: {gamma: 0.05}\n",
}


def _ties_recipe(tmp_path: Path, fam: dict[str, Path], kind: str) -> Path:
    models = [("sft1", 1.0, 0.4), ("sft2", -0.5, 0.6), ("rlhf", 0.0, 0.3)]
    body = TIES_RECIPES[kind] + f"base_model: {fam['base']}\nseed: 3\nmodels:\n"
    for name, w, d in models:
        body += f"  - model: {fam[name]}\n    parameters: {{weight: {w}, density: {d}}}\n"
    path = tmp_path / f"{kind}.yaml"
    path.write_text(body)
    return path


def _file_bytes(out: Path) -> dict[str, tuple[torch.dtype, bytes]]:
    """Every output tensor's dtype and bytes (the headers' metadata differs between runs)."""
    state = load_state(out)
    return {
        k: (t.dtype, t.contiguous().view(torch.uint8).numpy().tobytes()) for k, t in state.items()
    }


@needs_native
@pytest.mark.parametrize("kind", list(TIES_RECIPES))
def test_ties_recipes_write_the_same_bytes_with_and_without_the_kernels(
    kind: str, tied_family: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    from mergekit_rl.cli.app import app
    from typer.testing import CliRunner

    from mergekit_rl.engine import RunOptions
    from mergekit_rl.ops import WriteOptions
    from mergekit_rl.recipe.run import MergeOptions, merge_file

    recipe = _ties_recipe(tmp_path, tied_family, kind)
    calls = []
    real_merge, real_tail = native.ties_merge, native.ties_consensus
    monkeypatch.setattr(native, "ties_merge", lambda *a: calls.append(1) or real_merge(*a))
    monkeypatch.setattr(native, "ties_consensus", lambda *a: calls.append(2) or real_tail(*a))

    def cli(out: Path, use_native: str) -> dict[str, bytes]:
        monkeypatch.setenv("RLMERGE_NATIVE", use_native)
        native.library.cache_clear()
        result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(out), "--quiet"])
        assert result.exit_code == 0, result.stderr
        return _file_bytes(out)

    def blocks(out: Path, block_elems: int) -> dict[str, bytes]:
        run = RunOptions(progress="none", block_elems=block_elems)
        merge_file(recipe, out, MergeOptions(write=WriteOptions(run=run)))
        return _file_bytes(out)

    try:
        want = cli(tmp_path / "torch", "0")
        assert want and not calls
        assert cli(tmp_path / "native", "1") == want
        assert blend._ties_kernels_agree()  # (else the kernels ran only in the probe)
        assert calls.count(1 if kind.startswith("ties") else 2) > 0
        # the 256 x 64 embedding in row blocks of 15 rows: cuts consumed across blocks
        assert blocks(tmp_path / "blocks", 1000) == want
        # whole tensors above this size take their cuts from the C select (no delta tensors)
        monkeypatch.setattr(selection, "SMALL_SELECT", 1000)
        assert blocks(tmp_path / "select", 1 << 30) == want
    finally:
        native.library.cache_clear()


def test_native_hash_keep_is_bitwise_the_torch_path(monkeypatch) -> None:
    """The one-loop drop equals the torch path's words, compare and multiply bit for bit: -0.0,
    NaN and inf entries, several thread ranges, and spans across a 2**32 block."""
    monkeypatch.setattr(native, "PARALLEL_MIN", 1000)
    x = torch.randn(300, 1001, generator=torch.Generator().manual_seed(3))
    x.view(-1)[:6] = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), -1.0])
    key = rng.tensor_seed(4, "m", "t")
    cases = [(0.3, 0), (0.9, 2**32 - 150_000), (0.0, 5), (0.5, 2 * 2**32 + 3)]
    torch.set_num_threads(3)
    try:
        fast = [rng.hash_keep(x, d, key, offset=off) for d, off in cases]
    finally:
        torch.set_num_threads(1)
    fallback(monkeypatch)
    for (d, off), got in zip(cases, fast, strict=True):
        want = rng.hash_keep(x, d, key, offset=off)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (d, off)
    assert int(fast[0].view(-1)[0].view(torch.int32)) == int(torch.tensor(-0.0).view(torch.int32))
