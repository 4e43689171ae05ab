"""Counter-based random numbers: seeds, hashes, keep masks, geometric gaps and sparse keeps.

Random bits per element that are a pure function of (key, element index): the same on every
device, thread count and processing order, with no generator state to save or sync (DDP ranks,
resumes, row blocks of one tensor, FSDP shards). Integer ops only, so CPU and CUDA agree
exactly. DARE / DELLA masks, the online merging optimizers' sparse draws (`hash_sparse_keep`,
batched in `hash_sparse_keep_many`, per shard in `shard_sparse_keep`) and the bits of
stochastic rounding all come from `hash_bits`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from . import native


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


def _block_spans(n: int, offset: int) -> Iterator[tuple[int, int]]:
    """[pos, stop) spans of elements offset .. offset + n - 1 that never straddle a 2**32
    block (each span hashes with one set of `_chunk_words`)."""
    pos = 0
    while pos < n:
        stop = min(n, ((((offset + pos) >> 32) + 1) << 32) - offset)
        yield pos, stop
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


def hash_keep(
    x: Tensor, density: float, key: int, *, offset: int = 0, out: Tensor | None = None
) -> Tensor:
    """x * hash_keep_mask(x.shape, density, key, offset=offset) (DARE's drop), a new tensor
    (or written into `out`, contiguous, of x's size and dtype, and returned shaped like x).

    The keep decisions are written as 1.0 / 0.0 in x's dtype chunk by chunk and multiplied in
    while in cache: the same products as x * mask (bool promotes to exactly these), without the
    bool tensor, whose compare and mixed-type multiply cost 2.5x and 5.5x more on the CPU. On
    the host with the C kernels, float32 is one loop (hash, test, product).
    """
    flat = x.reshape(-1)
    out = torch.empty_like(flat) if out is None else out.view(-1)
    if density >= 1.0:
        return out.copy_(flat).view(x.shape)
    cut = 2 * keep_threshold(density) - (1 << 31)  # as in hash_keep_mask
    if x.dtype == torch.float32 and native.usable(flat):  # one C loop per 2**32 block
        for pos, stop in _block_spans(flat.numel(), offset):
            first = offset + pos
            words = _chunk_words(key, first >> 32)
            native.hash_keep(flat[pos:stop], out[pos:stop], *words, first & _M32, cut)
        return out.view(x.shape)
    keep = None
    for pos, stop, words in _hash_chunks(flat.numel(), key, offset, x.device):
        if keep is None:  # one chunk-sized buffer, reused
            keep = torch.empty(words.numel(), dtype=x.dtype, device=x.device)
        k = torch.lt(words.bitwise_xor_(-(1 << 31)), cut, out=keep[: stop - pos])
        torch.mul(flat[pos:stop], k, out=out[pos:stop])
    return out.view(x.shape)


def hash_keep_diff(
    x: Tensor,
    base: Tensor,
    density: float,
    key: int,
    *,
    offset: int = 0,
    out: Tensor,
    abs_out: tuple[Tensor, Tensor] | None = None,
) -> None:
    """out <- hash_keep(x - base, density, key, offset=offset), and with abs_out = (ad, ak):
    ad <- |x - base|, ak <- |out|. All flat, contiguous, one size (callers pass cache-sized
    chunks of a tensor: DARE's delta made, dropped and measured for the L1 rescale without
    holding it whole). On the host with the C kernels, float32 is one loop; else torch ops,
    with the same bits."""
    fast = density < 1.0 and x.dtype == base.dtype == torch.float32
    if fast and native.usable(x, base, out, *(abs_out or ())):
        for pos, stop in _block_spans(x.numel(), offset):
            first = offset + pos
            part = (x[pos:stop], base[pos:stop], out[pos:stop])
            abs_part = None if abs_out is None else tuple(a[pos:stop] for a in abs_out)
            words = _chunk_words(key, first >> 32)
            cut = 2 * keep_threshold(density) - (1 << 31)  # as in hash_keep_mask
            native.hash_keep_diff(*part, abs_part, words, first & _M32, cut)  # type: ignore[arg-type]
        return
    delta = x - base if abs_out is None else torch.sub(x, base, out=abs_out[0])
    hash_keep(delta, density, key, offset=offset, out=out)
    if abs_out is not None:
        delta.abs_()  # in abs_out[0]
        torch.abs(out, out=abs_out[1])


def hash_uniform(
    n: int, key: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Uniform float32 in [0, 1) on a 2**-24 grid from the word's top 24 bits (exact anywhere)."""
    u = torch.empty(n, dtype=torch.float32, device=device)
    for pos, stop, words in _hash_chunks(n, key, offset, torch.device(device)):
        u[pos:stop].copy_(words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF))  # exact: < 2**24
    return u.mul_(2.0**-24)


# -- sparse counter-based masks ----------------------------------------------------------------
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


# -- the same draws on one shard of a tensor -----------------------------------------------------
# FSDP2 gives each rank rows [r0, r1) of every parameter: the entries at global flat indices
# [start, start + n), start = r0 * row size. This gives each rank its part of what
# `hash_sparse_keep` gives the whole tensor, so a sharded run computes the unsharded run's
# weights.


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
