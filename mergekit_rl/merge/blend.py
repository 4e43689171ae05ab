"""Blends: weighted sums, lerp, slerp, EMA, TIES sign consensus and stable sums.

Soups, the interpolation sweep, the linear / slerp / task-vector merge methods, the Elastic
Reset EMA and the online merging optimizers' sign election mix tensors through these. All
functions take float32 tensors (any device) and never modify their inputs unless the name
ends in an underscore. Sums whose rounding must not depend on the thread count (norms of
task vectors, slerp's angle) go through `stable_sum` / `StableSum`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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
            self._rows.append(row.sum(dim=1).double())
            self._carry, flat = None, flat[need:]
        n_full = flat.numel() - flat.numel() % _SUM_BLOCK
        if n_full:  # [R]: one thread per row
            self._rows.append(flat[:n_full].view(-1, _SUM_BLOCK).sum(dim=1).double())
        if n_full < flat.numel():
            self._carry = flat[n_full:].clone()

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
