"""Stochastic rounding of float32 values and sparse adds into bfloat16 / float16 weights.

An update far below half an ulp of a low-precision weight is dropped every time by
round-to-nearest; rounded down or up at random (E[result] = x) it survives on average. The
random bits are `rng.hash_bits` of (key, element index), so the result is the same on every
device and rank. Used by the online merging optimizers on low-precision parameters and by the
final cast of a training run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native
from .rng import _chunk_words, hash_bits


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
