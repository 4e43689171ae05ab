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
- `rank_rows`: DELLA's per-row magnitude ranks with a radix sort per row (O(d)), where torch
  needs a stable comparison sort and a scatter.
- `delta_hist_window`, `delta_hist_strided`, `delta_bucket`: TIES' magnitude cut over row
  blocks (`selection.delta_magnitude_cuts`) straight from x and base: the bits of |x - base|
  counted by their top 16 bits while those in a window of buckets guessed from a sample are
  kept, and (where the guess missed) those of one bucket collected in a second pass, where
  torch needs a delta, an abs, a digit copy and a bincount per block.
- `ties_merge`, `ties_consensus`: TIES' merge pass (the cut, the weights, the sign election,
  the mix, the divisor and the final sum) in one loop, entry for entry torch's float32 steps.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
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
   tensor: for d = x[i] - b[i] (one float32 subtraction, as torch's), the int32 bits of |d|,
   counted by their top 16 bits into hist[0..2**15) (the first pass), and those of one bucket
   collected (delta_bucket_f32, the second pass where the first one's window missed it). */
static inline uint32_t delta_bits(float x, float b) {
    union { float f; uint32_t u; } d;
    d.f = x - b;
    return d.u & 0x7FFFFFFFu;
}

/* Every entry's top 16 bits counted into hist, and the bits whose top 16 lie in a window of
   buckets [lo, hi] (guessed before the histogram is known) appended to out (up to cap, in
   index order). Returns how many lie in the window. */
int64_t delta_hist_window_f32(const float *x, const float *b, int64_t n, int64_t *hist,
                              uint32_t lo, uint32_t hi, int32_t *out, int64_t cap) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = delta_bits(x[i], b[i]), top = u >> 16;
        hist[top]++;
        if (top - lo <= hi - lo) {
            if (c < cap) out[c] = (int32_t)u;
            c++;
        }
    }
    return c;
}

/* The histogram of every stride-th entry (a sample): returns how many were counted */
int64_t delta_hist_strided_f32(const float *x, const float *b, int64_t n, int64_t stride,
                               int64_t *hist) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i += stride, c++) hist[delta_bits(x[i], b[i]) >> 16]++;
    return c;
}

/* Appends the bits whose top 16 equal bucket to out (up to cap, in index order), returns how
   many there are */
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

/* DELLA's ranks (sparsify.della_keep_prob): for each of `rows` rows of d keys, ranks[i] = the
   position of entry i in the row's stable ascending order (ties by position). An LSD radix
   sort, 8 bits a digit, skipping digits every key of the row shares: O(d) per row where a
   comparison sort is O(d log d). a and b hold d indices each (the sort's two buffers). */
void rank_rows_u32(const uint32_t *keys, int64_t rows, int64_t d, int64_t *ranks,
                   uint32_t *a, uint32_t *b) {
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *k = keys + r * d;
        uint32_t all_or = 0, all_and = 0xFFFFFFFFu;
        for (int64_t i = 0; i < d; i++) { a[i] = (uint32_t)i; all_or |= k[i]; all_and &= k[i]; }
        for (int shift = 0; shift < 32; shift += 8) {
            if ((((all_or ^ all_and) >> shift) & 0xFFu) == 0) continue;  /* one digit value */
            int64_t count[257] = {0};
            for (int64_t i = 0; i < d; i++) count[((k[a[i]] >> shift) & 0xFFu) + 1]++;
            for (int v = 0; v < 256; v++) count[v + 1] += count[v];
            for (int64_t i = 0; i < d; i++) b[count[(k[a[i]] >> shift) & 0xFFu]++] = a[i];
            uint32_t *t = a; a = b; b = t;
        }
        for (int64_t j = 0; j < d; j++) ranks[r * d + a[j]] = j;
    }
}

/* ---- TIES' merge pass (blend.ties_merge, blend.ties_consensus_) ------------------------------
   Entry for entry the float32 operations of the torch path, in its order and with its rounding,
   so the output bits are the same: x - b; the cut (selection.apply_cut_: hardshrink, then ties
   past the quota zeroed); * w; the sign elected from the sum over the models in model order (a
   sum >= 0 is +1, NaN is -1); each term times the sign, clamp_min 0 (keeps -0.0 and NaN); the
   mixed sum and the divisor sum_i w_i * sign(term) from +0; mixed * sign; the divisor's zeros
   replaced (blend.nonzero_divisor_); then base + mixed / divisor (addcdiv), with lambda
   ((mixed / divisor) * lambda) or without the division (normalize false). torch.sign(NaN) is
   0. The entries go TIES_CHUNK at a time through a scratch of (3 + n) * TIES_CHUNK floats. */
#define TIES_CHUNK 256
#define TIES_NORMALIZE 1   /* divide by the divisor */
#define TIES_ALL_POSITIVE 2 /* every weight > 0: the divisor is clamped to wmin, else 0 -> 1 */
#define TIES_LAMBDA 4      /* lambda != 1: one more multiply */

static inline uint32_t mag_bits(float v) {
    union { float f; uint32_t u; } c;
    c.f = v;
    return c.u & 0x7FFFFFFFu;
}

/* hardshrink(d, below): 0 where -below <= d <= below, else d (NaN d, or a NaN below, keep d) */
static inline float shrink(float d, float below) {
    return (d >= -below && d <= below) ? 0.0f : d;
}

/* The consensus of m <= TIES_CHUNK entries from the n weighted deltas rows[i][0..m), into out */
static void ties_tail(const float *const *rows, int64_t n, int64_t m, const float *w,
                      const float *b, int32_t flags, float lam, float wmin, float *out,
                      float *scratch) {
    float *sign = scratch, *mixed = scratch + TIES_CHUNK, *div = scratch + 2 * TIES_CHUNK;
    for (int64_t j = 0; j < m; j++) sign[j] = rows[0][j];
    for (int64_t i = 1; i < n; i++)
        for (int64_t j = 0; j < m; j++) sign[j] = sign[j] + rows[i][j];
    for (int64_t j = 0; j < m; j++) {
        sign[j] = sign[j] >= 0.0f ? 1.0f : -1.0f;
        mixed[j] = 0.0f;
        div[j] = 0.0f;
    }
    for (int64_t i = 0; i < n; i++) {
        const float *k = rows[i], wi = w[i];
        for (int64_t j = 0; j < m; j++) {
            float d = k[j] * sign[j];
            d = d < 0.0f ? 0.0f : d;
            mixed[j] = mixed[j] + d;
            div[j] = div[j] + wi * (d > 0.0f ? 1.0f : 0.0f);
        }
    }
    for (int64_t j = 0; j < m; j++) {
        float v = mixed[j] * sign[j];
        if (flags & TIES_NORMALIZE) {
            float q = div[j];
            if (flags & TIES_ALL_POSITIVE) q = q < wmin ? wmin : q;
            else q = q == 0.0f ? 1.0f : q;
            v = v / q;
        }
        if (flags & TIES_LAMBDA) v = v * lam;
        out[j] = b[j] + v;
    }
}

/* The cut of model i on m entries, weighted: k[j] = cut(x[j] - b[j]) * w. mode 0 keeps all,
   1 none (+0), 2 keeps shrink(d, below), 3 also zeroes the entries whose kept magnitude has the
   bits tie once *quota of them were kept (in index order; *quota counts down, *seen counts
   them). A chunk's ties are counted first (a vectorized loop): only the chunk where the quota
   runs out needs the entry-by-entry loop. */
static void ties_cut(const float *x, const float *b, int64_t m, int32_t mode, float below,
                     uint32_t tie, int64_t *quota, int64_t *seen, float w, float *k) {
    if (mode == 1) {
        for (int64_t j = 0; j < m; j++) k[j] = 0.0f * w;
        return;
    }
    if (mode == 0)
        for (int64_t j = 0; j < m; j++) k[j] = x[j] - b[j];
    else
        for (int64_t j = 0; j < m; j++) k[j] = shrink(x[j] - b[j], below);
    if (mode == 3) {
        int64_t c = 0;
        for (int64_t j = 0; j < m; j++) c += mag_bits(k[j]) == tie;
        *seen += c;
        if (c <= *quota) {
            *quota -= c;  /* every tie here is kept */
        } else if (*quota == 0) {
            for (int64_t j = 0; j < m; j++) k[j] = mag_bits(k[j]) == tie ? 0.0f : k[j];
        } else {
            for (int64_t j = 0; j < m; j++)
                if (mag_bits(k[j]) == tie) {
                    if (*quota > 0) --*quota;
                    else k[j] = 0.0f;
                }
        }
    }
    for (int64_t j = 0; j < m; j++) k[j] = k[j] * w;
}

/* TIES merge of len entries: b the base, xs[i] model i's entries (n pointers), mode / below /
   tie / quota / seen / w per model as in ties_cut, flags TIES_*, into out. */
void ties_merge_f32(const float *b, const int64_t *xs, int64_t n, int64_t len,
                    const int32_t *mode, const float *below, const uint32_t *tie, int64_t *quota,
                    int64_t *seen, const float *w, int32_t flags, float lam, float wmin,
                    float *out, float *scratch) {
    float *k = scratch + 3 * TIES_CHUNK;
    const float *rows[n];
    for (int64_t i = 0; i < n; i++) rows[i] = k + i * TIES_CHUNK;
    for (int64_t s = 0; s < len; s += TIES_CHUNK) {
        int64_t m = len - s < TIES_CHUNK ? len - s : TIES_CHUNK;
        for (int64_t i = 0; i < n; i++)
            ties_cut((const float *)xs[i] + s, b + s, m, mode[i], below[i], tie[i], quota + i,
                     seen + i, w[i], k + i * TIES_CHUNK);
        ties_tail(rows, n, m, w, b + s, flags, lam, wmin, out + s, scratch);
    }
}

/* The consensus alone: ks[i] model i's weighted delta (n pointers to len floats) */
void ties_consensus_f32(const float *b, const int64_t *ks, int64_t n, int64_t len,
                        const float *w, int32_t flags, float lam, float wmin, float *out,
                        float *scratch) {
    const float *rows[n];
    for (int64_t s = 0; s < len; s += TIES_CHUNK) {
        int64_t m = len - s < TIES_CHUNK ? len - s : TIES_CHUNK;
        for (int64_t i = 0; i < n; i++) rows[i] = (const float *)ks[i] + s;
        ties_tail(rows, n, m, w, b + s, flags, lam, wmin, out + s, scratch);
    }
}

/* How many of len entries the cut (mode 3) meets at its threshold: a range's share of the ties,
   so that ranges merged on several threads know how many ties the ranges before them kept. */
int64_t ties_count_f32(const float *x, const float *b, int64_t len, float below, uint32_t tie) {
    int64_t c = 0;
    for (int64_t j = 0; j < len; j++) c += mag_bits(shrink(x[j] - b[j], below)) == tie;
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

/* ---- fused_: the row-local blends of blend.Elementwise in one pass over the stored inputs.
   Tiles of FUSED_TILE entries: each input is widened to float32 into a tile (bf16: its bits
   shifted up, exact), the op sequence the torch path runs is applied tile by tile in float32
   (same operations, same order, same rounding: built with -ffp-contract=off, a fused
   multiply-add only where torch uses one, FUSED_FMA_*), and the result is rounded to the
   output dtype (bf16: to nearest even, as torch's cast). Input and output bits are checked for
   Inf/NaN on the way (an exponent of all ones), so no separate pass is needed. */
enum { FUSED_F32 = 0, FUSED_BF16 = 1 };
enum { FUSED_LINEAR = 0, FUSED_TASK = 1, FUSED_SLERP = 2, FUSED_LERP = 3 };
enum {
    FUSED_SHORTCUT = 1,   /* linear: weight[0] == 1, the first add writes x0 + w1 * x1 */
    FUSED_DIVIDE = 2,     /* divide by p[0] (normalize) */
    FUSED_SCALE = 4,      /* multiply by p[1] (task arithmetic's lambda) */
    FUSED_FMA_ADD = 8,    /* add(alpha=w) is fma(w, x, acc), as torch's vectorized add */
    FUSED_FMA_LERP = 16,  /* lerp is an fma, as torch's vectorized lerp */
    FUSED_RECIPROCAL = 32 /* a division by a scalar is a multiply by its float reciprocal */
};
#define FUSED_TILE 512

typedef union { float f; uint32_t u; } fused_bits;

static inline __attribute__((always_inline))
uint32_t fused_load(const void *x, int32_t dtype, int64_t lo, int64_t m, float *t) {
    uint32_t bad = 0;
    if (dtype == FUSED_BF16) {
        const uint16_t *p = (const uint16_t *)x + lo;
        for (int64_t j = 0; j < m; j++) {
            fused_bits b; b.u = (uint32_t)p[j] << 16; t[j] = b.f;
            bad |= (p[j] & 0x7F80u) == 0x7F80u;
        }
    } else {
        const uint32_t *p = (const uint32_t *)x + lo;
        for (int64_t j = 0; j < m; j++) {
            fused_bits b; b.u = p[j]; t[j] = b.f;
            bad |= (p[j] & 0x7F800000u) == 0x7F800000u;
        }
    }
    return bad;
}

static inline __attribute__((always_inline))
uint32_t fused_store(const float *t, int64_t m, void *out, int32_t dtype, int64_t lo) {
    uint32_t bad = 0;
    if (dtype == FUSED_BF16) {
        uint16_t *p = (uint16_t *)out + lo;
        for (int64_t j = 0; j < m; j++) {
            fused_bits b; b.f = t[j];
            uint16_t h = t[j] != t[j] ? (uint16_t)0x7FC0u
                                      : (uint16_t)((b.u + 0x7FFFu + ((b.u >> 16) & 1u)) >> 16);
            p[j] = h;
            bad |= (h & 0x7F80u) == 0x7F80u;
        }
    } else {
        uint32_t *p = (uint32_t *)out + lo;
        for (int64_t j = 0; j < m; j++) {
            fused_bits b; b.f = t[j]; p[j] = b.u;
            bad |= (b.u & 0x7F800000u) == 0x7F800000u;
        }
    }
    return bad;
}

/* acc[j] <- acc[j] + w * x[j], fused or not (torch's add(acc, x, alpha=w)) */
static inline __attribute__((always_inline))
void fused_axpy(float *acc, const float *x, float w, int64_t m, int fma) {
    if (fma) for (int64_t j = 0; j < m; j++) acc[j] = __builtin_fmaf(w, x[j], acc[j]);
    else for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + w * x[j];
}

static inline __attribute__((always_inline))
void fused_divide(float *acc, float d, int64_t m, int reciprocal) {
    if (reciprocal) { float r = 1.0f / d; for (int64_t j = 0; j < m; j++) acc[j] *= r; }
    else for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / d;
}

/* torch.lerp(a, b, w) for a scalar weight: small weights from a, others from b */
static inline __attribute__((always_inline))
void fused_lerp(float *a, const float *b, float w, int64_t m, int fma) {
    int small = fabsf(w) < 0.5f;
    for (int64_t j = 0; j < m; j++) {
        float d = b[j] - a[j];
        if (fma) a[j] = small ? __builtin_fmaf(w, d, a[j]) : __builtin_fmaf(w - 1.0f, d, b[j]);
        else a[j] = small ? a[j] + w * d : b[j] - d * (1.0f - w);
    }
}

/* One tile [lo, lo + m) of a blend; bad[i] |= input i non-finite; returns output non-finite. */
static inline __attribute__((always_inline))
uint32_t fused_tile(int32_t kind, int32_t n, const void *const *xs, const int32_t *dtypes,
                    const float *w, const float *p, int32_t flags, void *out, int32_t odt,
                    int64_t lo, int64_t m, uint8_t *bad, int fma_add, int fma_lerp) {
    float acc[FUSED_TILE], x[FUSED_TILE], b[FUSED_TILE];
    int recip = (flags & FUSED_RECIPROCAL) != 0;
    if (kind == FUSED_LINEAR) {  /* blend.weighted_sum, then / divisor */
        bad[0] |= fused_load(xs[0], dtypes[0], lo, m, acc);
        int i = 1;
        if (flags & FUSED_SHORTCUT) {  /* x0 + w1 * x1 into the new tensor */
            bad[1] |= fused_load(xs[1], dtypes[1], lo, m, x);
            fused_axpy(acc, x, w[1], m, fma_add);
            i = 2;
        } else {
            for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * w[0];
        }
        for (; i < n; i++) {
            bad[i] |= fused_load(xs[i], dtypes[i], lo, m, x);
            fused_axpy(acc, x, w[i], m, fma_add);
        }
        if (flags & FUSED_DIVIDE) fused_divide(acc, p[0], m, recip);
    } else if (kind == FUSED_TASK) {  /* xs[0] = base: base + lambda * sum w_i (x_i - base) */
        bad[0] |= fused_load(xs[0], dtypes[0], lo, m, b);
        for (int i = 1; i < n; i++) {
            bad[i] |= fused_load(xs[i], dtypes[i], lo, m, x);
            if (i == 1) for (int64_t j = 0; j < m; j++) acc[j] = (x[j] - b[j]) * w[0];
            else for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + (x[j] - b[j]) * w[i - 1];
        }
        if (flags & FUSED_DIVIDE) fused_divide(acc, p[0], m, recip);
        if (flags & FUSED_SCALE) for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * p[1];
        for (int64_t j = 0; j < m; j++) acc[j] = b[j] + acc[j];
    } else if (kind == FUSED_SLERP) {  /* a * s0 + b * s1 */
        bad[0] |= fused_load(xs[0], dtypes[0], lo, m, acc);
        bad[1] |= fused_load(xs[1], dtypes[1], lo, m, x);
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * p[2] + x[j] * p[3];
    } else {  /* lerp from xs[0] (t = 0) to xs[1] */
        bad[0] |= fused_load(xs[0], dtypes[0], lo, m, acc);
        bad[1] |= fused_load(xs[1], dtypes[1], lo, m, x);
        fused_lerp(acc, x, p[4], m, fma_lerp);
    }
    return fused_store(acc, m, out, odt, lo);
}

#define FUSED_LOOP(FA, FL)                                                                 \
    uint32_t obad = 0;                                                                     \
    for (int64_t lo = start; lo < stop; lo += FUSED_TILE) {                                \
        int64_t m = stop - lo < FUSED_TILE ? stop - lo : FUSED_TILE;                       \
        obad |= fused_tile(kind, n, xs, dtypes, w, p, flags, out, odt, lo, m, bad, FA, FL); \
    }                                                                                      \
    return obad;

#define FUSED_ARGS int32_t kind, int32_t n, const void *const *xs, const int32_t *dtypes,   \
    const float *w, const float *p, int32_t flags, void *out, int32_t odt, int64_t start,  \
    int64_t stop, uint8_t *bad

static uint32_t fused_plain(FUSED_ARGS) { FUSED_LOOP(0, 0) }
static uint32_t fused_any(FUSED_ARGS) {
    FUSED_LOOP((flags & FUSED_FMA_ADD) != 0, (flags & FUSED_FMA_LERP) != 0)
}
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static uint32_t fused_avx2(FUSED_ARGS) {
    FUSED_LOOP((flags & FUSED_FMA_ADD) != 0, (flags & FUSED_FMA_LERP) != 0)
}
#endif

/* Entries [start, stop) of a blend of n inputs xs (element 0 of each, dtypes FUSED_F32 or
   FUSED_BF16) into out (dtype odt): w the weights (task arithmetic: of xs[1..n)), p the
   scalars (divisor, lambda, s0, s1, t). bad[i] is set when input i holds Inf or NaN; the
   return value is 1 when the output does (after rounding to its dtype). */
int64_t fused_blend(FUSED_ARGS) {
    if (!(flags & (FUSED_FMA_ADD | FUSED_FMA_LERP)))
        return fused_plain(kind, n, xs, dtypes, w, p, flags, out, odt, start, stop, bad);
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return fused_avx2(kind, n, xs, dtypes, w, p, flags, out, odt, start, stop, bad);
#endif
    return fused_any(kind, n, xs, dtypes, w, p, flags, out, odt, start, stop, bad);
}

/* slerp's angle pass (blend.slerp_sums): the float64 products a*a, b*b and a*b of entries
   [start, stop) of two stored tensors (FUSED_F32 or FUSED_BF16), written to aa, bb, ab at
   [0, stop - start): widened exactly, one rounding per product, as torch's float64 mul. */
void fused_products(const void *a, int32_t da, const void *b, int32_t db, int64_t start,
                    int64_t stop, double *aa, double *bb, double *ab) {
    float x[FUSED_TILE], y[FUSED_TILE];
    for (int64_t lo = start; lo < stop; lo += FUSED_TILE) {
        int64_t m = stop - lo < FUSED_TILE ? stop - lo : FUSED_TILE, o = lo - start;
        fused_load(a, da, lo, m, x);
        fused_load(b, db, lo, m, y);
        for (int64_t j = 0; j < m; j++) {
            double u = x[j], v = y[j];
            aa[o + j] = u * u;
            bb[o + j] = v * v;
            ab[o + j] = u * v;
        }
    }
}

/* torch's float64 sum over the last dimension of a contiguous [rows, n] tensor, in its order
   (blend.StableSum's row sums): `lanes`-wide vector accumulators (torch's Vectorized<double>
   width: 8 with AVX-512, 4 with AVX2; probed, not assumed), four of them side by side, each
   summed in a 4-level cascade of chunks of 2**max(4, ceil(log2(groups)) / 4) groups; then
   the leftover vectors into the first, the other three into it, the scalar tail into a zero
   and the lanes after it, in order, and the result added to a zero output. */
#define FUSED_MAX_LANES 16
static double fused_row_sum(const double *x, int64_t n, int64_t lanes) {
    int64_t nvec = n / lanes, groups = nvec / 4;
    int64_t clog = groups <= 2 ? 1 : 64 - __builtin_clzll((uint64_t)(groups - 1));
    int64_t power = clog / 4 > 4 ? clog / 4 : 4, step = (int64_t)1 << power;
    double acc[4][4][FUSED_MAX_LANES] = {{{0}}}; /* [level][accumulator][lane] */
    int64_t i = 0;
    while (i + step <= groups) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += x[(i * 4 + k) * lanes + l];
        for (int lv = 1; lv < 4; lv++) {
            for (int k = 0; k < 4; k++)
                for (int64_t l = 0; l < lanes; l++) {
                    acc[lv][k][l] += acc[lv - 1][k][l];
                    acc[lv - 1][k][l] = 0.0;
                }
            if ((i & ((step - 1) << (lv * power))) != 0) break;
        }
    }
    for (; i < groups; i++)
        for (int k = 0; k < 4; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += x[(i * 4 + k) * lanes + l];
    for (int lv = 1; lv < 4; lv++)
        for (int k = 0; k < 4; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += acc[lv][k][l];
    for (int64_t v = groups * 4; v < nvec; v++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += x[v * lanes + l];
    for (int k = 1; k < 4; k++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    double total = 0.0;
    for (int64_t e = nvec * lanes; e < n; e++) total += x[e];
    for (int64_t l = 0; l < lanes; l++) total += acc[0][0][l];
    return 0.0 + total;
}

/* out[r] = the sum of row r of a contiguous [rows, n] float64 array (n >= lanes); returns
   -1 (nothing written) for a lane count it does not take. */
int64_t fused_row_sums(const double *x, int64_t rows, int64_t n, int64_t lanes, double *out) {
    if (lanes < 1 || lanes > FUSED_MAX_LANES || n < lanes) return -1;
    for (int64_t r = 0; r < rows; r++) out[r] = fused_row_sum(x + r * n, n, lanes);
    return 0;
}

/* slerp's angle pass in one read: for rows [r0, r1) of n entries (from entry 0 of a and b,
   stored as FUSED_F32 or FUSED_BF16), the torch-order row sums (fused_row_sum) of the float64
   products a*a, b*b and a*b into aa, bb, ab at [r0, r1); scratch holds 3 * n doubles (one
   row of each product, cache-resident). */
int64_t fused_product_row_sums(const void *a, int32_t da, const void *b, int32_t db,
                               int64_t r0, int64_t r1, int64_t n, int64_t lanes,
                               double *scratch, double *aa, double *bb, double *ab) {
    if (lanes < 1 || lanes > FUSED_MAX_LANES || n < lanes) return -1;
    for (int64_t r = r0; r < r1; r++) {
        fused_products(a, da, b, db, r * n, (r + 1) * n, scratch, scratch + n, scratch + 2 * n);
        aa[r] = fused_row_sum(scratch, n, lanes);
        bb[r] = fused_row_sum(scratch + n, n, lanes);
        ab[r] = fused_row_sum(scratch + 2 * n, n, lanes);
    }
    return 0;
}
"""

# -ffp-contract=off: a * b + c stays two roundings, as in torch's separate ops (compilers may
# otherwise fuse it where the target has FMA); the fused_ kernels ask for fma explicitly.
# -fno-trapping-math lets gcc vectorize the TIES kernels' selects (values unchanged).
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math")
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
    lib.delta_bucket_f32.argtypes = [ptr, ptr, i64, u32, ptr, i64]
    lib.delta_bucket_f32.restype = i64
    lib.rank_rows_u32.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.rank_rows_u32.restype = None
    lib.delta_hist_window_f32.argtypes = [ptr, ptr, i64, ptr, u32, u32, ptr, i64]
    lib.delta_hist_window_f32.restype = i64
    lib.delta_hist_strided_f32.argtypes = [ptr, ptr, i64, i64, ptr]
    lib.delta_hist_strided_f32.restype = i64
    lib.ties_merge_f32.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.ties_merge_f32.argtypes += [ctypes.c_int32, ctypes.c_float, ctypes.c_float, ptr, ptr]
    lib.ties_merge_f32.restype = None
    lib.ties_consensus_f32.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int32]
    lib.ties_consensus_f32.argtypes += [ctypes.c_float, ctypes.c_float, ptr, ptr]
    lib.ties_consensus_f32.restype = None
    lib.ties_count_f32.argtypes = [ptr, ptr, i64, ctypes.c_float, u32]
    lib.ties_count_f32.restype = i64
    i32 = ctypes.c_int32
    lib.fused_blend.argtypes = [i32, i32, ptr, ptr, ptr, ptr, i32, ptr, i32, i64, i64, ptr]
    lib.fused_blend.restype = i64
    lib.fused_products.argtypes = [ptr, i32, ptr, i32, i64, i64, ptr, ptr, ptr]
    lib.fused_products.restype = None
    lib.fused_row_sums.argtypes = [ptr, i64, i64, i64, ptr]
    lib.fused_row_sums.restype = i64
    lib.fused_product_row_sums.argtypes = [ptr, i32, ptr, i32, i64, i64, i64, i64] + [ptr] * 4
    lib.fused_product_row_sums.restype = i64
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


def rank_rows(keys: Tensor) -> Tensor:
    """int64 [R, D] ranks of a contiguous int32 host tensor [R, D] of non-negative keys: entry
    i of row r gets its position in the row's stable ascending order (what a stable sort and a
    scatter of arange give). Rows are split across torch's threads, each with its own buffers."""
    lib = library()
    assert lib is not None and keys.dtype == torch.int32 and keys.is_contiguous()
    rows, d = keys.shape
    ranks = torch.empty(rows, d, dtype=torch.int64)
    if keys.numel() == 0:
        return ranks

    def part(lo: int, hi: int) -> None:
        a, b = torch.empty(d, dtype=torch.int32), torch.empty(d, dtype=torch.int32)
        k, out = keys.data_ptr() + 4 * lo * d, ranks.data_ptr() + 8 * lo * d
        lib.rank_rows_u32(k, hi - lo, d, out, a.data_ptr(), b.data_ptr())

    parts = max(1, min(torch.get_num_threads(), keys.numel() // PARALLEL_MIN, rows))
    cuts = [rows * i // parts for i in range(parts + 1)]
    _run(part, list(zip(cuts[:-1], cuts[1:], strict=True)))
    return ranks


def delta_hist_strided(x: Tensor, base: Tensor, bins: int, stride: int) -> tuple[Tensor, int]:
    """(`delta_hist` of every stride-th entry, how many that is): a sample, in one thread."""
    lib = library()
    assert lib is not None and x.dtype == base.dtype == torch.float32
    assert x.is_contiguous() and base.is_contiguous() and x.shape == base.shape
    hist = torch.from_numpy(np.zeros(bins, dtype=np.int64))  # (numpy: no thread hand-off)
    m = lib.delta_hist_strided_f32(
        x.data_ptr(), base.data_ptr(), x.numel(), stride, hist.data_ptr()
    )
    return hist, m


def delta_hist_window(
    x: Tensor, base: Tensor, bins: int, lo: int, hi: int, cap: int
) -> tuple[Tensor, Tensor | None]:
    """`delta_hist` and, in the same pass, the int32 bits of |x - base| whose top 16 bits lie
    in [lo, hi] (in index order), or None when more than cap of them are there. Split into one
    range per torch thread when long, each with its own histogram row and cap."""
    lib = library()
    assert lib is not None and x.dtype == base.dtype == torch.float32
    assert x.is_contiguous() and base.is_contiguous() and x.shape == base.shape
    ranges = _ranges(x.numel())
    hists = torch.from_numpy(np.zeros((len(ranges), bins), dtype=np.int64))
    found = torch.empty(len(ranges), cap, dtype=torch.int32)  # pages touched only as written
    row = {lo_: i for i, (lo_, _) in enumerate(ranges)}

    def scan(start: int, stop: int) -> int:
        r = row[start]
        xp, bp = x.data_ptr() + 4 * start, base.data_ptr() + 4 * start
        h, out = hists[r].data_ptr(), found[r].data_ptr()
        return lib.delta_hist_window_f32(xp, bp, stop - start, h, lo, hi, out, cap)

    counts = _run(scan, ranges)
    # numpy sums and joins the rows (torch would hand these small ops to its threads)
    hist = hists[0] if len(ranges) == 1 else torch.from_numpy(hists.numpy().sum(0))
    if max(counts) > cap:
        return hist, None
    if len(ranges) == 1:
        return hist, found[0, : counts[0]]
    parts = [found[r, :c].numpy() for r, c in enumerate(counts)]
    return hist, torch.from_numpy(np.concatenate(parts))


# -- TIES' merge pass ------------------------------------------------------------------------------

TIES_CHUNK = 256  # entries per step of the kernels (their scratch holds (3 + n) chunks)
TIES_NORMALIZE, TIES_ALL_POSITIVE, TIES_LAMBDA = 1, 2, 4  # the kernels' flags


@dataclass(frozen=True)
class TiesCut:
    """What `selection.apply_cut_` does to one model's block, for the kernel: mode 0 keeps
    every entry, 1 none, 2 those with |x - b| > below (hardshrink), 3 also only the first
    `quota` of those whose magnitude has the bits `tie_bits` (the threshold's)."""

    mode: int
    below: float = 0.0
    tie_bits: int = 0
    quota: int = 0


def _int64s(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


def ties_merge(
    out: Tensor,
    base: Tensor,
    xs: list[Tensor],
    cuts: list[TiesCut],
    weights: Tensor,
    flags: int,
    lam: float,
    wmin: float,
) -> list[int]:
    """TIES' merge of contiguous float32 host tensors of one shape into out (see the C source):
    weights float32 [n]. Returns the ties each mode-3 cut met (its `ties_total` share). Long
    tensors run as one range per torch thread; range r keeps what ranges 0..r-1 left of a
    mode-3 cut's quota, so while range 0 is merged the other threads count the ties of
    ranges 0..R-2 (a cheap pass), then merge their own."""
    lib = library()
    assert lib is not None and all(_host_f32(t) for t in (out, base, *xs))
    n, ranges = len(xs), _ranges(base.numel())
    mode = torch.tensor([c.mode for c in cuts], dtype=torch.int32)
    below = torch.tensor([c.below for c in cuts], dtype=torch.float32)
    tie = torch.tensor([c.tie_bits for c in cuts], dtype=torch.int32)  # < 2**31: no sign bit
    seen = torch.zeros(len(ranges), n, dtype=torch.int64)
    scratch = torch.empty(len(ranges), (3 + n) * TIES_CHUNK, dtype=torch.float32)

    def merge(r: int, quotas: list[int]) -> None:
        lo, hi = ranges[r]
        ptrs = _int64s([x.data_ptr() + 4 * lo for x in xs])
        quota = _int64s(quotas)
        lib.ties_merge_f32(
            base.data_ptr() + 4 * lo, ptrs.data_ptr(), n, hi - lo, mode.data_ptr(),
            below.data_ptr(), tie.data_ptr(), quota.data_ptr(), seen[r].data_ptr(),
            weights.data_ptr(), flags, lam, wmin, out.data_ptr() + 4 * lo, scratch[r].data_ptr(),
        )  # fmt: skip

    def count(r: int) -> list[int]:  # the ties of each mode-3 cut in range r
        lo, hi = ranges[r]
        b = base.data_ptr() + 4 * lo
        return [
            lib.ties_count_f32(x.data_ptr() + 4 * lo, b, hi - lo, c.below, c.tie_bits)
            if c.mode == 3
            else 0
            for x, c in zip(xs, cuts, strict=True)
        ]

    full = [c.quota for c in cuts]
    if len(ranges) == 1 or all(c.mode != 3 for c in cuts):
        _run(lambda lo, hi: merge(ranges.index((lo, hi)), full), ranges)
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            first = pool.submit(merge, 0, full)
            counted = list(pool.map(count, range(len(ranges) - 1)))
            rest = [pool.submit(merge, r, q) for r, q in _later_quotas(full, counted)]
            for job in (first, *rest):
                job.result()
    return seen.sum(0).tolist()


def _host_f32(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _later_quotas(full: list[int], counted: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(r, each cut's quota left for range r) for r >= 1, from the ties counted in the ranges
    before it (counted[r] for range r): the quota is taken in index order."""
    left, out = list(full), []
    for r, counts in enumerate(counted, start=1):
        left = [max(0, lf - c) for lf, c in zip(left, counts, strict=True)]
        out.append((r, left))
    return out


def ties_consensus(
    out: Tensor,
    base: Tensor,
    ks: list[Tensor],
    weights: Tensor,
    flags: int,
    lam: float,
    wmin: float,
) -> None:
    """The TIES consensus of the weighted deltas ks into out (contiguous float32 host tensors of
    one shape; see the C source): sign election, mix, divisor, base + the result, one pass."""
    lib = library()
    assert lib is not None and all(_host_f32(t) for t in (out, base, *ks))
    n, ranges = len(ks), _ranges(base.numel())
    scratch = torch.empty(len(ranges), 3 * TIES_CHUNK, dtype=torch.float32)
    row = {lo: r for r, (lo, _) in enumerate(ranges)}

    def part(lo: int, hi: int) -> None:
        ptrs = _int64s([k.data_ptr() + 4 * lo for k in ks])
        lib.ties_consensus_f32(
            base.data_ptr() + 4 * lo, ptrs.data_ptr(), n, hi - lo, weights.data_ptr(), flags,
            lam, wmin, out.data_ptr() + 4 * lo, scratch[row[lo]].data_ptr(),
        )  # fmt: skip

    _run(part, ranges)


# the fused_blend kernel's dtype codes and flags (see SOURCE)
FUSED_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
FUSED_KINDS = {"linear": 0, "task_arithmetic": 1, "slerp": 2, "lerp": 3}
FUSED_SHORTCUT, FUSED_DIVIDE, FUSED_SCALE = 1, 2, 4
FUSED_FMA_ADD, FUSED_FMA_LERP, FUSED_RECIPROCAL = 8, 16, 32


def fused_blend(
    kind: str,
    xs: Sequence[Tensor],
    weights: Sequence[float],
    params: Sequence[float],
    flags: int,
    out: Tensor,
) -> tuple[list[bool], bool]:
    """One pass of `blend.Elementwise`'s kernel over contiguous host tensors of one numel
    (float32 or bfloat16 each, as stored) into out (float32 or bfloat16): params are
    (divisor, lambda, s0, s1, t). Returns (input i holds Inf/NaN, per input; the output does).
    Split into one range per torch thread when long; each range flags into its own row."""
    lib = library()
    assert lib is not None and all(x.numel() == out.numel() for x in xs)
    assert all(x.is_contiguous() and x.device.type == "cpu" for x in [*xs, out])
    n = len(xs)
    ptrs = (ctypes.c_void_p * n)(*[x.data_ptr() for x in xs])
    codes = (ctypes.c_int32 * n)(*[FUSED_DTYPES[x.dtype] for x in xs])
    w = (ctypes.c_float * max(1, len(weights)))(*weights)
    p = (ctypes.c_float * 5)(*params)
    ranges = _ranges(out.numel())
    bad = torch.zeros(len(ranges), n, dtype=torch.uint8)
    row = {lo: i for i, (lo, _) in enumerate(ranges)}
    kcode, ocode, optr = FUSED_KINDS[kind], FUSED_DTYPES[out.dtype], out.data_ptr()

    def part(lo: int, hi: int) -> int:
        flag_row = bad[row[lo]].data_ptr()
        return lib.fused_blend(kcode, n, ptrs, codes, w, p, flags, optr, ocode, lo, hi, flag_row)

    out_bad = any(_run(part, ranges))
    return [bool(b) for b in bad.amax(0).tolist()], out_bad


def fused_products(a: Tensor, b: Tensor, start: int, out: Tensor) -> None:
    """out[0], out[1], out[2] <- a*a, b*b, a*b in float64 for entries [start, start + n) of
    two contiguous host tensors of one numel stored as float32 or bfloat16, out a [3, n]
    float64 host tensor with contiguous rows: the widening and the three products of torch's
    ops, in one pass."""
    lib = library()
    assert lib is not None and a.numel() == b.numel() and out.dtype == torch.float64
    assert a.is_contiguous() and b.is_contiguous() and out.stride(1) == 1
    assert start + out.shape[1] <= a.numel() and out.device.type == "cpu"
    da, db = FUSED_DTYPES[a.dtype], FUSED_DTYPES[b.dtype]
    aa, bb, ab = (row.data_ptr() for row in out)

    def part(lo: int, hi: int) -> None:
        lib.fused_products(
            a.data_ptr(),
            da,
            b.data_ptr(),
            db,
            start + lo,
            start + hi,
            aa + 8 * lo,
            bb + 8 * lo,
            ab + 8 * lo,
        )

    _run(part, _ranges(out.shape[1]))


def fused_row_sums(rows: Tensor, lanes: int) -> Tensor:
    """torch's rows.sum(dim=1) of a contiguous [R, n] float64 host tensor (n >= lanes), in
    its summation order for `lanes`-wide vectors (which width torch uses is probed by the
    caller): the [R] float64 sums."""
    lib = library()
    assert lib is not None and rows.dtype == torch.float64 and rows.dim() == 2
    assert rows.is_contiguous() and rows.device.type == "cpu"
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    if lib.fused_row_sums(rows.data_ptr(), rows.shape[0], rows.shape[1], lanes, out.data_ptr()):
        raise ValueError(f"fused_row_sums: {lanes} lanes for rows of {rows.shape[1]}")
    return out


def fused_product_row_sums(a: Tensor, b: Tensor, n: int, lanes: int) -> Tensor:
    """[3, R] float64: the torch-order row sums (`fused_row_sums`) of the float64 products
    a*a, b*b and a*b over the R = numel / n rows of n entries of two contiguous host tensors
    stored as float32 or bfloat16, in one read and no product tensor; rows split across
    torch's thread count when there are many."""
    lib = library()
    assert lib is not None and a.numel() == b.numel() and a.numel() % n == 0
    assert a.is_contiguous() and b.is_contiguous() and a.device.type == b.device.type == "cpu"
    rows = a.numel() // n
    out = torch.empty(3, rows, dtype=torch.float64)
    parts = max(1, min(torch.get_num_threads(), a.numel() // PARALLEL_MIN, rows))
    cuts = [rows * i // parts for i in range(parts + 1)]
    scratch = torch.empty(parts, 3 * n, dtype=torch.float64)
    da, db = FUSED_DTYPES[a.dtype], FUSED_DTYPES[b.dtype]
    sums = [row.data_ptr() for row in out]
    part_of = {lo: i for i, lo in enumerate(cuts[:-1])}

    def part(r0: int, r1: int) -> int:
        work = scratch[part_of[r0]].data_ptr()
        args = (a.data_ptr(), da, b.data_ptr(), db, r0, r1, n, lanes, work, *sums)
        return lib.fused_product_row_sums(*args)

    if any(_run(part, list(zip(cuts[:-1], cuts[1:], strict=True)))):
        raise ValueError(f"fused_product_row_sums: {lanes} lanes for rows of {n}")
    return out
