"""Exact magnitude selection: radix select, magnitude cuts and top-k by |x|.

Non-negative float32 values order like their int32 bit patterns, so the k-th largest |x| is
found by a two-level radix select with integer ops only (bincount and cumsum): a histogram of
the top 16 bits finds the bucket holding the k-th value, a histogram of the low 16 bits inside
that bucket finds the value itself, with exact counts of the entries above and equal to it.
It works on any device (no sort, no kthvalue) and on a tensor streamed in blocks (two passes).
Every selection keeps exactly k entries, ties with the k-th magnitude taken in index order:
TIES / DELLA pruning (`magnitude_cut`, `magnitude_cuts`, `apply_cut_`), OnTIES' top-k on the
host (`top_magnitude_indices`), without host syncs (`top_magnitude_indices_static`) and on
one FSDP shard of a tensor (`top_magnitude_indices_sharded`).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import native

_HI_BINS = 1 << 15  # |x| bits >> 16 is in [0, 2**15): the sign bit is 0
_LO_BINS = 1 << 16
# devices where the bucket is finished with kthvalue (measured faster on the CPU); elsewhere a
# histogram of the low 16 bits (no sort on accelerators)
KTHVALUE_BUCKET_DEVICES = ("cpu",)


@dataclass
class MagnitudeCut:
    """Which entries of a tensor are its top k by |x|, ties taken in index order.

    Keep every |x| > threshold, and the first `ties_left` entries with |x| == threshold (in
    index order). `ties_left` counts down as `apply_cut_` consumes blocks, so blocks of one
    tensor must be applied in index order. threshold None keeps everything, inf nothing.
    """

    threshold: float | None
    ties_left: int  # entries equal to threshold still to keep
    ties_total: int  # entries equal to threshold not yet seen by apply_cut_
    tie_index: Tensor | None = None  # flat indices of all the ties, when found by the select
    numel: int = 0  # of the whole tensor: tie_index is used when apply_cut_ gets it in one piece


def magnitude_bits(x: Tensor) -> Tensor:
    """|x| of a float32 tensor as int32 bit patterns (ordered like the magnitudes), flat."""
    return x.reshape(-1).float().view(torch.int32) & 0x7FFFFFFF


def magnitude_words(x: Tensor) -> tuple[Tensor, Tensor]:
    """(bits, hi) of a float32 block, flat: the int32 bits of |x| (`magnitude_bits`) and their
    top 16 bits (the radix select's first digit, in [0, 2**15)).

    On a little-endian host the top half of each int32 word is its second int16, so hi is a
    strided view of |x| made contiguous: 40% cheaper than a mask and a shift over int32 words,
    and half the memory. Elsewhere (accelerators, big-endian hosts) the plain integer ops.
    """
    if x.device.type == "cpu" and sys.byteorder == "little":
        mag = x.reshape(-1).float().abs()  # |x|: its bits are x's with the sign bit cleared
        return mag.view(torch.int32), mag.view(torch.int16)[1::2].contiguous()
    bits = magnitude_bits(x)
    return bits, bits >> 16


def _top_bin(hist: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor]:
    """(bin b holding the k-th largest entry of a histogram, entries in bins above b), for
    1 <= k <= hist.sum(); both 0-dim int64 tensors, found without a host sync.

    With c the running count, entries in bins >= b are total - c[b - 1], at least k exactly
    while c[b - 1] <= total - k; c never decreases, so b is the number of bins with
    c <= total - k, and the entries above b are total - c[b]. On the host, with k a number,
    numpy does it (a binary search; torch would hand each op on 2**15 bins to its threads)."""
    if hist.device.type == "cpu" and not isinstance(k, Tensor):
        b_, higher_ = _top_bin_host(np.cumsum(hist.numpy()), k)
        return torch.tensor(b_), torch.tensor(higher_)
    c = hist.cumsum(0)  # [bins]
    total = c[-1]
    b = (c <= total - k).sum()
    higher = total - c.index_select(0, b.view(1)).squeeze(0)  # (x[0-dim tensor] would sync)
    return b, higher


def _top_bin_host(c: np.ndarray, k: int) -> tuple[int, int]:
    """`_top_bin` from the running count c of a host histogram (the same rule), as ints."""
    total = int(c[-1])
    b = int(np.searchsorted(c, total - k, side="right"))  # bins with c <= total - k
    return b, total - int(c[b])


def radix_select(blocks: Callable[[], Iterable[Tensor]], k: int) -> tuple[int, int, int]:
    """The k-th largest |x| over a float32 tensor given as blocks, exactly, with its ties.

    blocks() yields the tensor's pieces (any shapes); it is called once for a single block and
    twice otherwise (the second pass collects the bucket). Returns (bits of the k-th largest
    |x| as an int, entries with |x| above it, entries equal to it); 1 <= k <= numel. One host
    sync on accelerators whatever the number of blocks (two on the CPU, see below).
    """
    kth_bits, n_above, n_equal, _ = _radix_select(blocks, k)
    return kth_bits, n_above, n_equal


def _radix_select(
    blocks: Callable[[], Iterable[Tensor]], k: int
) -> tuple[int, int, int, Tensor | None]:
    """`radix_select`, plus the flat indices of the ties when there was a single block."""
    hist, cached, n_blocks = None, None, 0
    for blk in blocks():
        bits, hi = magnitude_words(blk)
        h = torch.bincount(hi, minlength=_HI_BINS)
        hist = h if hist is None else hist.add_(h)
        cached, n_blocks = (bits, hi), n_blocks + 1
    assert hist is not None
    bucket, n_higher = _top_bin(hist, k)
    where = None
    if n_blocks == 1:  # one block: reuse its bits, and remember where the bucket's entries are
        bits, hi = cached  # type: ignore[misc]
        where = (hi == bucket).nonzero().squeeze(1)  # [m] flat indices, ascending
        inside = bits[where]
    else:
        cached = None
        inside = torch.cat([b[h == bucket] for b, h in map(magnitude_words, blocks())])
    kth, is_tie, n_above, n_equal = _finish_select(inside, k, bucket, n_higher)
    return kth, n_above, n_equal, None if where is None else where[is_tie]


def _finish_select(
    inside: Tensor, k: int, bucket: Tensor, n_higher: Tensor
) -> tuple[int, Tensor, int, int]:
    """(k-th largest bits, tie mask over inside, count above, count equal) from the bits
    `inside` the bucket holding the k-th largest and the count of entries in higher buckets."""
    if inside.device.type == "cpu":
        return _finish_select_host(inside, k - int(n_higher), int(n_higher))
    k_in = k - n_higher  # rank of the k-th largest inside the bucket
    if inside.device.type in KTHVALUE_BUCKET_DEVICES:  # kthvalue on the small bucket is cheaper
        k_in = int(k_in)
        kth = torch.kthvalue(inside, inside.numel() - k_in + 1).values
    else:  # integer histogram of the low 16 bits: no sort on accelerators
        lo_hist = torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)
        lo_bin, _ = _top_bin(lo_hist, k_in)
        kth = (bucket << 16) | lo_bin
    is_tie = inside == kth
    found = torch.stack([kth.to(torch.int64), n_higher + (inside > kth).sum(), is_tie.sum()])
    kth_bits, n_above, n_equal = (int(v) for v in found.tolist())  # the one sync at the end
    return kth_bits, is_tie, n_above, n_equal


def _finish_select_host(inside: Tensor, k_in: int, n_higher: int) -> tuple[int, Tensor, int, int]:
    """`_finish_select` of a host bucket, in numpy: a partition finds the k_in-th largest bits
    (torch's kthvalue, compares and sums on a bucket this small cost more in hand-offs to its
    threads than in work)."""
    bits = inside.numpy()
    kth = int(np.partition(bits, bits.size - k_in)[bits.size - k_in])
    is_tie = bits == kth
    n_above = n_higher + int(np.count_nonzero(bits > kth))
    return kth, torch.from_numpy(is_tie), n_above, int(np.count_nonzero(is_tie))


def magnitude_cuts(
    blocks: Callable[[], Iterable[Sequence[Tensor]]], numel: int, ks: Sequence[int]
) -> list[MagnitudeCut]:
    """`magnitude_cut` of several same-size tensors streamed together in blocks: blocks()
    yields, in index order, one block of each tensor (a list); two passes in all, however many
    tensors (TIES: every model's task vector, row block by row block)."""
    live = [i for i, k in enumerate(ks) if 0 < k < numel]
    hists: dict[int, Tensor] = {}
    for blk in blocks():
        for i in live:
            h = torch.bincount(magnitude_words(blk[i])[1], minlength=_HI_BINS)
            hists[i] = hists[i].add_(h) if i in hists else h
    tops = {i: _top_bin(hists[i], ks[i]) for i in live}
    insides: dict[int, list[Tensor]] = {i: [] for i in live}
    for blk in blocks():
        for i in live:
            bits, hi = magnitude_words(blk[i])
            insides[i].append(bits[hi == tops[i][0]])
    return _finish_cuts(ks, numel, tops, lambda i: torch.cat(insides.pop(i)))


def delta_magnitude_cuts(
    blocks: Callable[[], Iterable[Sequence[Tensor]]], numel: int, ks: Sequence[int]
) -> list[MagnitudeCut]:
    """`magnitude_cuts` of the task vectors x_i - base: blocks() yields, in index order, one
    block of [base, x_1, ..., x_N] (float32); cut i keeps ks[i] entries of x_i - base. On the
    host a C loop counts and collects the magnitudes' bits straight from x_i and base
    (`native.delta_hist_window`, `native.delta_bucket`): no delta, abs or digit tensors, and
    one pass over the blocks where the bucket of the k-th largest was guessed right from a
    sample (`_guess_window`), two otherwise; elsewhere the deltas go through `magnitude_cuts`
    (two passes). The same cuts in every case."""

    it = iter(blocks())
    first = next(it, None)
    opened = [] if first is None else [itertools.chain([first], it)]  # the first pass, begun

    def deltas() -> Iterator[list[Tensor]]:
        for xs in opened.pop() if opened else blocks():
            yield [x - xs[0] for x in xs[1:]]

    if first is None or not native.usable(*first) or first[0].dtype != torch.float32:
        return magnitude_cuts(deltas, numel, ks)
    live = [i for i, k in enumerate(ks) if 0 < k < numel]
    hists: dict[int, Tensor] = {}
    windows: dict[int, _Window] = {}
    for xs in opened.pop():  # the histograms, and the entries in each guessed window
        base = xs[0].contiguous()
        for i in live:
            x = xs[i + 1].contiguous()
            if i not in windows:
                windows[i] = _guess_window(x, base, ks[i], numel)
            h = windows[i].scan(x, base)
            hists[i] = hists[i].add_(h) if i in hists else h
    tops = {i: _top_bin(hists[i], ks[i]) for i in live}
    inside = {i: w.inside(int(tops[i][0])) for i, w in windows.items()}
    missed = [i for i in live if inside[i] is None]
    if missed:  # the k-th largest fell outside the guess: collect its bucket in a second pass
        inside.update(_bucket_pass(blocks, missed, hists, tops))
    return _finish_cuts(ks, numel, tops, inside.pop)


# The cut passes guess, from a strided sample of a tensor's first block (every
# WINDOW_SAMPLE_STRIDE-th entry, denser where that would give under WINDOW_SAMPLE_MIN entries), a
# window of top-16-bit buckets that holds its k-th largest |x - base|, and keep the bits of the
# entries inside it while they count the histogram: when the guess holds (the usual case) no
# second pass over the blocks is needed. The window holds at most WINDOW_MAX_FRACTION of the
# sampled entries where it can (it narrows down to the guessed bucket).
WINDOW_SAMPLE_STRIDE = 61
WINDOW_SAMPLE_MIN = 1 << 16
WINDOW_MAX_FRACTION = 1 / 8


@dataclass
class _Window:
    """A guessed window [lo, hi] of buckets, the sampled fraction of entries in it, and the
    bits of the entries found in it so far (None once one block held more than planned)."""

    lo: int
    hi: int
    fraction: float
    found: list[Tensor] | None

    def scan(self, x: Tensor, base: Tensor) -> Tensor:
        """One block's histogram of |x - base|'s top 16 bits, keeping the window's bits."""
        cap = int(x.numel() * self.fraction * 1.5) + 1024
        hist, bits = native.delta_hist_window(x, base, _HI_BINS, self.lo, self.hi, cap)
        if bits is None:
            self.found = None
        elif self.found is not None:
            self.found.append(bits)
        return hist

    def inside(self, bucket: int) -> Tensor | None:
        """The bits of every entry in bucket, or None when the window missed it."""
        if self.found is None or not self.lo <= bucket <= self.hi:
            return None
        bits = np.concatenate([f.numpy() for f in self.found])  # (numpy: one thread)
        return torch.from_numpy(bits[(bits >> 16) == bucket])


def _guess_window(x: Tensor, base: Tensor, k: int, numel: int) -> _Window:
    """The buckets likely to hold the k-th largest |x - base| of the whole tensor (numel
    entries), from a strided sample of one block of it: the sample's ranks k/numel of the way
    down, give or take 4 standard deviations and 0.2% of the sample (less where that window
    would hold more than WINDOW_MAX_FRACTION of the sample)."""
    stride = max(1, min(WINDOW_SAMPLE_STRIDE, x.numel() // WINDOW_SAMPLE_MIN))
    # C and numpy: torch ops on a sample this small cost more in thread hand-offs than work
    hist, m = native.delta_hist_strided(x, base, _HI_BINS, stride)
    c = np.cumsum(hist.numpy())  # [2**15] running count of the sample
    rank, p = k * m / numel, k / numel  # the k-th largest's rank within the sample
    margin = 4.0 * math.sqrt(m * p * (1.0 - p)) + 0.002 * m + 8.0

    def bucket(r: float) -> int:  # the bucket of the sample's r-th largest (1 <= r <= m)
        return _top_bin_host(c, min(m, max(1, int(r))))[0]

    while True:
        # past the sample's extremes the window runs to the end of the range (an unsampled
        # entry may lie beyond them)
        lo = bucket(rank + margin + 1) if rank + margin + 1 <= m else 0
        hi = bucket(rank - margin) if rank - margin >= 1 else _HI_BINS - 1
        fraction = float(c[hi] - (c[lo - 1] if lo > 0 else 0)) / m
        if fraction <= WINDOW_MAX_FRACTION or margin < 1.0:
            return _Window(lo, hi, fraction, [])
        margin /= 2.0


def _bucket_pass(
    blocks: Callable[[], Iterable[Sequence[Tensor]]],
    models: list[int],
    hists: dict[int, Tensor],
    tops: dict[int, tuple[Tensor, Tensor]],
) -> dict[int, Tensor]:
    """The bits of the entries in each model's top bucket: a second pass over the blocks."""
    inside = {i: torch.empty(int(hists[i][tops[i][0]]), dtype=torch.int32) for i in models}
    filled = dict.fromkeys(models, 0)
    for xs in blocks():
        for i in models:
            rest = inside[i][filled[i] :]
            x, base = xs[i + 1].contiguous(), xs[0].contiguous()
            filled[i] += native.delta_bucket(x, base, int(tops[i][0]), rest)
    for i in models:
        assert filled[i] == inside[i].numel()  # the two passes saw the same entries
    return inside


def _finish_cuts(
    ks: Sequence[int],
    numel: int,
    tops: dict[int, tuple[Tensor, Tensor]],
    inside: Callable[[int], Tensor],
) -> list[MagnitudeCut]:
    """Every tensor's cut from its top bin (`_top_bin`) and the bits of its entries in that
    bin (`inside(i)`, taken once, so each tensor's entries can be freed as it is done)."""
    cuts = []
    for i, k in enumerate(ks):
        if k >= numel:
            cuts.append(MagnitudeCut(None, 0, 0))
        elif k <= 0:
            cuts.append(MagnitudeCut(math.inf, 0, 0))
        else:
            kth, _, n_above, n_equal = _finish_select(inside(i), k, *tops[i])
            cuts.append(MagnitudeCut(_bits_to_float(kth), k - n_above, n_equal))
    return cuts


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def magnitude_cut(x: Tensor | Callable[[], Iterable[Tensor]], numel: int, k: int) -> MagnitudeCut:
    """The `MagnitudeCut` keeping exactly k entries of x (a float32 tensor, or a callable
    yielding its blocks in index order) with the largest |x|, ties by lowest index."""
    if k >= numel:
        return MagnitudeCut(None, 0, 0)
    if k <= 0:
        return MagnitudeCut(math.inf, 0, 0)
    if isinstance(x, Tensor) and x.device.type == "cpu" and numel < SMALL_SELECT:
        mag = x.reshape(-1).float().abs()
        kth = torch.kthvalue(mag, numel - k + 1).values
        n_above, n_equal = int((mag > kth).sum()), int((mag == kth).sum())
        return MagnitudeCut(float(kth), k - n_above, n_equal)
    blocks = x if callable(x) else lambda: (x,)
    bits, n_above, n_equal, tie_index = _radix_select(blocks, k)
    return MagnitudeCut(_bits_to_float(bits), k - n_above, n_equal, tie_index, numel)


def apply_cut_(x: Tensor, cut: MagnitudeCut) -> Tensor:
    """A copy of the float32 block x keeping only the entries `cut` selects (see MagnitudeCut);
    consumes cut.ties_left. Returns a new tensor; x is not modified."""
    out = zero_below(x, cut.threshold)  # every |x| >= threshold
    if cut.threshold is None or math.isinf(cut.threshold) or cut.ties_left == cut.ties_total:
        return out  # every tie is kept (the usual float32 case): nothing more to do
    flat = out.view(-1)
    if cut.tie_index is not None and flat.numel() == cut.numel:
        ties = cut.tie_index  # the whole tensor: the select located the ties already
    else:
        ties = (magnitude_bits(flat) == _float_bits(cut.threshold)).nonzero().squeeze(1)
    keep = consume_ties(cut, ties.numel())
    flat[ties[keep:]] = 0.0  # ties past the quota, the highest-indexed ones
    return out


def consume_ties(cut: MagnitudeCut, met: int) -> int:
    """Count a block's `met` ties at the threshold against cut, as `apply_cut_` does for a
    block it cuts with a quota (`kernel_cut` mode 3): returns how many of them are kept."""
    keep = min(cut.ties_left, met)
    cut.ties_left -= keep
    cut.ties_total -= met  # ties still to come in later blocks
    return keep


def kernel_cut(cut: MagnitudeCut) -> native.TiesCut:
    """What `apply_cut_` does to the next float32 block under cut, as the C kernels take it
    (`native.ties_merge`): keep all, keep none, |x| > the float below the threshold (the
    hardshrink of `zero_below`), or that with a quota of ties at the threshold (taken in index
    order; the caller updates the cut with `consume_ties` afterwards)."""
    if cut.threshold is None:
        return native.TiesCut(0)
    if math.isinf(cut.threshold):
        return native.TiesCut(1)
    below = _float_below(cut.threshold, torch.float32)
    if cut.ties_left == cut.ties_total:
        return native.TiesCut(2, below)
    return native.TiesCut(3, below, _float_bits(cut.threshold), cut.ties_left)


def _float_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32)[0])


# below this many entries a CPU tensor is selected with kthvalue (cheaper than two histograms:
# 0.06 ms against 0.23 ms at 20K entries, 1 thread; from 32K up kthvalue costs more, 0.34 ms
# against 0.28 ms at 40K)
SMALL_SELECT = 1 << 15


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry (1-based) of a non-negative tensor, exactly (a 0-dim tensor).

    float32 goes through `radix_select` (integer histograms, any device, about 2.5x faster than
    `kthvalue` on large CPU tensors: design notes, section 7); small CPU tensors and other dtypes
    use `kthvalue`.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    if flat.dtype != torch.float32 or (flat.device.type == "cpu" and n < SMALL_SELECT):
        return torch.kthvalue(flat, n - k + 1).values
    bits, _, _ = radix_select(lambda: (flat,), k)
    return torch.tensor(_bits_to_float(bits), dtype=flat.dtype, device=flat.device)


def magnitude_threshold(x: Tensor, k: int) -> float | None:
    """The k-th largest |x|: keeping entries with |x| >= it keeps the top k (and any ties).

    None when k >= numel (keep everything); +inf when k <= 0 (keep nothing).
    """
    n = x.numel()
    if k >= n:
        return None
    if k <= 0:
        return math.inf
    return float(kth_largest(x.abs(), k))


def zero_below(x: Tensor, threshold: float | None) -> Tensor:
    """A copy of x with the entries |x| < threshold set to 0 (None keeps all, inf keeps none).

    One fused pass (hardshrink drops |x| <= lambd, so lambd is the float just below threshold):
    about 3x cheaper than multiplying by a bool mask on the CPU.
    """
    if threshold is None:
        return x.clone()
    if math.isinf(threshold):
        return torch.zeros_like(x)
    if x.dtype not in (torch.float32, torch.float64):
        return torch.where(x.abs() >= threshold, x, 0.0)
    return torch.nn.functional.hardshrink(x, _float_below(threshold, x.dtype))


def _float_below(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of dtype below threshold (0 for 0): hardshrink by it drops exactly the
    |x| < threshold. A Python-float nextafter would round back up to threshold when a kernel
    casts it to float32, and drop the k-th entry itself."""
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros_like(t)))


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Bool mask keeping exactly k = int(density * numel) entries of x with the largest |x|
    over the whole tensor, ties with the k-th magnitude taken in index order (as
    `top_magnitude_indices`). density >= 1 keeps everything; k == 0 keeps nothing."""
    k = int(density * x.numel())
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[top_magnitude_indices(x, k)] = True
    return mask.view(x.shape)


def magnitude_prune(x: Tensor, density: float) -> Tensor:
    """x with all but its top k = int(density * numel) entries by |x| zeroed (TIES
    sparsification): exactly k kept, ties in index order, as `magnitude_mask`. A new tensor."""
    return apply_cut_(x, magnitude_cut(x, x.numel(), int(density * x.numel())))


# nonzero_flat scans 8-byte words of a CPU mask first; past this fraction of nonzero words the
# second stage costs more than it saves (measured: 2x faster at 1% density, 1.9x slower at 20%)
WORDS_MAX_FRACTION = 0.25


def nonzero_flat(mask: Tensor) -> Tensor:
    """Sorted flat indices (int64) of the True entries of a bool tensor: `mask.nonzero()`.

    On the host a sparse mask is scanned as int64 words first (8 entries per word), and only
    the nonzero words are expanded: 2x faster than `nonzero` at the 1% densities of top-k
    candidates (1 thread, 6M entries). Dense masks, and other devices, use `nonzero`.
    """
    flat = mask.reshape(-1)
    n = flat.numel()
    body = n - n % 8
    if flat.device.type != "cpu" or body == 0 or flat.storage_offset() % 8:
        return flat.nonzero().squeeze(1)  # (an int64 view needs an aligned start)
    words = flat[:body].view(torch.int64).nonzero().squeeze(1)  # [W] words holding a True
    if words.numel() > WORDS_MAX_FRACTION * (body // 8):
        return flat.nonzero().squeeze(1)
    row, col = flat[:body].view(-1, 8).index_select(0, words).nonzero(as_tuple=True)
    idx = words[row].mul_(8).add_(col)
    if body < n:
        idx = torch.cat([idx, flat[body:].nonzero().squeeze(1).add_(body)])
    return idx


# top_magnitude_indices bounds the threshold from every TOPK_SAMPLE_STRIDE-th entry; a prime
# stride does not line up with row lengths
TOPK_SAMPLE_STRIDE = 61


def top_magnitude_indices(x: Tensor, k: int) -> Tensor:
    """Sorted flat indices of exactly k entries of x with the largest |x| (int64, x's device).

    Entries tied with the k-th magnitude are taken in index order: exactly k are kept and the
    choice is deterministic (torch.topk breaks ties arbitrarily). Online TIES needs exactly k:
    the first Adam step has |Delta| ~ lr almost everywhere, and keeping every tie there would
    make a 1% update nearly dense. For a sparse k on a large tensor the exact selection runs on
    the candidates above a bound estimated from a strided sample (about 3x faster on 4M entries
    at k = 1%), found in one pass over x (`indices_at_least`); the result is the same.
    """
    return _top_k(x.reshape(-1), k, magnitudes=False)


def top_indices_of_magnitudes(mag: Tensor, k: int) -> Tensor:
    """`top_magnitude_indices` for a flat tensor that already holds magnitudes (>= 0): the same
    selection and tie rule, without an abs pass where the candidate scan cannot skip it."""
    return _top_k(mag.reshape(-1), k, magnitudes=True)


def _top_k(flat: Tensor, k: int, magnitudes: bool) -> Tensor:
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    if 4 * k < n and n >= 64 * TOPK_SAMPLE_STRIDE:
        found = _magnitude_candidates(flat, k)
        if found is not None:
            candidates, mags = found
            return candidates.index_select(0, _top_k_in_order(mags, k))
    return _top_k_in_order(flat if magnitudes else flat.abs(), k)


def _magnitude_candidates(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(sorted indices, |x| there) of the entries with |x| >= a bound taken from a strided
    sample of x [n].

    When they number at least k, the k-th largest entry is >= the bound, so they hold the
    whole top k. None when the sample misjudged (fewer than k, or too many to gain anything).
    """
    sample = x[::TOPK_SAMPLE_STRIDE].abs()
    expected = k * sample.numel() / x.numel()  # rank of the k-th largest within the sample
    rank = min(sample.numel(), int(1.2 * expected + 4.0 * math.sqrt(expected) + 8))
    bound = kth_largest(sample, rank)
    found = indices_at_least(x, bound, cap=4 * k + 64)
    return found if found is not None and k <= found[0].numel() else None


def indices_at_least(x: Tensor, bound: Tensor | float, cap: int) -> tuple[Tensor, Tensor] | None:
    """(sorted flat indices int64, |x| there) of the entries with |x| >= bound, or None when
    there are more than cap of them. One pass of a C kernel over a float32 host tensor
    (`native`, 4x faster than torch's abs, compare and nonzero); the torch ops elsewhere."""
    flat = x.reshape(-1)
    if flat.dtype == torch.float32 and native.usable(flat):
        return native.at_least(flat, float(bound), cap)
    idx = nonzero_flat(flat.abs() >= bound)
    return (idx, flat.index_select(0, idx).abs_()) if idx.numel() <= cap else None


def sorted_positions(keys: Tensor, queries: Tensor) -> Tensor:
    """For sorted int64 queries, the position of each in the sorted, distinct int64 keys, or -1
    where it is absent: a linear merge in C on the host (`native`), `searchsorted` elsewhere."""
    if keys.numel() == 0:
        return torch.full_like(queries, -1)
    if native.usable(keys, queries):
        return native.positions(keys, queries)
    pos = torch.searchsorted(keys, queries).clamp_(max=keys.numel() - 1)
    return torch.where(keys.index_select(0, pos) == queries, pos, -1)


def _top_k_in_order(mag: Tensor, k: int) -> Tensor:
    """Sorted indices of the k largest entries of a flat non-negative mag, ties by lowest index
    (in C on the host: `native.top_k_positions`)."""
    on_host = 0 < k <= mag.numel() and mag.dtype == torch.float32 and native.usable(mag)
    if on_host and not bool(mag.isnan().any()):
        return native.top_k_positions(mag, k)
    kth = kth_largest(mag, k)
    idx = nonzero_flat(mag >= kth)
    extra = idx.numel() - k
    if extra > 0:  # more ties than room: drop the highest-indexed ones
        dropped = (mag.index_select(0, idx) == kth).nonzero().squeeze(1)[-extra:]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[dropped] = False
        idx = idx[keep]
    return idx


def top_magnitude_indices_static(x: Tensor, k: int) -> Tensor:
    """`top_magnitude_indices` (exactly k, ties in index order, sorted) without host syncs.

    Radix select on the float32 bit patterns of |x| (non-negative floats order like their int32
    bits): a 2^15-bin histogram of the top bits and a 2^16-bin one of the low bits in the
    chosen bin give the exact k-th largest, then the k - #{above} tied entries of lowest index
    join. Histograms are `index_add_` into fixed-size tensors (`bincount` sizes its output from
    the data) and the indices come from `nonzero_static(size=k)`: every size is known on the
    host. One of a few dense passes per step, meant for accelerators; on the CPU, where syncs
    cost nothing, the sampled-bound `top_magnitude_indices` is faster.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    bits = flat.float().abs().view(torch.int32)  # [n] >= 0
    hi = bits >> 16  # [n] in [0, 2^15)
    # both histograms in one buffer: 2^15 bins of hi, 2^16 of lo, and a spare bin
    counts = torch.zeros((1 << 15) + (1 << 16) + 1, dtype=torch.int64, device=flat.device)
    hi_counts, lo_counts = counts[: 1 << 15], counts[1 << 15 :]
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(n)
    hi_counts.index_add_(0, hi, ones)
    bucket, higher = _top_bin(hi_counts, k)  # the k-th largest's bucket, entries above it
    # digit (int32) indexes the histogram as it is; entries outside the bucket go to the
    # spare bin: no int64 copies of the digits or of the mask
    lo_counts.index_add_(0, torch.where(hi == bucket, bits & 0xFFFF, 1 << 16), ones)
    k_in = k - higher  # the k-th largest's rank inside the bucket
    low, higher_in = _top_bin(lo_counts[: 1 << 16], k_in)
    kth_bits = (bucket << 16) | low  # 0-dim int64: the k-th largest |x|'s bits
    above = bits > kth_bits  # higher + higher_in entries
    tied = bits == kth_bits
    room = k_in - higher_in  # how many tied entries fit, lowest index first
    keep = above | (tied & (tied.cumsum(0) <= room))
    return torch.nonzero_static(keep, size=k).squeeze(1)


# -- the same selection on one shard of a tensor --------------------------------------------------
# FSDP2 gives each rank rows [r0, r1) of every parameter: the entries at global flat indices
# [start, start + n), start = r0 * row size. This gives each rank its part of what
# `top_magnitude_indices` gives the whole tensor, so a sharded run computes the unsharded run's
# weights.


def top_magnitude_indices_sharded(
    x: Tensor, k: int, rank_start: int, group: torch.distributed.ProcessGroup | None
) -> tuple[Tensor, int]:
    """`top_magnitude_indices` over a tensor split across the ranks of group, each holding the
    flat entries x [n] from global index rank_start on: (sorted local indices of this rank's part
    of the exact top k by |x|, ties by lowest global index; the number of kept entries on ranks
    that hold lower indices). 1 <= k <= numel of the whole tensor.

    A radix select whose two histograms (2^15 and 2^16 int64 bins) are summed over the ranks
    (two all-reduces), then one all-gather of (start, count above, ties) per rank assigns the
    ties at the k-th value in global index order. |x| itself never leaves the rank."""
    dist = torch.distributed
    bits = magnitude_bits(x)  # [n] int32, ordered like |x|
    hi = bits >> 16
    hist = torch.bincount(hi, minlength=_HI_BINS)
    dist.all_reduce(hist, group=group)
    bucket, higher = _top_bin(hist, k)  # the k-th largest's bucket; entries in buckets above
    lo_hist = torch.bincount((bits & 0xFFFF)[hi == bucket], minlength=_LO_BINS)
    dist.all_reduce(lo_hist, group=group)
    low, higher_in = _top_bin(lo_hist, k - higher)
    kth = (bucket << 16) | low
    above, tied = bits > kth, bits == kth
    mine = torch.stack([torch.tensor(rank_start, device=x.device), above.sum(), tied.sum()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    room = int(k - higher - higher_in)  # entries tied at the k-th value that are kept
    before_above = before_ties = 0
    for start, n_above, n_tied in (e.tolist() for e in every):
        if start < rank_start:  # an empty shard holds no entries, wherever it starts
            before_above, before_ties = before_above + n_above, before_ties + n_tied
    quota = max(0, min(room - before_ties, int(mine[2])))
    keep = above | (tied & (tied.cumsum(0) <= quota))
    return nonzero_flat(keep), before_above + min(room, before_ties)
