"""Blends: weighted sums, lerp, slerp, EMA, TIES sign consensus and stable sums.

Soups, the interpolation sweep, the linear / slerp / task-vector merge methods, the Elastic
Reset EMA and the online merging optimizers' sign election mix tensors through these. All
functions take float32 tensors (any device) and never modify their inputs unless the name
ends in an underscore. Sums whose rounding must not depend on the thread count (norms of
task vectors, slerp's angle) go through `stable_sum` / `StableSum`.

The row-local blends (linear, task arithmetic, slerp after its angle) are also described as
`Elementwise`s, which `blend_into` runs in one C pass over the inputs as stored (bf16 or
float32; merge/native.py), with the bits of the torch ops here: the kernel variants that match
torch on this machine are probed at first use (`_kernel_flags`, `_sum_lanes`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from . import native, selection

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


def linear_sum(
    tensors: Sequence[Tensor], weights: Sequence[float], divisor: float | None = None
) -> Tensor:
    """`weighted_sum`, divided by divisor when given (a normalized linear merge, in place on
    the new sum): the linear method's math, and `Elementwise`'s torch path."""
    out = weighted_sum(tensors, weights)
    if divisor is not None:
        out /= divisor
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
# scratch to 24 MB whatever the tensor's size; the sums do not depend on it
REDUCE_CHUNK = 1 << 20


def gram_sums(pieces: Iterable[Sequence[Tensor]]) -> Tensor:
    """G[i, j] = sum of v_i * v_j over every entry, in float64, for n same-shape tensors given
    as matching pieces in index order (whole tensors, or row blocks: a list of one piece of
    each tensor per step). Each entry is a `StableSum`, so G is the same whatever the pieces
    (and the thread count). Each piece is widened REDUCE_CHUNK entries at a time into one
    [n + 1, REDUCE_CHUNK] float64 scratch reused for the whole pass (n widened chunks and a
    product): new 8 MB temporaries per chunk left the allocator holding a GB. [n, n]."""
    sums: dict[tuple[int, int], StableSum] = {}
    scratch: Tensor | None = None
    n = 0
    for vs in pieces:
        flats, n = [v.reshape(-1) for v in vs], len(vs)
        for start in range(0, flats[0].numel(), REDUCE_CHUNK):
            m = min(REDUCE_CHUNK, flats[0].numel() - start)
            if scratch is None or scratch.shape[0] < n + 1 or scratch.shape[1] < m:
                scratch = torch.empty(n + 1, m, dtype=torch.float64, device=flats[0].device)
            wide = [scratch[i, :m].copy_(f[start : start + m]) for i, f in enumerate(flats)]
            product = scratch[n, :m]
            for i in range(n):
                for j in range(i, n):
                    sums.setdefault((i, j), StableSum()).add(
                        torch.mul(wide[i], wide[j], out=product)
                    )
    gram = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), acc in sums.items():
        gram[i, j] = gram[j, i] = acc.total()
    return gram


def slerp_sums(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(sum a^2, sum b^2, sum a*b) in float64 over two same-shape tensors given as matching
    pieces in index order (whole tensors, or row blocks), as `StableSum`s: the same three
    values whatever the pieces. On the host (stored float32 or bf16, torch's row-sum order
    reproduced) the whole rows of each piece are summed by one C pass straight from the
    inputs; the rest, and every other case, is widened REDUCE_CHUNK entries at a time into
    one [3, REDUCE_CHUNK] float64 scratch reused for the whole pass (fresh tensors cost a page
    fault per 4 KiB, more than the products)."""
    sums = (StableSum(), StableSum(), StableSum())
    scratch: list[Tensor] = []  # created at the first piece that needs it
    for a, b in pairs:
        fa, fb = a.reshape(-1), b.reshape(-1)
        lanes = _sum_lanes() if _host_pair(fa, fb) else None
        if lanes is None:
            _add_products(sums, fa, fb, 0, fa.numel(), scratch)
            continue
        lo = min(fa.numel(), sums[0].need())  # completes a row carried from the last piece
        hi = lo + (fa.numel() - lo) // _SUM_BLOCK * _SUM_BLOCK
        _add_products(sums, fa, fb, 0, lo, scratch)
        if hi > lo:  # [3, rows]: whole rows, in one read of a and b
            rows = native.fused_product_row_sums(fa[lo:hi], fb[lo:hi], _SUM_BLOCK, lanes)
            for acc, row_sums in zip(sums, rows, strict=True):
                acc.add_row_sums(row_sums)
        _add_products(sums, fa, fb, hi, fa.numel(), scratch)
    aa, bb, ab = (s.total() for s in sums)
    return aa, bb, ab


def weighted_sum_f64(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """sum_i c_i * x_i accumulated in float64 (REDUCE_CHUNK entries at a time, so the float64
    copies stay a few MB) and rounded once to x_0's dtype: for coefficients from whole-tensor
    float64 arithmetic (karcher), which a float32 accumulation would round a second time."""
    flats = [x.reshape(-1) for x in tensors]
    out = torch.empty_like(flats[0])
    # [2, chunk] float64: the sum and one widened input, reused for every chunk
    scratch = torch.empty(2, min(REDUCE_CHUNK, out.numel()), dtype=torch.float64)
    for start in range(0, out.numel(), REDUCE_CHUNK):
        stop = min(out.numel(), start + REDUCE_CHUNK)
        acc, wide = scratch[0, : stop - start], scratch[1, : stop - start]
        torch.mul(wide.copy_(flats[0][start:stop]), float(coefficients[0]), out=acc)
        for x, c in zip(flats[1:], coefficients[1:], strict=True):
            acc.add_(wide.copy_(x[start:stop]), alpha=float(c))
        out[start:stop] = acc
    return out.view(tensors[0].shape)


def _host_pair(a: Tensor, b: Tensor) -> bool:
    """Contiguous host tensors stored as the C kernels' dtypes."""
    return native.usable(a, b) and {a.dtype, b.dtype} <= set(native.FUSED_DTYPES)


def _add_products(
    sums: Sequence[StableSum], a: Tensor, b: Tensor, lo: int, hi: int, scratch: list[Tensor]
) -> None:
    """Feed a*a, b*b, a*b of flat entries [lo, hi) to sums, REDUCE_CHUNK at a time through
    the reused scratch (made on first use: [3, REDUCE_CHUNK] float64 on a's device)."""
    for start in range(lo, hi, REDUCE_CHUNK):
        if not scratch:
            scratch.append(torch.empty(3, REDUCE_CHUNK, dtype=torch.float64, device=a.device))
        n = min(REDUCE_CHUNK, hi - start)
        for acc, prod in zip(sums, _products(a, b, start, n, scratch[0]), strict=True):
            acc.add(prod)  # keeps no view of its piece: the scratch can be reused


def _products(a: Tensor, b: Tensor, start: int, n: int, scratch: Tensor) -> Tensor:
    """[3, n] float64 view of scratch: a*a, b*b, a*b of flat entries [start, start + n)."""
    out = scratch[:, :n]  # each row contiguous
    if _host_pair(a, b):
        native.fused_products(a, b, start, out)
        return out
    a64, b64 = out[0].copy_(a[start : start + n]), out[1].copy_(b[start : start + n])
    torch.mul(a64, b64, out=out[2])  # before a64 and b64 are squared in place
    a64.mul_(a64)
    b64.mul_(b64)
    return out


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
    return slerp_apply(a, b, t, weights)


def slerp_apply(a: Tensor, b: Tensor, t: float, weights: SlerpWeights) -> Tensor:
    """The second step of `slerp`, entry by entry: a * s0 + b * s1, or lerp(a, b, t)."""
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


def ties_consensus_(
    weighted: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor,
    *,
    normalize: bool,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """The TIES family's merged tensor from its weighted deltas w_i * delta_i (n tensors of
    base's shape): `sign_consensus_`, `nonzero_divisor_` when `normalize`, then base +
    lam * mixed (/ divisor), written to out when given (a float32 tensor of base's shape).

    On the host one C pass (`native.ties_consensus`) reads the deltas and base once and writes
    the result, bit for bit the torch steps (which run elsewhere, and overwrite `weighted`).
    """
    target = _native_target(base, weighted, out)
    if target is None:
        return _consensus_torch(weighted, weights, base, normalize, lam, out)
    flags, wmin = _ties_flags(weights, normalize, lam)
    native.ties_consensus(target, base, list(weighted), _f32(weights), flags, lam, wmin)
    return target


def _consensus_torch(
    weighted: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor,
    normalize: bool,
    lam: float,
    out: Tensor | None,
) -> Tensor:
    """`ties_consensus_` as torch ops (in place on weighted)."""
    mixed, divisor = sign_consensus_(weighted, weights, with_divisor=normalize)
    if divisor is not None:
        divisor = nonzero_divisor_(divisor, weights)
        if lam == 1.0:  # base + mixed / divisor in one pass: the quotient and sum of the steps
            return torch.addcdiv(base, mixed, divisor, out=out)
        mixed /= divisor
    if lam != 1.0:  # x * 1 is x: skip the pass
        mixed.mul_(lam)
    return torch.add(base, mixed, out=out)


def ties_merge(
    base: Tensor,
    tensors: Sequence[Tensor],
    cuts: Sequence[selection.MagnitudeCut],
    weights: Sequence[float],
    *,
    normalize: bool,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """TIES' merge of one tensor, or one row block of it, once each model's magnitude cut of
    the whole task vector is known: delta_i = x_i - base, `selection.apply_cut_` (consuming
    each cut's ties, so the blocks of a tensor go in index order), times w_i, then
    `ties_consensus_`. tensors: n float32 of base's shape; out as in `ties_consensus_`.

    On the host one C pass (`native.ties_merge`) does it all, reading each input once (twice
    where ties at a threshold are shared between threads), with no float32 temporaries, bit
    for bit the torch steps; it updates the cuts as `apply_cut_` does.
    """
    target = _native_target(base, tensors, out)
    if target is None:
        return _ties_merge_torch(base, tensors, cuts, weights, normalize, lam, out)
    return _ties_merge_native(base, tensors, cuts, weights, normalize, lam, target)


def _native_target(base: Tensor, inputs: Sequence[Tensor], out: Tensor | None) -> Tensor | None:
    """Where the C kernels write (out, or a new tensor like base), or None when they do not
    serve these tensors (`ties_native`)."""
    given = [] if out is None else [out]
    if not ties_native(base, *inputs, *given):
        return None
    return torch.empty_like(base) if out is None else out


def _ties_merge_torch(
    base: Tensor,
    tensors: Sequence[Tensor],
    cuts: Sequence[selection.MagnitudeCut],
    weights: Sequence[float],
    normalize: bool,
    lam: float,
    out: Tensor | None,
) -> Tensor:
    weighted = [
        selection.apply_cut_(x - base, cut).mul_(w)
        for x, cut, w in zip(tensors, cuts, weights, strict=True)
    ]
    return _consensus_torch(weighted, weights, base, normalize, lam, out)


def _ties_merge_native(
    base: Tensor,
    tensors: Sequence[Tensor],
    cuts: Sequence[selection.MagnitudeCut],
    weights: Sequence[float],
    normalize: bool,
    lam: float,
    out: Tensor,
) -> Tensor:
    rules = [selection.kernel_cut(c) for c in cuts]
    flags, wmin = _ties_flags(weights, normalize, lam)
    met = native.ties_merge(out, base, list(tensors), rules, _f32(weights), flags, lam, wmin)
    for cut, rule, m in zip(cuts, rules, met, strict=True):
        if rule.mode == 3:  # the other modes leave the cut as it is (see apply_cut_)
            selection.consume_ties(cut, m)
    return out


def _f32(values: Sequence[float]) -> Tensor:
    """Python floats as the float32 values torch's kernels compute with."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _ties_flags(weights: Sequence[float], normalize: bool, lam: float) -> tuple[int, float]:
    """(the C kernels' flags, the smallest weight): `nonzero_divisor_`'s two branches and the
    three finishes of `ties_consensus_`."""
    wmin = min(float(w) for w in weights)
    flags = native.TIES_NORMALIZE if normalize else 0
    flags |= native.TIES_ALL_POSITIVE if wmin > 0.0 else 0
    flags |= native.TIES_LAMBDA if lam != 1.0 else 0
    return flags, wmin


def ties_native(*tensors: Tensor) -> bool:
    """True when the TIES kernels serve these tensors: contiguous float32 on the host, the
    library built, and its results equal to torch's on this machine (`_ties_kernels_agree`)."""
    host = all(t.dtype == torch.float32 for t in tensors) and native.usable(*tensors)
    return host and _ties_kernels_agree()


# the probe's (weights, normalize, lambda): nonzero_divisor_'s two branches, the three finishes
_TIES_PROBES = (
    ([1.0, 0.5, -0.3], True, 1.0),
    ([0.3, 0.7, 0.2], True, 0.9),
    ([0.5, 0.0, 1.5], False, 1.3),
)


@cache
def _ties_kernels_agree() -> bool:
    """Whether the C kernels give torch's bits here, probed once on crafted values (signed
    zeros, inf, subnormals, ties at the thresholds shared by two row blocks, a zero and a
    negative weight, every finish): a CPU or compiler that rounds a step differently gets the
    torch steps instead."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(40, 37, generator=g) * 4).round() / 4  # few distinct values: ties
    xs = [base + (torch.randn(40, 37, generator=g) * 4).round() / 8 for _ in range(3)]
    xs[0][0, :6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.0])
    base[0, :6] = torch.tensor([-0.0, -0.0, 1.0, 2.0, 0.0, -3.0])
    blocks = (slice(0, 17), slice(17, 40))
    for weights, normalize, lam in _TIES_PROBES:
        cuts = [selection.magnitude_cut(x - base, x.numel(), 700) for x in xs]
        mine = [copy.copy(c) for c in cuts]
        for r in blocks:  # ties at the thresholds spread over both blocks
            b, rows = base[r], [x[r] for x in xs]
            want = _ties_merge_torch(b, rows, cuts, weights, normalize, lam, None)
            got = _ties_merge_native(b, rows, mine, weights, normalize, lam, torch.empty_like(b))
            if not _equal_bits(got, want):
                return False
        if [(c.ties_left, c.ties_total) for c in cuts] != [
            (c.ties_left, c.ties_total) for c in mine
        ]:
            return False
        weighted = [(x - base) * w for x, w in zip(xs, weights, strict=True)]
        flags, wmin = _ties_flags(weights, normalize, lam)
        got = torch.empty_like(base)
        native.ties_consensus(got, base, weighted, _f32(weights), flags, lam, wmin)
        if not _equal_bits(got, _consensus_torch(weighted, weights, base, normalize, lam, None)):
            return False
    return True


def _equal_bits(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


# Rows of this many entries are each summed by one thread (below torch's parallel grain size).
_SUM_BLOCK = 1 << 14
# |x| is summed through a buffer of this many entries (`StableSum.add_abs`): 16 rows, 1 MiB of
# float32, which stays in cache between the abs and the row sums instead of faulting in a fresh
# copy of the whole tensor
ABS_CHUNK = 16 * _SUM_BLOCK


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
            self._rows.append(_row_sums(row))
            self._carry, flat = None, flat[need:]
        n_full = flat.numel() - flat.numel() % _SUM_BLOCK
        if n_full:  # [R]: one thread per row
            self._rows.append(_row_sums(flat[:n_full].view(-1, _SUM_BLOCK)))
        if n_full < flat.numel():
            self._carry = flat[n_full:].clone()

    def need(self) -> int:
        """Entries still missing from the row carried over (0: none is)."""
        return 0 if self._carry is None else _SUM_BLOCK - self._carry.numel()

    def add_row_sums(self, row_sums: Tensor) -> None:
        """Add whole rows already summed as `add` sums them (float64 [R], in index order),
        when no row is carried over."""
        assert self._carry is None, "add_row_sums continues a carried row"
        self._rows.append(row_sums)

    def add_abs(self, piece: Tensor, scratch: Tensor | None = None) -> None:
        """`add(piece.abs())` without the whole |piece| copy: |piece| goes through one reused
        buffer of ABS_CHUNK entries (cache-sized, a whole number of rows; `scratch`, of
        piece's dtype, when given), and the sum is the same bit for bit, since a StableSum
        does not depend on how its input is cut."""
        flat = piece.reshape(-1)
        size = min(flat.numel(), ABS_CHUNK)
        buf = scratch if scratch is not None and scratch.numel() >= size else None
        if buf is None:
            buf = torch.empty(size, dtype=flat.dtype, device=flat.device)
        for start in range(0, flat.numel(), ABS_CHUNK):
            part = flat[start : start + ABS_CHUNK]
            self.add(torch.abs(part, out=buf[: part.numel()]))

    def total(self) -> Tensor:
        """The sum of every entry added, as a 0-dim float64 tensor."""
        tail = self._carry if self._carry is not None else torch.zeros(0)
        total = tail.double().sum()  # the tail, shorter than a block: one thread
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.float64)
        for part in rows.split(_SUM_BLOCK):  # at most a block each: one thread
            total = total + part.sum()
        return total


def _row_sums(rows: Tensor) -> Tensor:
    """rows.sum(dim=1) as float64 for a [R, _SUM_BLOCK] view: float64 host rows through the C
    kernel where it reproduces torch's order here (`_sum_lanes`): no thread pool per call,
    which costs more than the sum on a loaded machine, and the same bits."""
    if rows.dtype == torch.float64 and native.usable(rows):
        lanes = _sum_lanes()
        if lanes is not None:
            return native.fused_row_sums(rows, lanes)
    return rows.sum(dim=1).double()


@cache
def _sum_lanes() -> int | None:
    """The vector width with which `native.fused_row_sums` gives torch's float64 row sums on
    this machine (torch's CPU kernels sum in lanes of its vector width), or None: probed on
    rows whose sums round differently in every other order."""
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-8, 8, (4, _SUM_BLOCK), generator=g)
    rows = torch.randn(4, _SUM_BLOCK, generator=g, dtype=torch.float64) * scale
    want = rows.sum(dim=1)
    return next(
        (n for n in (8, 4, 16, 2) if torch.equal(native.fused_row_sums(rows, n), want)), None
    )


def l1_factor(original_abs_sum: Tensor, kept_abs_sum: Tensor) -> float | None:
    """The factor that gives a masked delta the L1 norm of the original one (mergekit-style
    rescale), from the two `stable_sum`s of magnitudes; None when nothing was kept."""
    if kept_abs_sum == 0:
        return None
    return float(original_abs_sum / kept_abs_sum)


def scale_by(masked: Tensor, factor: float | None) -> Tensor:
    """masked * factor (a new tensor), or masked itself when factor is None (0 stays 0)."""
    return masked if factor is None else masked * factor


def scale_by_(masked: Tensor, factor: float | None) -> Tensor:
    """`scale_by` in place: masked *= factor (the same products), or masked as it is."""
    return masked if factor is None else masked.mul_(factor)


def abs_sum(x: Tensor) -> Tensor:
    """stable_sum(|x|), without a copy of |x| (`StableSum.add_abs`)."""
    acc = StableSum()
    acc.add_abs(x)
    return acc.total()


def l1_rescale(original: Tensor, masked: Tensor) -> Tensor:
    """Scale masked so its L1 norm matches original's (mergekit-style rescale); 0 stays 0.
    The norms are stable sums, so a merge is bit-identical whatever the thread count."""
    return scale_by(masked, l1_factor(abs_sum(original), abs_sum(masked)))


def l1_rescale_(original: Tensor, masked: Tensor) -> Tensor:
    """`l1_rescale` in place on masked (a tensor the caller owns): no new tensor."""
    return scale_by_(masked, l1_factor(abs_sum(original), abs_sum(masked)))


def ema_update_many_(emas: Sequence[Tensor], xs: Sequence[Tensor], decay: float) -> None:
    """`ema_update_` on many tensors at once: one multi-tensor `_foreach_lerp_` (x of another
    dtype or device than its EMA is cast first)."""
    same = [
        x if (x.dtype, x.device) == (e.dtype, e.device) else x.to(e)
        for e, x in zip(emas, xs, strict=True)
    ]
    torch._foreach_lerp_(list(emas), same, 1.0 - float(decay))


# ---- fused row-local blends --------------------------------------------------------------------


@dataclass(frozen=True)
class Elementwise:
    """A row-local blend: each output entry from the same entry of every input, the merges the
    engine runs in one fused pass over the stored inputs (`blend_into`). Kinds:

    - "linear": `linear_sum(xs, weights, divisor)` (soups, lerp, the linear method);
    - "task_arithmetic": xs[0] is the base, weights those of xs[1:]:
      base + scale * (sum_i w_i (x_i - base)) / divisor, in `task_vector_merge`'s order;
    - "slerp": `slerp_apply(xs[0], xs[1], t, angle)`, the angle from a first pass.
    """

    kind: str
    weights: tuple[float, ...] = ()
    divisor: float | None = None  # normalize: divide the sum by it
    scale: float = 1.0  # task arithmetic's lambda
    t: float = 0.0
    angle: SlerpWeights | None = None


def elementwise(spec: Elementwise, xs: Sequence[Tensor]) -> Tensor:
    """The blend with torch ops on float32 inputs: a new float32 tensor, the bits the merge
    methods give (the fused kernel reproduces them)."""
    if spec.kind == "linear":
        return linear_sum(xs, spec.weights, spec.divisor)
    if spec.kind == "task_arithmetic":
        return task_arithmetic_sum(xs[0], xs[1:], spec.weights, spec.divisor, spec.scale)
    assert spec.kind == "slerp" and spec.angle is not None
    return slerp_apply(xs[0], xs[1], spec.t, spec.angle)


def task_arithmetic_sum(
    base: Tensor, xs: Sequence[Tensor], weights: Sequence[float], divisor: float | None, lam: float
) -> Tensor:
    """base + lam * (sum_i w_i (x_i - base)) [/ divisor]: task_vector_merge without a
    sparsifier or sign election, step for step (each delta weighted in place, summed, divided,
    scaled, added to base)."""
    weighted = [(x - base).mul_(w) for x, w in zip(xs, weights, strict=True)]
    return mix_weighted(base, weighted, divisor, lam)


def mix_weighted(
    base: Tensor, weighted: Sequence[Tensor], divisor: float | None, lam: float
) -> Tensor:
    """base + lam * (sum of the weighted task vectors) [/ divisor] (a new tensor): the last
    step of a task-vector merge without sign election (task_arithmetic, and DARE, breadcrumbs
    and DELLA linear), and of `task_arithmetic_sum`."""
    mixed = weighted_sum(weighted, [1.0] * len(weighted))
    if divisor is not None:
        mixed /= divisor
    if lam != 1.0:  # x * 1 is x: skip the pass
        mixed.mul_(lam)
    return base + mixed


def blend_into(spec: Elementwise, raws: Sequence[Tensor], out: Tensor) -> tuple[list[bool], bool]:
    """out <- spec over the inputs as stored (raws: float32 or bfloat16 host tensors, one
    numel), converted, merged and cast to out's dtype (float32 or bfloat16) in one pass of
    the C kernel; falls back to `elementwise` on float32 copies where the kernel does not
    reproduce torch on this machine (`_kernel_flags`). Returns (input i holds Inf or NaN, per
    input; out does). The caller checks `fused_serves` first."""
    if len(raws) != _n_inputs(spec):
        raise ValueError(f"a {spec.kind} blend of {_n_inputs(spec)} inputs got {len(raws)}")
    kind, weights, params, flags = _kernel_args(spec)
    raws = [r.contiguous() for r in raws]  # no copy for reads; an adapter's merge, maybe
    chosen = _kernel_flags().get(kind)
    if chosen is None:  # torch's bits differ from every kernel variant here
        xs = [r.reshape(-1).float() for r in raws]
        bad = [not bool(torch.isfinite(x).all()) for x in xs]
        out.view(-1).copy_(elementwise(spec, xs))
        return bad, not bool(torch.isfinite(out).all())
    return native.fused_blend(kind, raws, weights, params, flags | chosen, out)


def fused_serves(dtypes: Sequence[torch.dtype], out_dtype: torch.dtype) -> bool:
    """Does `blend_into` take these inputs (stored dtypes) and output dtype on the host?"""
    ok = set(native.FUSED_DTYPES)
    return out_dtype in ok and all(d in ok for d in dtypes) and native.library() is not None


def _kernel_args(spec: Elementwise) -> tuple[str, tuple[float, ...], tuple[float, ...], int]:
    """(kernel kind, weights, (divisor, lambda, s0, s1, t), flags) of a blend."""
    kind, flags = spec.kind, 0
    if kind == "slerp" and spec.angle is not None and spec.angle.lerp:
        kind = "lerp"
    s0, s1 = (spec.angle.s0, spec.angle.s1) if spec.angle is not None else (0.0, 0.0)
    if kind == "linear" and len(spec.weights) > 1 and float(spec.weights[0]) == 1.0:
        flags |= native.FUSED_SHORTCUT  # weighted_sum's first add writes x0 + w1 * x1
    if spec.divisor is not None:
        flags |= native.FUSED_DIVIDE
    if spec.scale != 1.0:
        flags |= native.FUSED_SCALE
    params = (float(spec.divisor or 1.0), float(spec.scale), s0, s1, float(spec.t))
    return kind, tuple(float(w) for w in spec.weights), params, flags


# Probe blends and lengths: 13 entries run in torch's scalar tail only, 4133 mostly in its
# vectorized body; weights whose products round differently fused and unfused.
_PROBE_LENGTHS = (13, 4133)
_PROBES: dict[str, tuple[Elementwise, ...]] = {
    "add": (Elementwise("linear", (0.3, 0.7, 1.3)), Elementwise("linear", (1.0, 0.3))),
    "div": (Elementwise("linear", (1.0, 1.0, 1.0), 3.0), Elementwise("linear", (0.3, 0.4), 0.7)),
    "lerp": (
        Elementwise("slerp", t=0.3, angle=SlerpWeights(True)),
        Elementwise("slerp", t=0.7, angle=SlerpWeights(True)),
    ),
    "task_arithmetic": (
        Elementwise("task_arithmetic", (0.3, 0.7)),
        Elementwise("task_arithmetic", (0.5, 1.3), divisor=1.8, scale=0.7),
    ),
    "slerp": (Elementwise("slerp", t=0.4, angle=SlerpWeights(False, 0.6123, 0.4567)),),
}


@cache
def _kernel_flags() -> dict[str, int | None]:
    """Kernel kind -> the variant flags that give torch's bits on this machine and build, or
    None where none does (that kind then runs `elementwise`). Not guessed: torch's CPU kernels
    may fuse add(alpha=w) and lerp into an FMA and turn a division by a scalar into a multiply,
    depending on the build and the CPU; each variant is run against torch on probe data."""
    g = torch.Generator().manual_seed(0)
    data = [
        [torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 3, (n,), generator=g)]
        for n in _PROBE_LENGTHS
        for _ in range(4)
    ]
    xs_by_len = [sum(data[i * 4 : i * 4 + 4], []) for i in range(len(_PROBE_LENGTHS))]

    def first(group: str, candidates: Sequence[int], extra: int = 0) -> int | None:
        return next(
            (
                c
                for c in candidates
                if all(_same_bits(s, xs, c | extra) for s in _PROBES[group] for xs in xs_by_len)
            ),
            None,
        )

    fma_add = first("add", (native.FUSED_FMA_ADD, 0))
    div = None if fma_add is None else first("div", (0, native.FUSED_RECIPROCAL), fma_add)
    arith = None if div is None else first("task_arithmetic", (0,), fma_add | div)
    return {
        "linear": None if div is None else fma_add | div,
        "task_arithmetic": None if arith is None else fma_add | div,
        "lerp": first("lerp", (native.FUSED_FMA_LERP, 0)),
        "slerp": first("slerp", (0,)),
    }


def _same_bits(spec: Elementwise, xs: Sequence[Tensor], variant: int) -> bool:
    """Does the kernel with these variant flags give `elementwise`'s bits, float32 and bf16?"""
    want = elementwise(spec, xs[: _n_inputs(spec)])
    kind, weights, params, flags = _kernel_args(spec)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        out = torch.empty(want.shape, dtype=dtype)
        raws = xs[: _n_inputs(spec)]
        native.fused_blend(kind, raws, weights, params, flags | variant, out)
        if not torch.equal(out.view(bits), want.to(dtype).view(bits)):
            return False
    return True


def _n_inputs(spec: Elementwise) -> int:
    """How many inputs a blend reads (the kernel indexes its weights by input)."""
    if spec.kind == "task_arithmetic":
        return len(spec.weights) + 1
    return 2 if spec.kind == "slerp" else len(spec.weights)
