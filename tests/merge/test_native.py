"""The C host kernels (`merge/native.py`) against their pure-torch fallbacks and by hand."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from mergekit_rl.merge import native, rng, rounding, selection

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
from mergekit_rl.merge import native, rng, rounding, selection

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
