"""Host kernels in C for loops torch has no single op for, behind primitives in
`selection`, `rng` and `rounding` (`indices_at_least`, `top_magnitude_indices`, `hash_bits`, `hash_keep`,
`hash_keep_diff`,
`stochastic_add_at_`, `sorted_positions`), each with a pure-torch path that gives the same
result (tests run both).

- `at_least`: sorted flat indices of the entries with |x| >= bound, and |x| there (top-k
  candidates): one read of x (0.31 ns per entry with SSE2 bit masks, one core) where torch
  needs abs, compare and nonzero (about 1.2 ns).
- `top_k_positions`: the exact top k of those magnitudes (a quickselect, then the index-order
  tie rule in one pass) where torch needs kthvalue, a compare, nonzero and a tie fix-up.
- `hash_u32`: the counter-based hash of `rng.hash_bits` in one loop (about 25 torch passes).
- `hash_keep_f32`: DARE's drop (`rng.hash_keep`): the hash, the keep test and the product in
  one loop, where torch needs the words, a compare into a keep buffer and a multiply;
  `hash_keep_diff_f32` (`rng.hash_keep_diff`) the same on x - base, with |delta| and |kept| for
  the L1 rescale's sums, where torch adds a subtraction and two abs.
- `add_at_bf16_rounded_`: a sparse add into bfloat16 weights with stochastic rounding
  (`rounding.stochastic_round`'s rule and bits) in one loop instead of a gather, the hash, the
  rounding ops and a scatter.
- `positions`: where each of a sorted list of indices sits in another sorted list (-1 if
  absent): a two-pointer merge, O(n + m), where `searchsorted` costs O(m log n).
- `delta_hist`, `delta_bucket`: the two passes of TIES' magnitude cut over row blocks
  (`selection.delta_magnitude_cuts`) straight from x and base: the bits of |x - base| counted by
  their top 16 bits, then those of one bucket collected, where torch needs a delta, an abs,
  a digit copy and a bincount per block.

The library is compiled on first use with the system C compiler (`cc -O3`, no
machine-specific flags) into `$XDG_CACHE_HOME/mergekit_rl` (default `~/.cache/mergekit_rl`),
keyed by a hash of the source, the machine type and the flags, and loaded with ctypes: no
Python headers, no build step at install. Where there is no compiler, the cache is not writable
or `RLMERGE_NATIVE=0` is set, `library()` is None and callers use the torch path. ctypes
releases the GIL, so long loops are split across torch's thread count with a thread pool.
Accelerator tensors never come here. A kernel that writes through an index it is given
checks the index first and returns an error code (the wrapper raises): whatever a caller
passes, nothing is written out of bounds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Indices i in [0, n) with fabsf(x[i]) >= bound, ascending, written to out[0..cap) as
   offset + i, and their magnitudes to mag[0..cap). Returns how many there are; a return value
   above cap means out was too small (its first cap entries are still right). NaN never
   qualifies (ordered compares). With SSE2 (every x86-64) 16 entries are compared at a time
   into a bit mask and only its set bits are visited: 0.31 ns per entry against 0.72 for the
   plain loop (1.5% density, one core). */
int64_t at_least_f32(const float *x, int64_t n, float bound, int64_t offset,
                     int64_t *out, float *mag, int64_t cap) {
    int64_t c = 0, i = 0;
#if defined(__SSE2__)
    const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    const __m128 b = _mm_set1_ps(bound);
    for (; i + 16 <= n; i += 16) {
        unsigned m = 0;
        for (int q = 0; q < 4; q++) {
            __m128 v = _mm_and_ps(_mm_loadu_ps(x + i + 4 * q), absmask);
            m |= (unsigned)_mm_movemask_ps(_mm_cmpge_ps(v, b)) << (4 * q);
        }
        while (m) {
            int j = __builtin_ctz(m);
            if (c < cap) { out[c] = offset + i + j; mag[c] = fabsf(x[i + j]); }
            c++;
            m &= m - 1;
        }
    }
#endif
    for (; i < n; i++) {
        if (fabsf(x[i]) >= bound) {
            if (c < cap) { out[c] = offset + i; mag[c] = fabsf(x[i]); }
            c++;
        }
    }
    return c;
}

/* The k-th smallest of v[0..n) (0-based k < n, no NaN), reordering v: quickselect with a
   median-of-three pivot and a three-way split, so runs of ties end it at once. */
static float kth_smallest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi];
        float p = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t lt = lo, i = lo, gt = hi;  /* [lo,lt) < p, [lt,i) == p, (gt,hi] > p */
        while (i <= gt) {
            float x = v[i];
            if (x < p) { v[i] = v[lt]; v[lt] = x; lt++; i++; }
            else if (x > p) { v[i] = v[gt]; v[gt] = x; gt--; }
            else i++;
        }
        if (k < lt) hi = lt - 1;
        else if (k > gt) lo = gt + 1;
        else return p;
    }
    return v[k];
}

/* The positions of the k (0 < k <= n) largest of v[0..n) (no NaN), ties at the k-th value taken
   lowest position first, ascending, written to out (k entries); work holds n floats. Returns
   0, or -1 (nothing written) when k is out of range. Never writes past out[k - 1], even when
   v holds NaN against the contract (the comparisons then see fewer or more entries above t). */
int64_t top_k_positions(const float *v, int64_t n, int64_t k, float *work, int64_t *out) {
    if (k <= 0 || k > n) return -1;
    for (int64_t i = 0; i < n; i++) work[i] = v[i];
    float t = kth_smallest(work, n, n - k);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) above += v[i] > t;
    int64_t ties = k - above, c = 0;
    for (int64_t i = 0; i < n && c < k; i++)
        if (v[i] > t || (v[i] == t && ties-- > 0)) out[c++] = i;
    return 0;
}

/* The hash loops are built twice where the compiler can (gcc, clang on x86-64): for AVX2 and
   for the baseline, picked when the library loads (target_clones). Integer hashing gains the
   most from AVX2's 8-wide 32-bit multiply (SSE2 has none): 0.9 against 2.2 ns per entry for
   hash_keep_f32. Both builds compute the same bits. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define WIDE __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef WIDE
#define WIDE
#endif

/* rng.hash_bits for n consecutive elements of one 2**32 block: element lo + j (lo + n <= 2**32)
   gets mix32(mix32(a * (lo + j) + b) ^ d), all arithmetic mod 2**32 (gcc vectorizes it). */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 16;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

WIDE void hash_u32(uint32_t a, uint32_t b, uint32_t d, uint32_t lo, int64_t n, uint32_t *out) {
    for (int64_t j = 0; j < n; j++) out[j] = mix32(mix32(a * (lo + (uint32_t)j) + b) ^ d);
}

/* rng.hash_keep for n consecutive float32 entries of one 2**32 block: entry j (element lo + j)
   is multiplied by 1.0f when its hash word with the sign bit flipped, as an int32, is below cut
   (kept), else by 0.0f: the products torch's x * keep gives (a dropped -x is -0.0, NaN stays
   NaN), with no word or keep buffer. The keep factor is made from the compare's bit mask
   (0x3F800000 is 1.0f), not a branch or a select, so the loop vectorizes (8 ns per entry
   otherwise). */
WIDE void hash_keep_f32(const float *x, float *out, int64_t n, uint32_t a, uint32_t b,
                        uint32_t d, uint32_t lo, int32_t cut) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t h = mix32(mix32(a * (lo + (uint32_t)j) + b) ^ d);
        uint32_t one = (uint32_t)-((int32_t)(h ^ 0x80000000u) < cut) & 0x3F800000u;
        float keep;
        memcpy(&keep, &one, sizeof keep);
        out[j] = x[j] * keep;
    }
}

/* hash_keep_f32 on the delta x[j] - base[j] (one float32 subtraction, as torch's), in one
   loop: kept[j] = delta * keep, and where abs_delta is not NULL also abs_delta[j] = |delta|
   and abs_kept[j] = |kept[j]| (the sign bit cleared, as torch.abs), for the L1 rescale's
   sums. Two loops, so that neither tests the pointer per entry. */
WIDE void hash_keep_diff_f32(const float *x, const float *base, int64_t n, uint32_t a,
                             uint32_t b, uint32_t d, uint32_t lo, int32_t cut, float *kept,
                             float *abs_delta, float *abs_kept) {
    if (abs_delta == 0) {
        for (int64_t j = 0; j < n; j++) {
            uint32_t h = mix32(mix32(a * (lo + (uint32_t)j) + b) ^ d);
            uint32_t one = (uint32_t)-((int32_t)(h ^ 0x80000000u) < cut) & 0x3F800000u;
            float keep;
            memcpy(&keep, &one, sizeof keep);
            kept[j] = (x[j] - base[j]) * keep;
        }
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        uint32_t h = mix32(mix32(a * (lo + (uint32_t)j) + b) ^ d);
        uint32_t one = (uint32_t)-((int32_t)(h ^ 0x80000000u) < cut) & 0x3F800000u;
        float keep, delta = x[j] - base[j];
        memcpy(&keep, &one, sizeof keep);
        float k = delta * keep;
        kept[j] = k;
        abs_delta[j] = fabsf(delta);
        abs_kept[j] = fabsf(k);
    }
}

/* flat[idx[j]] += val[j] for a bfloat16 flat (raw uint16) of size entries, rounded
   stochastically with the hash word of element j (words a, b, d of block 0), exactly as
   rounding.stochastic_round: the float32 sum plus the hash's low 16 bits, truncated to the top 16.
   In order, so a repeated index sees the earlier sum (a zero val leaves a bf16 value
   unchanged). An inf or NaN weight is left as it is; a NaN sum is written as 0x7FC0 (the
   quiet NaN torch fills with); inf sums stay inf (their low 16 bits are 0, the noise cannot
   carry). Every index is checked against [0, size) first: the return value is 0, or j + 1 for
   the first bad idx[j], and then nothing is written. The weights are touched at scattered
   places: prefetching 32 entries ahead halves the time (cache-cold, 1% of 6.3M entries: 17
   against 31 ns per entry). */
int64_t add_at_bf16_rounded(uint16_t *flat, int64_t size, const int64_t *idx, const float *val,
                            int64_t n, uint32_t a, uint32_t b, uint32_t d) {
    for (int64_t j = 0; j < n; j++)
        if (idx[j] < 0 || idx[j] >= size) return j + 1;
    for (int64_t j = 0; j < n; j++) {
        if (j + 32 < n) __builtin_prefetch(flat + idx[j + 32], 1);
        uint32_t h = mix32(mix32(a * (uint32_t)j + b) ^ d);
        uint16_t *w = flat + idx[j];
        if ((*w & 0x7F80u) == 0x7F80u) continue;
        union { float f; uint32_t u; } x;
        x.u = (uint32_t)*w << 16;
        x.f = x.f + val[j];
        *w = x.f != x.f ? (uint16_t)0x7FC0u : (uint16_t)((x.u + (h & 0xFFFFu)) >> 16);
    }
    return 0;
}

/* The radix select of task-vector magnitudes (selection.delta_magnitude_cuts) without a delta
   tensor: for d = x[i] - b[i] (one float32 subtraction, as torch's), the int32 bits of |d|.
   delta_hist_f32 counts their top 16 bits into hist[0..2**15); delta_bucket_f32 appends the
   bits whose top 16 equal bucket to out, in index order, and returns how many. */
static inline uint32_t delta_bits(float x, float b) {
    union { float f; uint32_t u; } d;
    d.f = x - b;
    return d.u & 0x7FFFFFFFu;
}

void delta_hist_f32(const float *x, const float *b, int64_t n, int64_t *hist) {
    for (int64_t i = 0; i < n; i++) hist[delta_bits(x[i], b[i]) >> 16]++;
}

int64_t delta_bucket_f32(const float *x, const float *b, int64_t n, uint32_t bucket,
                         int32_t *out, int64_t cap) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = delta_bits(x[i], b[i]);
        if ((u >> 16) == bucket) {
            if (c < cap) out[c] = (int32_t)u;
            c++;
        }
    }
    return c;
}

/* For each query q[j] (ascending), its position in keys (ascending, distinct) or -1. */
void positions_i64(const int64_t *keys, int64_t nk, const int64_t *q, int64_t nq,
                   int64_t *out) {
    int64_t i = 0;
    for (int64_t j = 0; j < nq; j++) {
        while (i < nk && keys[i] < q[j]) i++;
        out[j] = (i < nk && keys[i] == q[j]) ? i : -1;
    }
}
"""

FLAGS = ("-O3", "-shared", "-fPIC")
# below this many entries a scan runs on one thread (a thread pool costs ~50 us)
PARALLEL_MIN = 1 << 20


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mergekit_rl"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (the torch paths are used)."""
    if os.environ.get("RLMERGE_NATIVE", "1") == "0":
        return None
    try:
        return _load(_build())
    except (OSError, RuntimeError, subprocess.SubprocessError):  # RuntimeError: no home dir
        return None


def _build() -> Path:
    """Compile SOURCE once per source hash; concurrent builders race harmlessly (each writes
    its own temporary file and renames it into place)."""
    # the machine type and flags are in the key: a cache on a shared home serves every machine
    stamp = "\0".join([SOURCE, platform.machine(), platform.system(), *FLAGS])
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    path = cache_dir() / f"native-{digest}.so"
    if path.exists():
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, lib = Path(tmp) / "native.c", Path(tmp) / "native.so"
        src.write_text(SOURCE)
        cmd = [compiler, *FLAGS, "-o", str(lib), str(src), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(lib, path)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.at_least_f32.argtypes = [ptr, i64, ctypes.c_float, i64, ptr, ptr, i64]
    lib.at_least_f32.restype = i64
    lib.positions_i64.argtypes = [ptr, i64, ptr, i64, ptr]
    lib.positions_i64.restype = None
    lib.top_k_positions.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.top_k_positions.restype = i64
    u32 = ctypes.c_uint32
    lib.hash_u32.argtypes = [u32, u32, u32, u32, i64, ptr]
    lib.hash_u32.restype = None
    lib.hash_keep_f32.argtypes = [ptr, ptr, i64, u32, u32, u32, u32, ctypes.c_int32]
    lib.hash_keep_f32.restype = None
    lib.hash_keep_diff_f32.argtypes = [ptr, ptr, i64, u32, u32, u32, u32, ctypes.c_int32]
    lib.hash_keep_diff_f32.argtypes += [ptr, ptr, ptr]
    lib.hash_keep_diff_f32.restype = None
    lib.add_at_bf16_rounded.argtypes = [ptr, i64, ptr, ptr, i64, u32, u32, u32]
    lib.add_at_bf16_rounded.restype = i64
    lib.delta_hist_f32.argtypes = [ptr, ptr, i64, ptr]
    lib.delta_hist_f32.restype = None
    lib.delta_bucket_f32.argtypes = [ptr, ptr, i64, u32, ptr, i64]
    lib.delta_bucket_f32.restype = i64
    return lib


def usable(*tensors: Tensor) -> bool:
    """The kernels serve contiguous host tensors, when the library exists."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and (
        library() is not None
    )


def _ranges(n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting n entries across torch's thread count (one below
    PARALLEL_MIN entries per thread)."""
    parts = max(1, min(torch.get_num_threads(), n // PARALLEL_MIN))
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _run(fn, ranges: list[tuple[int, int]]) -> list:
    """fn(lo, hi) for every range, on a thread pool when there are several (ctypes calls
    release the GIL)."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    with ThreadPoolExecutor(len(ranges)) as pool:
        return list(pool.map(lambda r: fn(*r), ranges))


def hash_u32(out: Tensor, a: int, b: int, d: int, lo: int) -> None:
    """out[j] <- the hash word of element lo + j of one 2**32 block with words (a, b, d), for a
    contiguous int32 host tensor out (lo + len(out) <= 2**32); see `rng.hash_bits`."""
    lib = library()
    assert lib is not None and out.dtype == torch.int32 and out.is_contiguous()
    assert lo + out.numel() <= 1 << 32
    base = out.data_ptr()

    def part(start: int, stop: int) -> None:
        lib.hash_u32(a, b, d, lo + start, stop - start, base + 4 * start)

    _run(part, _ranges(out.numel()))


def hash_keep(x: Tensor, out: Tensor, a: int, b: int, d: int, lo: int, cut: int) -> None:
    """out <- x * keep for contiguous float32 host tensors of one size, keep 1.0 where the hash
    word of element lo + j (one 2**32 block, words a, b, d) with its sign bit flipped is below
    cut as an int32, else 0.0; see `rng.hash_keep`."""
    lib = library()
    assert lib is not None and x.dtype == out.dtype == torch.float32
    assert x.is_contiguous() and out.is_contiguous() and x.numel() == out.numel()
    assert lo + x.numel() <= 1 << 32
    src, dst = x.data_ptr(), out.data_ptr()

    def part(start: int, stop: int) -> None:
        lib.hash_keep_f32(src + 4 * start, dst + 4 * start, stop - start, a, b, d, lo + start, cut)

    _run(part, _ranges(x.numel()))


def hash_keep_diff(
    x: Tensor,
    base: Tensor,
    kept: Tensor,
    abs_out: tuple[Tensor, Tensor] | None,
    words: tuple[int, int, int],
    lo: int,
    cut: int,
) -> None:
    """kept <- (x - base) * keep as `hash_keep` (one 2**32 block, element lo + j), and with
    abs_out = (ad, ak): ad <- |x - base|, ak <- |kept|; contiguous float32 host tensors of
    one size, one loop on the calling thread (callers pass cache-sized chunks)."""
    lib = library()
    tensors = (x, base, kept, *(abs_out or ()))
    assert lib is not None and all(t.dtype == torch.float32 for t in tensors)
    assert all(t.is_contiguous() and t.numel() == x.numel() for t in tensors)
    assert lo + x.numel() <= 1 << 32
    ad, ak = (abs_out[0].data_ptr(), abs_out[1].data_ptr()) if abs_out is not None else (0, 0)
    lib.hash_keep_diff_f32(
        x.data_ptr(), base.data_ptr(), x.numel(), *words, lo, cut, kept.data_ptr(), ad, ak
    )


def at_least(x: Tensor, bound: float, cap: int) -> tuple[Tensor, Tensor] | None:
    """(sorted flat indices int64, |x| there float32) of the entries with |x| >= bound, for a
    contiguous float32 host tensor x, or None when there are more than cap of them. Split into
    one range per torch thread when x is long; each range writes its own rows of cap."""
    lib = library()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    ranges = _ranges(x.numel())
    idx = torch.empty(len(ranges), cap, dtype=torch.int64)
    mag = torch.empty(len(ranges), cap, dtype=torch.float32)
    base, row = x.data_ptr(), {lo: i for i, (lo, _) in enumerate(ranges)}

    def scan(lo: int, hi: int) -> int:
        i = row[lo]
        out, val = idx[i].data_ptr(), mag[i].data_ptr()
        return lib.at_least_f32(base + 4 * lo, hi - lo, bound, lo, out, val, cap)

    counts = _run(scan, ranges)
    if sum(counts) > cap:
        return None
    if len(ranges) == 1:
        return idx[0, : counts[0]], mag[0, : counts[0]]
    pieces = [(idx[i, :c], mag[i, :c]) for i, c in enumerate(counts)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def top_k_positions(values: Tensor, k: int) -> Tensor:
    """Sorted positions (int64) of the k largest of a contiguous float32 host tensor without
    NaN, ties at the k-th value taken lowest position first: a quickselect and one pass, for
    what torch does with kthvalue, a compare, nonzero and a tie fix-up."""
    lib = library()
    assert lib is not None and values.dtype == torch.float32 and values.is_contiguous()
    n = values.numel()
    assert 0 < k <= n
    work = torch.empty(n, dtype=torch.float32)
    out = torch.empty(k, dtype=torch.int64)
    if lib.top_k_positions(values.data_ptr(), n, k, work.data_ptr(), out.data_ptr()):
        raise ValueError(f"top_k_positions: k={k} out of range for {n} values")
    return out


def add_at_bf16_rounded_(flat: Tensor, idx: Tensor, val: Tensor, words: tuple[int, ...]) -> None:
    """flat[idx] += val for a contiguous bfloat16 host flat, float32 val, int64 idx, each sum
    rounded stochastically with the hash words (a, b, d) of block 0 for element j of idx: the
    gather, add, hash, rounding and scatter in one loop. An index outside [0, flat.numel())
    raises IndexError with flat untouched (the loop checks them all before writing)."""
    lib = library()
    assert lib is not None and flat.dtype == torch.bfloat16 and val.dtype == torch.float32
    assert idx.dtype == torch.int64 and idx.numel() == val.numel() < 1 << 32
    assert flat.is_contiguous() and idx.is_contiguous() and val.is_contiguous()
    bad = lib.add_at_bf16_rounded(
        flat.data_ptr(), flat.numel(), idx.data_ptr(), val.data_ptr(), idx.numel(), *words
    )
    if bad:
        raise IndexError(
            f"add_at_bf16_rounded_: index {int(idx[bad - 1])} (entry {bad - 1}) is outside "
            f"[0, {flat.numel()}) of the bfloat16 tensor; nothing was written."
        )


def positions(keys: Tensor, queries: Tensor) -> Tensor:
    """For sorted int64 queries, their positions in the sorted, distinct int64 keys, or -1."""
    lib = library()
    assert lib is not None and keys.dtype == queries.dtype == torch.int64
    out = torch.empty_like(queries)
    lib.positions_i64(
        keys.data_ptr(), keys.numel(), queries.data_ptr(), queries.numel(), out.data_ptr()
    )
    return out


def delta_hist(x: Tensor, base: Tensor, bins: int) -> Tensor:
    """The int64 histogram [bins] of the top 16 bits of |x - base| (float32 bits) for
    contiguous float32 host tensors of one shape: one pass, no delta tensor; split into one
    range per torch thread when long (a histogram row each, summed)."""
    lib = library()
    assert lib is not None and x.dtype == base.dtype == torch.float32
    assert x.is_contiguous() and base.is_contiguous() and x.shape == base.shape
    ranges = _ranges(x.numel())
    hists = torch.zeros(len(ranges), bins, dtype=torch.int64)
    row = {lo: i for i, (lo, _) in enumerate(ranges)}

    def count(lo: int, hi: int) -> None:
        h = hists[row[lo]].data_ptr()
        lib.delta_hist_f32(x.data_ptr() + 4 * lo, base.data_ptr() + 4 * lo, hi - lo, h)

    _run(count, ranges)
    return hists[0] if len(ranges) == 1 else hists.sum(0)


def delta_bucket(x: Tensor, base: Tensor, bucket: int, out: Tensor) -> int:
    """Write the int32 bits of |x - base| whose top 16 bits are `bucket` to the front of out
    (int32), in index order; returns how many there are (more than out holds: only its
    length was written)."""
    lib = library()
    assert lib is not None and x.dtype == base.dtype == torch.float32
    assert x.is_contiguous() and base.is_contiguous() and out.dtype == torch.int32
    return lib.delta_bucket_f32(
        x.data_ptr(), base.data_ptr(), x.numel(), bucket, out.data_ptr(), out.numel()
    )
