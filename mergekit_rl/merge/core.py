"""Merge primitives: pure functions on tensors.

Every piece of weight math in rlmerge goes through these: offline merge methods, soups, the
interpolation sweep, task vectors, the online merging optimizers and the Elastic Reset EMA.
All functions take float32 tensors (any device) and never modify their inputs unless the name
ends in an underscore.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native

# |cos| above this: the two tensors are (anti)parallel and slerp degenerates to lerp.
SLERP_PARALLEL_COS = 0.9995


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_i w_i * x_i, accumulated in place (one extra tensor of memory)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("weighted_sum needs one weight per tensor and at least one tensor")
    first, rest = 1, tensors[0]
    if len(tensors) > 1 and float(weights[0]) == 1.0 and _same_layout(tensors[0], tensors[1]):
        # x_0 * 1 is x_0 exactly, so the first add can write the new tensor: one pass less
        out = torch.add(rest, tensors[1], alpha=float(weights[1]))
        first = 2
    else:
        out = rest * weights[0]
    for x, w in zip(tensors[first:], weights[first:], strict=True):
        out.add_(x, alpha=float(w))
    return out


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and device: `torch.add(a, b)` has a's type and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device


def lerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """(1 - t) * a + t * b; t is a number or a tensor broadcasting against a (per-row t)."""
    return torch.lerp(a, b, t if isinstance(t, Tensor) else float(t))


def ema_update_(ema: Tensor, x: Tensor, decay: float) -> Tensor:
    """ema <- decay * ema + (1 - decay) * x, in place (Elastic Reset, WARP anchors)."""
    return ema.lerp_(x.to(ema.dtype), 1.0 - float(decay))


@dataclass(frozen=True)
class SlerpWeights:
    """How `slerp` mixes two tensors, from their whole-tensor angle: out = a * s0 + b * s1, or
    lerp when they are (nearly) parallel or one is zero (then s0 and s1 are unused)."""

    lerp: bool
    s0: float = 0.0
    s1: float = 0.0


# entries per float64 piece when reducing over a tensor (`slerp_sums`): bounds the float64
# copies of a large tensor to a few MB whatever its size
REDUCE_CHUNK = 1 << 20


def slerp_sums(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(sum a^2, sum b^2, sum a*b) in float64 over two same-shape tensors given as matching
    pieces in index order (whole tensors, or row blocks), as `StableSum`s: the same three
    values whatever the pieces. Each piece is widened REDUCE_CHUNK entries at a time."""
    sums = (StableSum(), StableSum(), StableSum())
    for a, b in pairs:
        fa, fb = a.reshape(-1), b.reshape(-1)
        for start in range(0, fa.numel(), REDUCE_CHUNK):
            a64 = fa[start : start + REDUCE_CHUNK].double()  # (float64 inputs: no copy)
            b64 = fb[start : start + REDUCE_CHUNK].double()
            sums[0].add(a64 * a64)
            sums[1].add(b64 * b64)
            sums[2].add(a64 * b64)
    aa, bb, ab = (s.total() for s in sums)
    return aa, bb, ab


def slerp_weights(
    sums: tuple[Tensor, Tensor, Tensor],
    t: float,
    eps: float = 1e-8,
    parallel_cos: float = SLERP_PARALLEL_COS,
) -> SlerpWeights:
    """The `SlerpWeights` of two tensors from their `slerp_sums` (a first pass over them)."""
    aa, bb, ab = sums
    na, nb = aa.sqrt(), bb.sqrt()
    if na < eps or nb < eps:
        return SlerpWeights(lerp=True)
    cos = float((ab / (na * nb)).clamp(-1.0, 1.0))
    if abs(cos) > parallel_cos:
        return SlerpWeights(lerp=True)
    theta = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    s0 = float(torch.sin((1.0 - t) * theta) / sin_theta)
    s1 = float(torch.sin(t * theta) / sin_theta)
    return SlerpWeights(False, s0, s1)


def slerp(
    a: Tensor,
    b: Tensor,
    t: float,
    eps: float = 1e-8,
    parallel_cos: float = SLERP_PARALLEL_COS,
    weights: SlerpWeights | None = None,
) -> Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) of two same-shape tensors.

    The angle comes from the whole flattened tensors (cos = a.b / (|a| |b|), float64); the
    interpolation is applied to the unnormalised tensors. Nearly (anti)parallel tensors
    (|cos| > parallel_cos) fall back to lerp. `weights`: the whole tensors' `slerp_weights`
    when a and b are one row block of them (computed by a first pass over every block).
    """
    if weights is None:
        weights = slerp_weights(slerp_sums([(a, b)]), t, eps, parallel_cos)
    if weights.lerp:
        return lerp(a, b, t)
    return a * weights.s0 + b * weights.s1


def slerp_rows(
    a: Tensor, b: Tensor, t: float, eps: float = 1e-8, parallel_cos: float = SLERP_PARALLEL_COS
) -> Tensor:
    """`slerp` applied independently to every row (last dimension) of a [R, D] pair.

    Same rules as `slerp` per row: angle from the L2-normalised rows in float64, rows that are
    nearly (anti)parallel or have a zero norm fall back to lerp. Returns [R, D] like a.
    """
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)  # [R, 1]
    degenerate = (na < eps) | (nb < eps)
    cos = ((a64 * b64).sum(-1, keepdim=True) / (na * nb).clamp_min(eps)).clamp(-1.0, 1.0)
    use_lerp = degenerate | (cos.abs() > parallel_cos)
    theta = torch.arccos(cos)
    sin_theta = torch.where(use_lerp, 1.0, torch.sin(theta))
    s0 = torch.where(use_lerp, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    s1 = torch.where(use_lerp, t, torch.sin(t * theta) / sin_theta)
    return (a * s0.to(a.dtype) + b * s1.to(b.dtype)).to(a.dtype)


# -- exact magnitude selection -----------------------------------------------------------------
# Non-negative float32 values order like their int32 bit patterns, so the k-th largest |x| is
# found by a two-level radix select with integer ops only (bincount and cumsum): a histogram of
# the top 16 bits finds the bucket holding the k-th value, a histogram of the low 16 bits inside
# that bucket finds the value itself, with exact counts of the entries above and equal to it.
# It works on any device (no sort, no kthvalue) and on a tensor streamed in blocks (two passes).
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
    c <= total - k, and the entries above b are total - c[b]."""
    c = hist.cumsum(0)  # [bins]
    total = c[-1]
    b = (c <= total - k).sum()
    higher = total - c.index_select(0, b.view(1)).squeeze(0)  # (x[0-dim tensor] would sync)
    return b, higher


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
    cuts = []
    for i, k in enumerate(ks):
        if k >= numel:
            cuts.append(MagnitudeCut(None, 0, 0))
        elif k <= 0:
            cuts.append(MagnitudeCut(math.inf, 0, 0))
        else:
            kth, _, n_above, n_equal = _finish_select(torch.cat(insides.pop(i)), k, *tops[i])
            cuts.append(MagnitudeCut(_bits_to_float(kth), k - n_above, n_equal))
    return cuts


def delta_magnitude_cuts(
    blocks: Callable[[], Iterable[Sequence[Tensor]]], numel: int, ks: Sequence[int]
) -> list[MagnitudeCut]:
    """`magnitude_cuts` of the task vectors x_i - base: blocks() yields, in index order, one
    block of [base, x_1, ..., x_N] (float32); cut i keeps ks[i] entries of x_i - base. Two
    passes. On the host a C loop counts and collects the magnitudes' bits straight from x_i
    and base (`native.delta_hist`, `native.delta_bucket`): no delta, abs or digit tensors;
    elsewhere the deltas go through `magnitude_cuts`. The same cuts either way."""

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
    for xs in opened.pop():
        for i in live:
            h = native.delta_hist(xs[i + 1].contiguous(), xs[0].contiguous(), _HI_BINS)
            hists[i] = hists[i].add_(h) if i in hists else h
    tops = {i: _top_bin(hists[i], ks[i]) for i in live}
    inside = {i: torch.empty(int(hists[i][tops[i][0]]), dtype=torch.int32) for i in live}
    filled = dict.fromkeys(live, 0)
    for xs in blocks():
        for i in live:
            rest = inside[i][filled[i] :]
            x, base = xs[i + 1].contiguous(), xs[0].contiguous()
            filled[i] += native.delta_bucket(x, base, int(tops[i][0]), rest)
    cuts = []
    for i, k in enumerate(ks):
        if k >= numel:
            cuts.append(MagnitudeCut(None, 0, 0))
        elif k <= 0:
            cuts.append(MagnitudeCut(math.inf, 0, 0))
        else:
            assert filled[i] == inside[i].numel()  # the two passes saw the same entries
            kth, _, n_above, n_equal = _finish_select(inside.pop(i), k, *tops[i])
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
    keep = min(cut.ties_left, ties.numel())
    flat[ties[keep:]] = 0.0  # ties past the quota, the highest-indexed ones
    cut.ties_left -= keep
    cut.ties_total -= ties.numel()  # ties still to come in later blocks
    return out


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
    # the largest value of x's dtype below threshold; a Python-float nextafter would round back
    # up to threshold when the kernel casts it to float32 and drop the k-th entry itself
    t = torch.tensor(threshold, dtype=x.dtype)
    below = float(torch.nextafter(t, torch.zeros_like(t)))
    return torch.nn.functional.hardshrink(x, below)


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


def tensor_seed(seed: int, *keys: str) -> int:
    """A 63-bit seed derived from (seed, keys), stable across runs, processes and platforms."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for key in keys:
        h.update(b"\x00" + key.encode())
    return int.from_bytes(h.digest(), "little") >> 1


# -- counter-based random numbers --------------------------------------------------------------
# Random bits per element that are a pure function of (key, element index): the same on every
# device, thread count and processing order, with no generator state to save or sync (DDP ranks,
# resumes, row blocks of one tensor). Integer ops only, so CPU and CUDA agree exactly.
#
# The hash, on 32-bit words (all arithmetic mod 2**32), for element i of a tensor with key K:
#     a, b, d = words derived from (K, i >> 32)     (a odd; host-side, see _chunk_words)
#     h = mix(mix(a * i + b) ^ d),    mix(x): 2 rounds of x ^= x >> 16; x *= M; then x ^= x >> 16
# Tensors hold the words as int32: multiplication wraps mod 2**32 on CPU and CUDA (checked by
# tests against a pure-Python reference), and `(x >> 16) & 0xFFFF` is the logical shift.
_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x846CA68B)  # odd multipliers with good avalanche (hash-prospector)
# elements hashed per chunk: on the CPU 2 MB of int32 words (and as much scratch), which keeps
# them in cache while making the ~25 ops per chunk few enough that their dispatch cost is small
# (1 << 19 measured 2x faster than 1 << 15, 1 thread, 4M entries); large on accelerators (one
# kernel per op per chunk)
HASH_CHUNK = {"cpu": 1 << 19}
HASH_CHUNK_DEFAULT = 1 << 24


def _s32(v: int) -> int:
    """A 32-bit word as the int32 value with the same bits."""
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def mix32(x: int) -> int:
    """The word mix on a Python int (the reference the tensor version must equal)."""
    x &= _M32
    for mult in _MIX:
        x ^= x >> 16
        x = (x * mult) & _M32
    return x ^ (x >> 16)


def _mix32_(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """`mix32` on an int32 tensor, in place; `scratch` (int32, x's shape) holds the shifted
    word, so a loop over chunks allocates nothing."""
    t = torch.empty_like(x) if scratch is None else scratch
    for mult in _MIX:
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))
        x.mul_(_s32(mult))
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))


def _chunk_words(key: int, hi: int) -> tuple[int, int, int]:
    """(a, b, d) for the elements whose index >> 32 is hi: a odd, all derived from key."""
    k_lo, k_hi = key & _M32, (key >> 32) & _M32
    a = mix32(k_lo ^ 0x9E3779B9 ^ mix32(hi)) | 1
    b = mix32(k_hi + 0x85EBCA6B * (hi + 1))
    d = mix32(k_lo ^ k_hi ^ 0xC2B2AE35)
    return a, b, d


def hash_word(key: int, i: int) -> int:
    """The hash of element i under key, as a Python int in [0, 2**32) (the reference)."""
    a, b, d = _chunk_words(key, i >> 32)
    return mix32(mix32(a * (i & _M32) + b) ^ d)


def hash_bits(n: int, key: int, *, offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """32 random bits per element (int32 with the hash word's bits) for elements offset ..
    offset + n - 1 under key (a 63-bit value, usually `tensor_seed(seed, *names)`).

    Element i always gets the same bits whatever n, offset, chunking or device, so a tensor can
    be hashed in row blocks or shards and give the mask it would give whole.
    """
    device = torch.device(device)
    out = torch.empty(n, dtype=torch.int32, device=device)
    for _ in _hash_chunks(n, key, offset, device, out):
        pass  # each chunk is hashed in place in out
    return out


def _hash_chunks(
    n: int, key: int, offset: int, device: torch.device, out: Tensor | None = None
) -> Iterator[tuple[int, int, Tensor]]:
    """Hash elements offset .. offset + n - 1 chunk by chunk: yields (pos, stop, words), words
    the int32 hashes of elements offset + pos .. offset + stop - 1, written into out[pos:stop]
    when out [n] is given, else into one chunk-sized buffer that the next chunk overwrites
    (callers that reduce each chunk to something smaller never hold all n words). On the host
    each chunk is one C loop (`native.hash_u32`) when the kernels are there; writing into out,
    a chunk is a whole 2**32 block (the loop splits it across threads itself)."""
    chunk = min(n, HASH_CHUNK.get(device.type, HASH_CHUNK_DEFAULT))
    buf = torch.empty(chunk, dtype=torch.int32, device=device) if out is None else None
    if native.usable(out if out is not None else buf):  # type: ignore[arg-type]
        pos = 0
        while pos < n:
            first = offset + pos
            stop = min(n, (((first >> 32) + 1) << 32) - offset)  # never straddle a 2**32 block
            if out is None:
                stop = min(stop, pos + chunk)
            words = out[pos:stop] if out is not None else buf[: stop - pos]  # type: ignore[index]
            native.hash_u32(words, *_chunk_words(key, first >> 32), first & _M32)
            yield pos, stop, words
            pos = stop
        return
    scratch = torch.empty(chunk, dtype=torch.int32, device=device)
    pos, steps, steps_hi = 0, None, None
    while pos < n:
        first = offset + pos
        hi = first >> 32
        stop = min(n, pos + chunk, ((hi + 1) << 32) - offset)  # never straddle a 2**32 block
        a, b, d = _chunk_words(key, hi)
        if steps is None or steps_hi != hi:  # a * j for j < chunk, once per 2**32 block
            steps = torch.arange(chunk, dtype=torch.int32, device=device).mul_(_s32(a))
            steps_hi = hi
        # a * (lo + j) + b = a * j + (a * lo + b), mod 2**32: one add per element, written in
        # place into the output, then mixed there
        m = stop - pos
        words = out[pos:stop] if out is not None else buf[:m]  # type: ignore[index]
        c = torch.add(steps[:m], _s32(a * (first & _M32) + b), out=words)
        t = scratch[:m]
        _mix32_(_mix32_(c, t).bitwise_xor_(_s32(d)), t)
        yield pos, stop, c
        pos = stop


def keep_threshold(density: float) -> int:
    """The cut on the top 31 bits for Bernoulli(density < 1): kept with probability density."""
    return min((1 << 31) - 1, max(0, round(float(density) * (1 << 31))))


def hash_keep_mask(
    shape: Sequence[int],
    density: float,
    key: int,
    *,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """I.i.d. Bernoulli(density) keep mask (bool, shape) from `hash_bits`; exact on every device.

    Entry i is kept when the top 31 bits of its word, (word >>> 1), are below
    `keep_threshold(density)` = T, i.e. when the word as an unsigned number is below 2T; with
    the sign bit flipped (word ^ 2**31) that is a signed int32 comparison with 2T - 2**31.
    Compared chunk by chunk as the words are made: no [n] int32 tensor is held.
    """
    if density >= 1.0:  # the cut 2**31 does not fit the int32 comparison
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    n = math.prod(shape)
    mask = torch.empty(n, dtype=torch.bool, device=device)
    cut = 2 * keep_threshold(density) - (1 << 31)  # in [-2**31, 2**31 - 2]
    for pos, stop, words in _hash_chunks(n, key, offset, torch.device(device)):
        torch.lt(words.bitwise_xor_(-(1 << 31)), cut, out=mask[pos:stop])
    return mask.view(tuple(shape))


def hash_keep(x: Tensor, density: float, key: int, *, offset: int = 0) -> Tensor:
    """x * hash_keep_mask(x.shape, density, key, offset=offset) (DARE's drop), a new tensor.

    The keep decisions are written as 1.0 / 0.0 in x's dtype chunk by chunk and multiplied in
    while in cache: the same products as x * mask (bool promotes to exactly these), without the
    bool tensor, whose compare and mixed-type multiply cost 2.5x and 5.5x more on the CPU.
    """
    if density >= 1.0:
        return x.clone()
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    cut = 2 * keep_threshold(density) - (1 << 31)  # as in hash_keep_mask
    keep = None
    for pos, stop, words in _hash_chunks(flat.numel(), key, offset, x.device):
        if keep is None:  # one chunk-sized buffer, reused
            keep = torch.empty(words.numel(), dtype=x.dtype, device=x.device)
        k = torch.lt(words.bitwise_xor_(-(1 << 31)), cut, out=keep[: stop - pos])
        torch.mul(flat[pos:stop], k, out=out[pos:stop])
    return out.view(x.shape)


def hash_uniform(
    n: int, key: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Uniform float32 in [0, 1) on a 2**-24 grid from the word's top 24 bits (exact anywhere)."""
    u = torch.empty(n, dtype=torch.float32, device=device)
    for pos, stop, words in _hash_chunks(n, key, offset, torch.device(device)):
        u[pos:stop].copy_(words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF))  # exact: < 2**24
    return u.mul_(2.0**-24)


def elect_sign(deltas: Tensor | Sequence[Tensor]) -> Tensor:
    """Majority sign per entry of deltas (stacked [N, ...] or a list): sign of the sum, a zero
    sum counts as +.

    Returns a float tensor of +1/-1 with the shape of one delta.
    """
    if isinstance(deltas, Tensor):
        total = deltas.sum(dim=0)
    else:
        total = weighted_sum(deltas, [1.0] * len(deltas))
    # in place on our own sum: 1.0 where >= 0, else 0.0, then 2s - 1
    return torch.ge(total, 0, out=total).mul_(2.0).sub_(1.0)


def agrees_with(delta: Tensor, sign: Tensor) -> Tensor:
    """Bool mask of entries whose sign equals the elected sign (+1/-1); zeros never agree."""
    return (delta * sign) > 0  # exact: sign is +-1, so the product only flips the sign bit


def sign_consensus_(
    weighted: Sequence[Tensor], weights: Sequence[float], *, with_divisor: bool = True
) -> tuple[Tensor, Tensor | None]:
    """TIES mixing of weighted deltas w_i * delta_i: elect the sign (elect_sign), keep in each
    term the entries that agree with it (agrees_with), and return

        (sum_i of the agreeing entries, per-entry sum of w_i over the agreeing terms),

    the second None when not `with_divisor` (a merge that does not normalize skips its two
    passes per term). Fused and in place: the input tensors are overwritten (the name ends in
    an underscore).
    """
    sign = elect_sign(weighted)
    mixed = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if with_divisor else None
    scratch = torch.empty_like(sign) if with_divisor else None
    for d, w in zip(weighted, weights, strict=True):
        d.mul_(sign).clamp_min_(0.0)  # |d| where d agrees with sign, else 0
        mixed.add_(d)
        if divisor is not None:
            divisor.add_(torch.sign(d, out=scratch), alpha=float(w))  # 1 where it agreed
    return mixed.mul_(sign), divisor


def nonzero_divisor_(divisor: Tensor, weights: Sequence[float]) -> Tensor:
    """The TIES divisor with its zeros (no term agreed there, or agreeing weights summing to 0)
    replaced by 1, in place, for dividing the mixed sum by it.

    With every weight > 0 a nonzero entry is a sum of weights, so at least min(w), and a zero
    one only occurs where no term agreed, where the mixed sum is +-0 and any positive divisor
    leaves it as it is: one clamp to min(w) then divides exactly like the replacement by 1,
    and costs 0.6 ms per 4M entries on the CPU against 9 ms for a compare and a masked fill.
    """
    if weights and min(weights) > 0.0:
        return divisor.clamp_min_(min(weights))
    return divisor.masked_fill_(divisor == 0, 1.0)


# Rows of this many entries are each summed by one thread (below torch's parallel grain size).
_SUM_BLOCK = 1 << 14


def stable_sum(x: Tensor) -> Tensor:
    """Sum of all entries, in an order fixed by the size alone (not by the thread count).

    torch splits a whole-tensor sum across threads, so its rounding depends on the thread
    count; a sum over dim 1 of a [R, block] view gives each row to one thread. The row sums
    (in x's dtype, pairwise) are then added in float64 in blocks. Returns a 0-dim float64
    tensor. One `StableSum` fed the whole tensor.
    """
    acc = StableSum()
    acc.add(x)
    return acc.total()


class StableSum:
    """`stable_sum` of a tensor given as pieces in index order (row blocks of a large tensor):
    the same value, bit for bit, whatever the pieces. Pieces are flattened; a row of
    _SUM_BLOCK entries that straddles two pieces is completed from the next one (the carry,
    under _SUM_BLOCK entries, is the only copy kept besides the row sums)."""

    def __init__(self) -> None:
        self._rows: list[Tensor] = []  # float64 row sums, in order
        self._carry: Tensor | None = None  # the entries of an unfinished row

    def add(self, piece: Tensor) -> None:
        flat = piece.reshape(-1)
        if self._carry is not None:
            need = _SUM_BLOCK - self._carry.numel()
            if flat.numel() < need:
                self._carry = torch.cat([self._carry, flat])
                return
            row = torch.cat([self._carry, flat[:need]]).view(1, _SUM_BLOCK)
            self._rows.append(row.sum(dim=1).double())
            self._carry, flat = None, flat[need:]
        n_full = flat.numel() - flat.numel() % _SUM_BLOCK
        if n_full:  # [R]: one thread per row
            self._rows.append(flat[:n_full].view(-1, _SUM_BLOCK).sum(dim=1).double())
        if n_full < flat.numel():
            self._carry = flat[n_full:].clone()

    def total(self) -> Tensor:
        """The sum of every entry added, as a 0-dim float64 tensor."""
        tail = self._carry if self._carry is not None else torch.zeros(0)
        total = tail.double().sum()  # the tail, shorter than a block: one thread
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.float64)
        for part in rows.split(_SUM_BLOCK):  # at most a block each: one thread
            total = total + part.sum()
        return total


def l1_factor(original_abs_sum: Tensor, kept_abs_sum: Tensor) -> float | None:
    """The factor that gives a masked delta the L1 norm of the original one (mergekit-style
    rescale), from the two `stable_sum`s of magnitudes; None when nothing was kept."""
    if kept_abs_sum == 0:
        return None
    return float(original_abs_sum / kept_abs_sum)


def scale_by(masked: Tensor, factor: float | None) -> Tensor:
    """masked * factor (a new tensor), or masked itself when factor is None (0 stays 0)."""
    return masked if factor is None else masked * factor


def l1_rescale(original: Tensor, masked: Tensor) -> Tensor:
    """Scale masked so its L1 norm matches original's (mergekit-style rescale); 0 stays 0.
    The norms are stable sums, so a merge is bit-identical whatever the thread count."""
    factor = l1_factor(stable_sum(original.abs()), stable_sum(masked.abs()))
    return scale_by(masked, factor)


# -- sparse counter-based masks, stochastic rounding, sync-free top-k ----------------------------
# Online merging optimizers redraw a sparse mask every step on the parameter's device. These
# primitives give results whose sizes follow from the shapes alone (the host never waits for the
# device) and that are pure functions of (key, element index) like `hash_bits`.

_GAP_CUTS: dict[tuple[float, str], Tensor] = {}
GAP_MIN_DENSITY = 1e-6  # the table holds ~22 / density cuts
# from this density up `geometric_gaps` estimates in float32 (its error stays below 0.05 of a
# gap there: ~2e-6 / density); below it in float64 (at 4e-6 float32 was off by 2)
GAP_FLOAT32_MIN_DENSITY = 1e-4


def gap_cuts(density: float, device: torch.device | str = "cpu") -> Tensor:
    """Descending int64 cuts D_0 = 2^31, D_j = round((1 - density)^j * 2^31) for j >= 1 while
    D_j >= 1, and a final 0.

    A gap g = 1 + max{j : D_j > u}, with u a uniform 31-bit integer, has P(g > j) = D_j / 2^31,
    which is (1 - density)^j up to 2^-31: the law of the distance between consecutive entries
    kept by an i.i.d. Bernoulli(density) mask. The table is built once on the host in float64
    and copied, so every device compares against the same integers ([~22/density] entries).
    """
    if not GAP_MIN_DENSITY <= density < 1.0:
        raise ValueError(f"gap_cuts needs {GAP_MIN_DENSITY} <= density < 1, got {density}")
    key = (float(density), str(torch.device(device)))
    if key not in _GAP_CUTS:
        log_q = math.log1p(-density)
        j = torch.arange(1, math.ceil(32 * math.log(2) / -log_q) + 2, dtype=torch.float64)
        cuts = torch.round(torch.exp(j * log_q) * 2.0**31).to(torch.int64)
        one = torch.ones(1, dtype=torch.int64)
        cuts = torch.cat([one << 31, cuts[cuts >= 1], one * 0])
        _GAP_CUTS[key] = to_device(cuts, torch.device(device))
    return _GAP_CUTS[key]


def geometric_gaps(u: Tensor, density: float) -> Tensor:
    """1 + max{j : D_j > u} for uniform 31-bit integers u (int64) and the cuts D of `gap_cuts`.

    D_j > u exactly when (1 - density)^j * 2^31 >= u + 1/2, so j is the floor of
    log((u + 1/2) / 2^31) / log(1 - density), estimated to within one and then made exact by
    one comparison on each side against the integer table: the same on every device whatever
    its log rounds to. No search over the table. The estimate is float32 from
    GAP_FLOAT32_MIN_DENSITY up (log's error, ~2e-6, is a small fraction of one step
    log(1 - density)) and float64 below, down to GAP_MIN_DENSITY (j up to ~2.2e7): in float32
    the error there is several steps, and above 2^24 j itself is not representable.
    """
    cuts = gap_cuts(density, u.device)
    last = cuts.numel() - 2  # the largest j
    real = torch.float32 if density >= GAP_FLOAT32_MIN_DENSITY else torch.float64
    est = torch.log((u.to(real) + 0.5).mul_(2.0**-31)).mul_(1.0 / math.log1p(-density))
    j = est.floor_().clamp_(0, last).to(torch.int64)
    j += (cuts[j + 1] > u).to(torch.int64) - (cuts[j] <= u).to(torch.int64)
    return j.add_(1)


def sparse_draws(numel: int, density: float) -> int:
    """Gaps drawn by `hash_sparse_keep`: the mean kept count + 8 standard deviations + 16; none
    for an empty tensor (it has no index to keep)."""
    if numel <= 0:
        return 0
    mean = numel * density
    return int(mean + 8.0 * math.sqrt(mean * (1.0 - density)) + 16)


def hash_sparse_keep(
    numel: int, density: float, key: int, *, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """The flat indices an i.i.d. Bernoulli(density) mask over numel entries keeps, as a draw of
    fixed size n = `sparse_draws(numel, density)`: (idx [n] int64 ascending, valid [n] bool).

    Kept entries are drawn as geometric gaps (`gap_cuts`) from `hash_bits(n, key)`, so the cost
    is ~density * numel, not numel, and the result is a pure function of (numel, density, key)
    on every device. The valid entries are a prefix; invalid ones (past the end) are clamped to
    numel - 1 so they can be gathered, and callers give them a zero update. The n gaps fall
    short of numel (the tail then keeps nothing) with probability below 1e-14: an 8-sigma event.
    density >= 1 keeps every index; an empty tensor gives two empty tensors.
    """
    device = torch.device(device)
    if numel <= 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(
            0, dtype=torch.bool, device=device
        )
    if density >= 1.0:
        return torch.arange(numel, device=device), torch.ones(
            numel, dtype=torch.bool, device=device
        )
    n = sparse_draws(numel, density)
    u = ((hash_bits(n, key, device=device) >> 1) & 0x7FFFFFFF).to(torch.int64)  # [n] 31 bits
    idx = geometric_gaps(u, density).cumsum_(0).sub_(1)  # [n] the first kept entry is gap - 1
    valid = idx < numel
    return idx.clamp_(max=numel - 1), valid


def stochastic_round(
    x: Tensor, dtype: torch.dtype, key: int | Tensor, *, offset: int = 0
) -> Tensor:
    """float32 x rounded to dtype (bfloat16 / float16), down or up at random: E[result] = x.

    An entry between neighbours lo < x < hi of dtype becomes hi with probability
    (x - lo) / (hi - lo); the random bits are `hash_bits(x.numel(), key, offset=offset)`, so the
    result is the same on every device and rank. Used for updates far below half an ulp, which
    round-to-nearest would drop every time. Other dtypes are returned as a cast. key may also be
    those bits themselves (int32 [x.numel()]), drawn for many tensors at once (`hash_bits_many`).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    if isinstance(key, Tensor):
        bits = key.view(x.shape)
    else:
        bits = hash_bits(x.numel(), key, offset=offset, device=x.device).view(x.shape)
    if dtype == torch.bfloat16:
        # bf16 keeps the top 16 bits of a float32: add a uniform 16-bit number to the 16 bits
        # that are dropped, then truncate; the magnitude rounds up with exactly their fraction.
        # inf has 16 zero low bits (the noise never carries into it); a NaN's payload could
        # carry into the sign (0x7FFFFFFF + noise is -0), so NaN is written as torch's quiet
        # NaN 0x7FC0 (a fill: a cast of NaN gives 0xFFFF or 0x7FC0 depending on the kernel)
        xi = x.to(torch.float32).contiguous().view(torch.int32) + (bits & 0xFFFF)
        out = xi.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
        return out.masked_fill_(x.isnan(), math.nan)
    near = x.to(dtype)
    near32 = near.float()
    toward = torch.where(near32 < x, math.inf, -math.inf).to(dtype)
    other = torch.nextafter(near, toward)  # the neighbour on x's other side
    frac = (x - near32).abs_().div_((other.float() - near32).abs_())
    u = ((bits >> 8) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)
    return torch.where(u < frac, other, near)


def stochastic_add_at_(flat: Tensor, idx: Tensor, val: Tensor, key: int | Tensor) -> None:
    """flat[idx] += val (float32 val [n], flat bfloat16 / float16 and flat, int64 idx [n]), each
    sum rounded with `stochastic_round` under key (element j of idx gets hash bit j; key may be
    the bits themselves). Indices must be distinct, except repeats whose val is 0 (they leave the
    entry as it is). On the host a bfloat16 flat takes one C loop (`native.add_at_bf16_rounded_`),
    the same result."""
    native_ok = isinstance(key, int) and native.usable(flat, idx, val) and val.numel() < 1 << 32
    if flat.dtype == torch.bfloat16 and native_ok:
        native.add_at_bf16_rounded_(flat, idx, val.float().contiguous(), _chunk_words(key, 0))
        return
    bits = hash_bits(val.numel(), key, device=flat.device) if isinstance(key, int) else key
    stochastic_add_at_many_([flat], [idx], [val], [bits])


def stochastic_add_at_many_(
    flats: Sequence[Tensor], idxs: Sequence[Tensor], vals: Sequence[Tensor], bits: Sequence[Tensor]
) -> None:
    """`stochastic_add_at_(flat_i, idx_i, val_i, bits_i)` with the random bits given, for many
    tensors of one low-precision dtype: a gather and two index adds per tensor, the rounding
    once for all of them (every entry is rounded on its own with its own bits).

    The rounded sum `new` is written exactly as two adds, old + (-old) = 0 and 0 + new = new.
    One add of new - old would round whenever new and old are more than a factor 2 apart (a
    sum crossing zero), and a plain indexed write would race between a repeat and the entry it
    repeats; repeats carry val 0 and add 0 twice. A -0.0 result is written as +0.0. An inf or
    NaN weight is left as it is (old - old would make it NaN), as the host kernel does."""
    if not flats:
        return
    dtype, sizes = flats[0].dtype, [i.numel() for i in idxs]
    old = torch.cat([f.index_select(0, i) for f, i in zip(flats, idxs, strict=True)])
    val = torch.cat(list(vals))
    new = stochastic_round(old.float() + val, dtype, torch.cat(list(bits)))
    touched = (val != 0) & old.isfinite()
    minus = torch.where(touched, -old, 0.0).split(sizes)
    put = torch.where(touched, new, 0.0).split(sizes)
    for f, i, m, n in zip(flats, idxs, minus, put, strict=True):
        f.index_add_(0, i, m)
        f.index_add_(0, i, n)


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


def ema_update_many_(emas: Sequence[Tensor], xs: Sequence[Tensor], decay: float) -> None:
    """`ema_update_` on many tensors at once: one multi-tensor `_foreach_lerp_` (x of another
    dtype or device than its EMA is cast first)."""
    same = [
        x if (x.dtype, x.device) == (e.dtype, e.device) else x.to(e)
        for e, x in zip(emas, xs, strict=True)
    ]
    torch._foreach_lerp_(list(emas), same, 1.0 - float(decay))


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (indices, sizes) on device without making the host wait: a plain
    `.to(device)` from pageable memory synchronises the stream after the copy; a pinned source
    is copied in the stream's order like a kernel (torch keeps it alive until then)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def hash_bits_many(
    sizes: Sequence[int], keys: Sequence[int], *, device: torch.device | str = "cpu"
) -> Tensor:
    """`hash_bits(n_i, key_i)` for every (n_i, key_i), concatenated [sum n_i], computed in one
    pass per op over all of them (each n_i < 2^32): one batch of kernels instead of one per
    tensor. The per-key words go to the device in one small copy; sizes are host ints."""
    device = torch.device(device)
    total = int(sum(sizes))
    if total == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    if max(sizes) >= 1 << 32:
        raise ValueError("hash_bits_many: every size must be below 2**32")
    if device.type == "cpu" and native.usable():  # the C loop, segment by segment
        return torch.cat([hash_bits(n, key) for n, key in zip(sizes, keys, strict=True)])
    words = torch.tensor([[_s32(w) for w in _chunk_words(k, 0)] for k in keys], dtype=torch.int64)
    reps = torch.tensor(list(sizes), dtype=torch.int64)
    starts = reps.cumsum(0) - reps  # [S] first element of each segment
    host = to_device(torch.cat([words, starts[:, None], reps[:, None]], dim=1), device)  # [S, 5]
    per = torch.repeat_interleave(host[:, :4], host[:, 4], dim=0, output_size=total)  # [N, 4]
    c = torch.arange(total, device=device).sub_(per[:, 3]).to(torch.int32)  # index in segment
    a, b, d = (per[:, i].to(torch.int32) for i in range(3))
    return _mix32_(_mix32_(c.mul_(a).add_(b)).bitwise_xor_(d))


def hash_sparse_keep_many(
    numels: Sequence[int],
    density: float,
    keys: Sequence[int],
    *,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, list[int]]:
    """`hash_sparse_keep(numel_i, density, key_i)` for many tensors in one batch of kernels:
    (idx, valid) concatenated, and the draws per tensor (`sparse_draws`) to split them by.
    Equal, segment by segment, to the one-tensor calls (an empty tensor draws nothing)."""
    device = torch.device(device)
    draws = [sparse_draws(n, density) for n in numels]
    total = int(sum(draws))
    if total == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.bool(), draws
    u = ((hash_bits_many(draws, keys, device=device) >> 1) & 0x7FFFFFFF).to(torch.int64)
    gaps = geometric_gaps(u, density)  # [N]
    ends = gaps.cumsum(0)  # [N] running sum over every segment
    reps = torch.tensor(draws, dtype=torch.int64)
    # one copy: each segment's draws, first draw and numel [3, S]
    # an empty segment's first draw is the next one's (or past the end: clamped, never used)
    first = (reps.cumsum(0) - reps).clamp_(max=total - 1)
    reps, first, numel = to_device(torch.stack([reps, first, torch.tensor(list(numels))]), device)
    base = ends.index_select(0, first) - gaps.index_select(0, first)  # [S] sum before each segment
    idx = ends.sub_(torch.repeat_interleave(base, reps, output_size=total)).sub_(1)
    limit = torch.repeat_interleave(numel, reps, output_size=total)
    valid = idx < limit
    return torch.minimum(idx, limit - 1), valid, draws


# -- the same draws and selections on one shard of a tensor ---------------------------------------
# FSDP2 gives each rank rows [r0, r1) of every parameter: the entries at global flat indices
# [start, start + n), start = r0 * row size. These give each rank its part of what the functions
# above give the whole tensor, so a sharded run computes the unsharded run's weights.


def shard_sparse_keep(
    numel: int, density: float, key: int, start: int, n: int, *, device: torch.device | str = "cpu"
) -> tuple[Tensor, int, int]:
    """The entries of [start, start + n) that `hash_sparse_keep(numel, density, key)` keeps:
    (their indices relative to start, sorted int64 [m]; the position of the first of them among
    the kept entries of the whole tensor, which keys its random rounding bits; the number kept
    in the whole tensor).

    The gaps are a running sum over the whole tensor, so every rank draws all of them
    (~density * numel entries, transient) and keeps its range: one host sync per call."""
    device = torch.device(device)
    if density >= 1.0:
        return torch.arange(n, device=device), start, numel
    idx, valid = hash_sparse_keep(numel, density, key, device=device)
    idx = idx[valid]  # [kept] ascending global flat indices
    bounds = torch.searchsorted(idx, torch.tensor([start, start + n], device=device))
    lo, hi = (int(b) for b in bounds.tolist())
    return idx[lo:hi] - start, lo, idx.numel()


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
