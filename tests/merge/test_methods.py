"""Every registered merge method against an independent float64 reference.

The references below are written from the formulas in docs/methods.md (design notes section 1)
with plain float64 torch ops and sorting; they never call the primitives in `mergekit_rl.merge`.
Random masks are rebuilt the documented way: a CPU `torch.Generator` seeded with blake2b-64(seed, model id,
tensor name) >> 1, then `torch.rand(shape) < keep probability`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from mergekit_rl.errors import UsageError
from mergekit_rl.merge import rng, selection
from mergekit_rl.merge.registry import TensorContext, get_method, list_methods

SHAPE = (6, 11)  # small, 2-D, rows of odd length: exercises row-wise methods


def _randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def family(n: int, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> tuple[list[Tensor], Tensor]:
    """n fine-tuned float32 tensors and their base: x_i = base + small random delta."""
    base = _randn(*shape, seed=seed)
    xs = [base + _randn(*shape, seed=seed + 100 + i, scale=0.1) for i in range(n)]
    return xs, base


def merge(
    name: str,
    xs: list[Tensor],
    base: Tensor | None,
    model_params: list[dict[str, Any]] | None = None,
    global_params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    tensor: str = "model.layers.0.mlp.up_proj.weight",
) -> Tensor:
    ctx = TensorContext(tensor, tuple(f"m{i}" for i in range(len(xs))), seed)
    mps = model_params if model_params is not None else [{} for _ in xs]
    return get_method(name).run(ctx, xs, base, mps, global_params or {})


def assert_matches(got: Tensor, want: Tensor, rel: float = 1e-6) -> None:
    """Within rel of the reference, relative to the tensor's scale (float32 rounding)."""
    assert got.shape == want.shape and got.dtype == torch.float32
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * scale)


# ---- independent references (float64) ---------------------------------------------------------


def ref_seed(seed: int, *keys: str) -> int:
    h = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for key in keys:
        h.update(b"\x00" + key.encode())
    return int.from_bytes(h.digest(), "little") >> 1


def ref_words(n: int, seed: int, model: str, name: str) -> list[int]:
    """The counter-based hash word of each entry of one model's tensor (pure Python)."""
    key = ref_seed(seed, model, name)
    return [rng.hash_word(key, i) for i in range(n)]


def ref_dare_keep(shape: tuple[int, ...], density: float, seed: int, model: str, name: str):
    """DARE keep mask: the top 31 bits of each entry's word below density * 2**31."""
    cut = round(density * 2**31)
    words = ref_words(math.prod(shape), seed, model, name)
    return torch.tensor([(w >> 1) < cut for w in words]).reshape(shape)


def ref_uniform(shape: tuple[int, ...], seed: int, model: str, name: str) -> Tensor:
    """DELLA's uniforms: the top 24 bits of each entry's word, times 2**-24."""
    words = ref_words(math.prod(shape), seed, model, name)
    return torch.tensor([(w >> 8) * 2.0**-24 for w in words], dtype=torch.float64).reshape(shape)


def ref_top_k(d: Tensor, density: float, at_least_one: bool = True) -> Tensor:
    """Keep mask of exactly k = int(density * numel) entries with the largest |d| (at least 1
    for density > 0: mergekit's rule, the default), ties with the k-th taken in index order (a
    stable sort keeps equal entries in index order)."""
    k = int(density * d.numel())
    if at_least_one and density > 0:
        k = max(k, 1)
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[d.abs().flatten().argsort(descending=True, stable=True)[:k]] = True
    return keep.reshape(d.shape)


def ref_breadcrumbs(d: Tensor, density: float, gamma: float) -> Tensor:
    """Keep the entries ranked n_top .. n_top + n_keep - 1 by descending |d|."""
    n = d.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    order = d.abs().flatten().argsort(descending=True, stable=True)  # ties in index order
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_top : n_top + n_keep]] = True
    return keep.reshape(d.shape)


def ref_della_probs(d: Tensor, density: float, epsilon: float) -> Tensor:
    """Per row of the last dimension: rank r (0 = smallest |d|) -> density - eps + 2 eps r/(D-1)."""
    rows = d.reshape(-1, d.shape[-1]) if d.dim() else d.reshape(1, 1)
    dim = rows.shape[-1]
    probs = torch.empty_like(rows)
    for i, row in enumerate(rows):
        ranks = row.abs().argsort(stable=True).argsort().double()
        frac = ranks / (dim - 1) if dim > 1 else torch.full_like(row, 0.5)
        probs[i] = density - epsilon + 2 * epsilon * frac
    return probs.reshape(d.shape)


def ref_task_vectors(
    xs: list[Tensor],
    base: Tensor,
    weights: list[float],
    keeps: list[Tensor] | None = None,
    probs: list[Tensor | float] | None = None,
    *,
    rescale: str | None = None,
    elect: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
) -> Tensor:
    """The six-step task-vector pipeline of docs/methods.md in float64."""
    b = base.double()
    terms = []
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        d = x.double() - b
        kept = d * keeps[i] if keeps is not None else d
        if rescale == "l1" and kept.abs().sum() > 0:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        elif rescale == "inverse_density":
            p = probs[i] if probs is not None else 1.0
            kept = torch.where(kept != 0, kept / p, 0.0)
        terms.append(w * kept)
    if elect:
        elected = torch.where(sum(terms) >= 0, 1.0, -1.0).double()
        agree = [torch.sign(t) == elected for t in terms]
        mixed = sum(t * a for t, a in zip(terms, agree, strict=True))
        divisor = sum(w * a.double() for w, a in zip(weights, agree, strict=True))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = sum(terms), sum(weights)
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def ref_slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    a64, b64 = a.double(), b.double()
    cos = float((a64.flatten() / a64.norm()) @ (b64.flatten() / b64.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a64 + t * b64
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)


def ref_model_stock(xs: list[Tensor], base: Tensor, filter_wise: bool = False) -> Tensor:
    b = base.double()
    rows = (lambda v: v.reshape(-1, v.shape[-1])) if filter_wise else (lambda v: v.reshape(1, -1))
    ds = [rows(x.double() - b) for x in xs]
    n = len(xs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (ds[i] * ds[j]).sum(-1)
            cos.append(num / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp_min(1e-6))
    c = torch.stack(cos).mean(0).clamp(-1, 1)
    t = (n * c / (1 + (n - 1) * c)).unsqueeze(-1)  # [R, 1]
    mean = sum(rows(x.double()) for x in xs) / n
    return (t * mean + (1 - t) * rows(b)).reshape(base.shape)


def ref_karcher_direction(units: list[Tensor], iters: int = 500) -> Tensor:
    """Riemannian gradient descent on the sphere to the point where the log maps sum to 0."""
    m = sum(units) / len(units)
    m = m / m.norm()
    for _ in range(iters):
        g = torch.zeros_like(m)
        for u in units:
            c = float(m @ u)
            th = math.acos(max(-1.0, min(1.0, c)))
            if th > 1e-15:
                g += th / math.sin(th) * (u - c * m) / len(units)
        gn = float(g.norm())
        if gn < 1e-13:  # converged (float64 rounding keeps it from reaching 0)
            break
        m = math.cos(gn) * m + math.sin(gn) * g / gn
        m = m / m.norm()
    return m


# ---- linear, slerp, nuslerp -----------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize: bool) -> None:
    xs, _ = family(3)
    ws = [0.5, 1.5, -0.25]
    got = merge("linear", xs, None, [{"weight": w} for w in ws], {"normalize": normalize})
    want = sum(w * x.double() for w, x in zip(ws, xs, strict=True))
    assert_matches(got, want / sum(ws) if normalize else want)


def test_linear_default_weights_are_a_uniform_mean() -> None:
    xs, _ = family(4)
    assert_matches(merge("linear", xs, None), sum(x.double() for x in xs) / 4)


def test_weights_summing_to_zero_is_an_error_not_nan() -> None:
    xs, base = family(2)
    zero = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(UsageError, match="sum to 0"):
        merge("linear", xs, None, zero)
    with pytest.raises(UsageError, match="sum to 0"):
        merge("task_arithmetic", xs, base, zero, {"normalize": True})
    # without normalize the sum is well defined: x0 - x1
    assert_matches(merge("linear", xs, None, zero, {"normalize": False}), xs[0].double() - xs[1])
    ta = merge("task_arithmetic", xs, base, zero)
    assert_matches(ta, ref_task_vectors(xs, base, [1.0, -1.0]))
    # TIES divides per entry by the weights that agreed there (0 -> 1): finite everywhere
    ties = merge("ties", xs, base, zero)
    assert torch.isfinite(ties).all()
    assert_matches(ties, ref_task_vectors(xs, base, [1.0, -1.0], elect=True, normalize=True))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t: float) -> None:
    (x,), base = family(1)
    assert_matches(merge("slerp", [x], base, None, {"t": t}), ref_slerp(base, x, t))


def test_slerp_endpoints_and_a_real_angle() -> None:
    # far from parallel, so the spherical branch runs (not the lerp fallback)
    a, b = _randn(40, seed=1), _randn(40, seed=2)
    assert abs(float(torch.nn.functional.cosine_similarity(a, b, dim=0))) < 0.5
    assert_matches(merge("slerp", [b], a, None, {"t": 0.0}), a.double())
    assert_matches(merge("slerp", [b], a, None, {"t": 1.0}), b.double())
    mid = merge("slerp", [b], a, None, {"t": 0.5})
    assert_matches(mid, ref_slerp(a, b, 0.5))
    # the midpoint of unit vectors stays on the sphere (a lerp would shrink it)
    au, bu = a / a.norm(), b / b.norm()
    assert float(merge("slerp", [bu], au, None, {"t": 0.5}).norm()) == pytest.approx(1.0, abs=1e-6)


def test_slerp_identical_and_antiparallel_inputs_fall_back_to_lerp() -> None:
    x = _randn(5, 3, seed=3)
    assert_matches(merge("slerp", [x.clone()], x, None, {"t": 0.7}), x.double())
    assert_matches(merge("slerp", [-x], x, None, {"t": 0.5}), torch.zeros(5, 3).double())


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp(with_base: bool, flatten: bool, row_wise: bool) -> None:
    # independent models (large deltas), so every vector pair is at a real angle
    base = _randn(*SHAPE, seed=7)
    xs = [_randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)]
    ws = [1.0, 3.0]
    got = merge(
        "nuslerp",
        xs,
        base if with_base else None,
        [{"weight": w} for w in ws],
        {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
    )
    a, b = (xs[0] - base, xs[1] - base) if with_base else (xs[0], xs[1])
    t = ws[1] / sum(ws)
    if flatten:
        want = ref_slerp(a, b, t)
    elif row_wise:  # vectors are columns x[:, j]
        want = torch.stack([ref_slerp(a[:, j], b[:, j], t) for j in range(SHAPE[1])], dim=1)
    else:  # vectors are rows x[i, :]
        want = torch.stack([ref_slerp(a[i], b[i], t) for i in range(SHAPE[0])])
    assert_matches(got, want + base.double() if with_base else want)


def test_nuslerp_slerps_near_parallel_vectors() -> None:
    # cos ~ 0.99995: nuslerp takes the spherical path (as mergekit's nuslerp does), where
    # `slerp` would fall back to lerp (|cos| > 0.9995)
    a = _randn(64, seed=80)
    b = a + _randn(64, seed=81, scale=0.01)
    got = merge("nuslerp", [a, b], None, [{"weight": 1.0}, {"weight": 1.0}])
    a64, b64 = a.double(), b.double()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    assert 0.9995 < cos < 1.0
    theta = math.acos(cos)
    want = (math.sin(0.5 * theta) * a64 + math.sin(0.5 * theta) * b64) / math.sin(theta)
    assert_matches(got, want)
    assert float((got.double() - (a64 + b64) / 2).abs().max()) > 1e-5 * float(want.abs().max())


# ---- task-vector family -------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_task_arithmetic(lam: float) -> None:
    xs, base = family(3)
    ws = [1.0, 0.5, -0.3]
    got = merge("task_arithmetic", xs, base, [{"weight": w} for w in ws], {"lambda": lam})
    assert_matches(got, ref_task_vectors(xs, base, ws, lam=lam))


@pytest.mark.parametrize("density", [1.0, 0.7, 0.3, 0.01])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties(density: float, rescale: bool) -> None:
    xs, base = family(3)
    ws = [1.0, 0.6, 0.8]
    mps = [{"weight": w, "density": density} for w in ws]
    got = merge("ties", xs, base, mps, {"rescale": rescale, "lambda": 0.9})
    keeps = [ref_top_k(x.double() - base.double(), density) for x in xs]
    want = ref_task_vectors(
        xs, base, ws, keeps, rescale="l1" if rescale else None, elect=True, normalize=True, lam=0.9
    )
    assert_matches(got, want)


def _ties_stepwise(
    xs: list[Tensor], base: Tensor, ws: list[float], density: float, lam: float, normalize: bool
) -> Tensor:
    """TIES as the separate float32 steps it was first written as (cut, weight, elect, mix,
    replace zero divisors by 1, divide, times lambda, add base): the fused paths must give
    these exact bits."""
    weighted = []
    for x, w in zip(xs, ws, strict=True):
        d = x - base
        cut = selection.magnitude_cut(d, d.numel(), int(density * d.numel()))
        weighted.append(selection.apply_cut_(d, cut) * w)
    total = weighted[0] * 1.0
    for d in weighted[1:]:
        total.add_(d)
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed, divisor = torch.zeros_like(sign), torch.zeros_like(sign)
    for d, w in zip(weighted, ws, strict=True):
        a = (d * sign).clamp_min(0.0)
        mixed.add_(a)
        divisor.add_(torch.sign(a), alpha=w)
    mixed.mul_(sign)
    if normalize:
        mixed /= divisor.masked_fill(divisor == 0, 1.0)
    return base + mixed * lam


@pytest.mark.parametrize("ws", [[1.0, 0.6, 0.8], [1.0, -0.5, 0.3], [0.5, 0.5, 0.5]])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_is_bitwise_the_stepwise_formula(ws: list[float], lam: float, normalize: bool) -> None:
    xs, base = family(3, shape=(64, 50))
    for x in xs:  # exact zeros of both signs in the deltas, and many disagreements
        x[::3] = base[::3]
        x[1::7] = -x[1::7]
    mps = [{"weight": w, "density": 0.6} for w in ws]
    got = merge("ties", xs, base, mps, {"lambda": lam, "normalize": normalize})
    want = _ties_stepwise(xs, base, ws, 0.6, lam, normalize)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_ties_exact_cancellation_elects_plus() -> None:
    # w = [1, -1] on identical models: the weighted deltas cancel exactly, the sum is 0 and the
    # elected sign is +, so every entry keeps the positive term: base + |delta|
    xs, base = family(1)
    x = xs[0]
    mps = [{"weight": 1.0}, {"weight": -1.0}]
    got = merge("ties", [x, x.clone()], base, mps, {"normalize": False})
    d = x.double() - base.double()
    assert_matches(got, base.double() + d.abs())
    assert_matches(got, ref_task_vectors([x, x], base, [1.0, -1.0], elect=True))


def test_ties_density_near_zero_keeps_one_entry_or_none() -> None:
    """66 entries: int(0.01 * 66) = 0. mergekit's rule (the default) keeps each task vector's
    largest entry; min_keep 0 (`topk_count: floor`) keeps none, so the merge is the base."""
    xs, base = family(2)
    mps = [{"density": 0.01}, {"density": 0.01}]
    got = merge("ties", xs, base, mps)
    keeps = [ref_top_k(x.double() - base.double(), 0.01) for x in xs]
    assert [int(k.sum()) for k in keeps] == [1, 1]
    assert_matches(got, ref_task_vectors(xs, base, [1.0, 1.0], keeps, elect=True, normalize=True))
    assert not torch.equal(got, base)
    floor = TensorContext("model.layers.0.mlp.up_proj.weight", ("m0", "m1"), 0, min_keep=0)
    assert torch.equal(get_method("ties").run(floor, xs, base, mps, {}), base)


def _dare_keeps(xs: list[Tensor], density: float, seed: int, name: str) -> list[Tensor]:
    if density >= 1.0:
        return [torch.ones(x.shape, dtype=torch.bool) for x in xs]
    return [ref_dare_keep(x.shape, density, seed, f"m{i}", name) for i, x in enumerate(xs)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.05])
@pytest.mark.parametrize("mode", ["l1", "inverse_density", None])
def test_dare(method: str, density: float, mode: str | None) -> None:
    xs, base = family(3, shape=(8, 16))
    ws = [1.0, 0.5, 0.7]
    name = "model.layers.1.self_attn.q_proj.weight"
    gp: dict[str, Any] = {"rescale": mode is not None, "rescale_mode": mode or "l1"}
    mps = [{"weight": w, "density": density} for w in ws]
    got = merge(method, xs, base, mps, gp, seed=42, tensor=name)
    keeps = _dare_keeps(xs, density, 42, name)
    elect = method == "dare_ties"
    probs = [density] * len(xs)
    want = ref_task_vectors(xs, base, ws, keeps, probs, rescale=mode, elect=elect)
    assert_matches(got, want)


def test_dare_default_rescale_is_l1_norm_matching() -> None:
    xs, base = family(1, shape=(8, 16))
    got = merge("dare_linear", xs, base, [{"density": 0.4}], seed=3, tensor="w")
    d = got.double() - base.double()
    assert float(d.abs().sum()) == pytest.approx(float((xs[0] - base).double().abs().sum()), 1e-6)
    assert_matches(
        got, ref_task_vectors(xs, base, [1.0], _dare_keeps(xs, 0.4, 3, "w"), rescale="l1")
    )


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (1.0, 0.01)])
def test_breadcrumbs(method: str, density: float, gamma: float) -> None:
    xs, base = family(3)
    ws = [1.0, 0.5, 0.7]
    mps = [{"weight": w, "density": density, "gamma": gamma} for w in ws]
    got = merge(method, xs, base, mps)
    keeps = [ref_breadcrumbs(x.double() - base.double(), density, gamma) for x in xs]
    assert_matches(got, ref_task_vectors(xs, base, ws, keeps, elect=method.endswith("ties")))


def test_breadcrumbs_gamma_zero_is_magnitude_pruning_not_zero() -> None:
    # the reference tool zeroes the whole tensor here (empty [n:-0] slice); we must not
    xs, base = family(1, shape=(50,))
    got = merge("breadcrumbs", xs, base, [{"density": 0.4, "gamma": 0.0}])
    d = xs[0].double() - base.double()
    assert int((got != base).sum()) == 20
    assert_matches(got, base.double() + d * ref_top_k(d, 0.4))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.3), (0.7, 0.0), (1.0, 0.15)])
@pytest.mark.parametrize("mode", [None, "inverse_density"])  # None: the default, l1
def test_della(method: str, density: float, epsilon: float, mode: str | None) -> None:
    xs, base = family(3, shape=(8, 16))
    ws = [1.0, 0.5, 0.7]
    name = "model.layers.0.mlp.down_proj.weight"
    mps = [{"weight": w, "density": density, "epsilon": epsilon} for w in ws]
    gp: dict[str, Any] = {"lambda": 1.1, **({"rescale_mode": mode} if mode else {})}
    got = merge(method, xs, base, mps, gp, seed=5, tensor=name)
    deltas = [x.double() - base.double() for x in xs]
    if density >= 1.0:
        probs: list[Tensor | float] = [1.0] * 3
        keeps = [torch.ones(d.shape, dtype=torch.bool) for d in deltas]
    else:
        probs = [ref_della_probs(d, density, epsilon) for d in deltas]
        keeps = [
            ref_uniform(d.shape, 5, f"m{i}", name) < p
            for i, (d, p) in enumerate(zip(deltas, probs, strict=True))
        ]
    elect = method == "della"
    want = ref_task_vectors(
        xs, base, ws, keeps, probs, rescale=mode or "l1", elect=elect, normalize=elect, lam=1.1
    )
    assert_matches(got, want)


def test_della_keep_probabilities_span_density_plus_minus_epsilon() -> None:
    # statistical sanity of the documented probabilities: the largest entries survive more often
    delta = torch.arange(1, 101, dtype=torch.float32).repeat(400, 1)  # [400, 100]
    base = torch.zeros_like(delta)
    got = merge("della_linear", [delta], base, [{"density": 0.5, "epsilon": 0.4}], seed=1)
    kept = (got != 0).double().mean(0)  # keep rate per rank
    assert float(kept[:10].mean()) == pytest.approx(0.1 + 0.8 * 4.5 / 99, abs=0.03)
    assert float(kept[-10:].mean()) == pytest.approx(0.9 - 0.8 * 4.5 / 99, abs=0.03)


# ---- model stock, karcher, passthrough ----------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(n: int, filter_wise: bool) -> None:
    # task vectors sharing a common direction, so cos (and t) is well inside (0, 1)
    base = _randn(*SHAPE, seed=11)
    common = _randn(*SHAPE, seed=12, scale=0.1)
    xs = [base + common + _randn(*SHAPE, seed=13 + i, scale=0.1) for i in range(n)]
    got = merge("model_stock", xs, base, None, {"filter_wise": filter_wise})
    assert_matches(got, ref_model_stock(xs, base, filter_wise))


def test_model_stock_identical_inputs() -> None:
    xs, base = family(1)
    # identical task vectors: cos = 1, t = 1 -> the (common) fine-tuned model
    assert_matches(merge("model_stock", [xs[0], xs[0].clone()], base, None), xs[0].double())
    # zero task vectors: t = 0 -> the base, no NaN
    assert_matches(merge("model_stock", [base.clone(), base.clone()], base, None), base.double())


def test_karcher_of_two_is_the_geodesic_midpoint_times_mean_norm() -> None:
    a, b = _randn(30, seed=21), _randn(30, seed=22, scale=2.0)
    got = merge("karcher", [a, b], None, None, {"max_iter": 100, "tol": 1e-12})
    au, bu = a.double() / a.double().norm(), b.double() / b.double().norm()
    direction = ref_slerp(au, bu, 0.5)
    mean_norm = (a.double().norm() + b.double().norm()) / 2
    assert_matches(got, direction / direction.norm() * mean_norm)


def test_karcher_of_several_is_the_spherical_mean() -> None:
    xs = [_randn(4, 5, seed=30 + i, scale=1.0 + i) for i in range(4)]
    got = merge("karcher", xs, None, None, {"max_iter": 200, "tol": 1e-12})
    units = [x.double().flatten() / x.double().norm() for x in xs]
    mean_norm = sum(x.double().norm() for x in xs) / len(xs)
    want = (ref_karcher_direction(units) * mean_norm).reshape(4, 5)
    assert_matches(got, want)


def test_karcher_identical_inputs_and_one_model() -> None:
    x = _randn(3, 4, seed=40)
    assert_matches(merge("karcher", [x, x.clone(), x.clone()], None), x.double())
    assert_matches(merge("karcher", [x], None), x.double())


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_passthrough(scale: float) -> None:
    x = _randn(3, 4, seed=50)
    got = merge("passthrough", [x], None, [{"scale": scale}])
    assert_matches(got, x.double() * scale)
    assert got.data_ptr() != x.data_ptr()


# ---- edge cases across every method -------------------------------------------------------------

# parameters that make each method do real work; the 1-model / 2-model limits come from the table
EDGE_PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "slerp": ({}, {"t": 0.4}),
    "ties": ({"density": 0.5}, {}),
    "dare_linear": ({"density": 0.5}, {}),
    "dare_ties": ({"density": 0.5}, {}),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.1}, {}),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.1}, {}),
    "della": ({"density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"density": 0.5, "epsilon": 0.1}, {}),
}


def _edge_inputs(name: str, shape: tuple[int, ...]) -> tuple[list[Tensor], Tensor | None, list]:
    method = get_method(name)
    n = max(method.min_models, 2) if method.max_models != 1 else 1
    xs, base = family(n, shape=shape, seed=60)
    mp, _ = EDGE_PARAMS.get(name, ({}, {}))
    return xs, base if method.needs_base else None, [dict(mp) for _ in xs]


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
@pytest.mark.parametrize("shape", [(1,), (3,), ()])
def test_tiny_tensors_give_finite_results_of_the_right_shape(
    name: str, shape: tuple[int, ...]
) -> None:
    xs, base, mps = _edge_inputs(name, shape)
    got = merge(name, xs, base, mps, EDGE_PARAMS.get(name, ({}, {}))[1])
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_inputs_are_not_modified(name: str) -> None:
    xs, base, mps = _edge_inputs(name, SHAPE)
    copies = [x.clone() for x in xs] + ([base.clone()] if base is not None else [])
    merge(name, xs, base, mps, EDGE_PARAMS.get(name, ({}, {}))[1])
    for before, after in zip(copies, xs + ([base] if base is not None else []), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs", "della"])
def test_one_model_task_vector_methods(name: str) -> None:
    # one model at density 1: every method reduces to base + lambda * delta
    xs, base = family(1)
    mp = {"density": 1.0} if name != "task_arithmetic" else {}
    got = merge(name, xs, base, [mp], {"lambda": 0.5})
    assert_matches(got, base.double() + 0.5 * (xs[0].double() - base.double()))


def test_identical_inputs_merge_to_themselves() -> None:
    xs, base = family(1)
    x = xs[0]
    same = [x, x.clone(), x.clone()]
    for name, mp, gp in [
        ("linear", {}, {}),
        ("ties", {"density": 0.5}, {}),
        ("karcher", {}, {}),
        ("model_stock", {}, {}),
        ("della", {"density": 1.0}, {}),
    ]:
        got = merge(name, same, base, [dict(mp) for _ in same], gp)
        if name == "ties":  # normalized TIES of identical deltas: the pruned delta
            d = x.double() - base.double()
            assert_matches(got, base.double() + d * ref_top_k(d, 0.5))
        else:
            assert_matches(got, x.double())


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "slerp", "model_stock"])
def test_bf16_inputs(name: str) -> None:
    # bf16 checkpoints are upcast to float32 by the engine: exact on bf16 values
    method = get_method(name)
    n = 1 if method.max_models == 1 else 2
    xs, base = family(n, seed=70)
    xs = [x.bfloat16().float() for x in xs]
    base = base.bfloat16().float()
    mp, gp = EDGE_PARAMS.get(name, ({}, {}))
    got = merge(name, xs, base, [dict(mp) for _ in xs], gp)
    if name == "linear":
        want = sum(x.double() for x in xs) / n
    elif name == "task_arithmetic":
        want = ref_task_vectors(xs, base, [1.0] * n)
    elif name == "ties":
        keeps = [ref_top_k(x.double() - base.double(), 0.5) for x in xs]
        want = ref_task_vectors(xs, base, [1.0] * n, keeps, elect=True, normalize=True)
    elif name == "slerp":
        want = ref_slerp(base, xs[0], 0.4)
    else:
        want = ref_model_stock(xs, base)
    assert_matches(got, want)
    # called on bf16 tensors directly, the methods keep the dtype and stay at bf16 precision
    raw = merge(name, [x.bfloat16() for x in xs], base.bfloat16(), [dict(mp) for _ in xs], gp)
    assert raw.dtype == torch.bfloat16
    torch.testing.assert_close(raw.double(), want, rtol=0.02, atol=0.02 * float(want.abs().max()))


# ---- random methods: reproducibility ------------------------------------------------------------

RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_are_deterministic_and_keyed_by_seed_model_and_tensor(name: str) -> None:
    xs, base = family(2, shape=(16, 16))
    mps = [{"density": 0.5, **({"epsilon": 0.1} if "della" in name else {})} for _ in xs]
    first = merge(name, xs, base, mps, seed=9, tensor="a")
    assert torch.equal(first, merge(name, xs, base, mps, seed=9, tensor="a"))
    assert not torch.equal(first, merge(name, xs, base, mps, seed=10, tensor="a"))
    assert not torch.equal(first, merge(name, xs, base, mps, seed=9, tensor="b"))
    # the order in which other tensors were merged (global RNG state) does not matter
    torch.manual_seed(123)
    torch.rand(1000)
    assert torch.equal(first, merge(name, xs, base, mps, seed=9, tensor="a"))
    # each model's mask is keyed by its own id: swapping the models' ids changes the result
    ctx = TensorContext("a", ("m1", "m0"), 9)
    swapped = get_method(name).run(ctx, xs, base, mps, {})
    assert not torch.equal(first, swapped)


# ---- every method on the tiny model family -------------------------------------------------------

# name -> (per-model parameters, global parameters); the models are sft1, sft2, rlhf over base
ON_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"weight": 0.4}, {}),
    "slerp": ({}, {"t": 0.3}),
    "nuslerp": ({"weight": 0.5}, {"nuslerp_flatten": False}),
    "task_arithmetic": ({"weight": 0.5}, {"lambda": 0.8}),
    "ties": ({"density": 0.4}, {}),
    "dare_linear": ({"density": 0.6}, {}),
    "dare_ties": ({"density": 0.6}, {"rescale_mode": "inverse_density"}),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.05}, {}),
    "della": ({"density": 0.6, "epsilon": 0.2}, {}),
    "della_linear": ({"density": 0.6, "epsilon": 0.2}, {}),
    "model_stock": ({}, {"filter_wise": True}),
    "karcher": ({}, {"max_iter": 100, "tol": 1e-12}),
    "passthrough": ({"scale": 0.5}, {}),
}


def _reference_on_models(name: str, xs: list[Tensor], b: Tensor, tensor: str) -> Tensor:
    mp, gp = ON_MODELS[name]
    ws = [mp.get("weight", 1.0)] * len(xs)
    density = mp.get("density", 1.0)
    deltas = [x.double() - b.double() for x in xs]
    if name == "linear":
        return sum(x.double() for x in xs) / len(xs)
    if name == "slerp":
        return ref_slerp(b, xs[0], 0.3)
    if name == "nuslerp":  # with the base: its task vectors, row by row (last dim), t = 1/2
        a, c = deltas
        if a.dim() == 1:
            return b.double() + ref_slerp(a, c, 0.5)
        rows = [ref_slerp(r, s, 0.5) for r, s in zip(a, c, strict=True)]
        return b.double() + torch.stack(rows)
    if name == "task_arithmetic":
        return ref_task_vectors(xs, b, ws, lam=0.8)
    if name == "ties":
        keeps = [ref_top_k(d, density) for d in deltas]
        return ref_task_vectors(xs, b, ws, keeps, elect=True, normalize=True)
    if name.startswith("dare"):
        keeps = [ref_dare_keep(x.shape, density, 0, f"m{i}", tensor) for i, x in enumerate(xs)]
        mode = gp.get("rescale_mode", "l1")
        elect = name == "dare_ties"
        return ref_task_vectors(xs, b, ws, keeps, [density] * 3, rescale=mode, elect=elect)
    if name.startswith("breadcrumbs"):
        keeps = [ref_breadcrumbs(d, density, mp["gamma"]) for d in deltas]
        return ref_task_vectors(xs, b, ws, keeps, elect=name.endswith("ties"))
    if name.startswith("della"):
        probs = [ref_della_probs(d, density, mp["epsilon"]) for d in deltas]
        keeps = [
            ref_uniform(d.shape, 0, f"m{i}", tensor) < p
            for i, (d, p) in enumerate(zip(deltas, probs, strict=True))
        ]
        elect = name == "della"
        return ref_task_vectors(xs, b, ws, keeps, probs, rescale="l1", elect=elect, normalize=elect)
    if name == "model_stock":
        return ref_model_stock(xs, b, filter_wise=True)
    if name == "karcher":
        units = [x.double().flatten() / x.double().norm() for x in xs]
        mean_norm = sum(x.double().norm() for x in xs) / len(xs)
        return (ref_karcher_direction(units) * mean_norm).reshape(b.shape)
    assert name == "passthrough"
    return xs[0].double() * 0.5


@pytest.mark.parametrize("name", sorted(ON_MODELS))
def test_every_method_on_the_tiny_models(name: str, family: dict[str, Any]) -> None:
    from tests.conftest import load_state

    states = {k: load_state(p) for k, p in family.items()}
    method = get_method(name)
    n = method.max_models or 3
    models = ["sft1", "sft2", "rlhf"][:n]
    mp, gp = ON_MODELS[name]
    for tensor, b in states["base"].items():
        if name == "slerp":  # from sft1 (the base of the interpolation) to rlhf
            xs, b = [states["rlhf"][tensor]], states["sft1"][tensor]
        else:
            xs = [states[m][tensor] for m in models]
        got = merge(name, xs, b, [dict(mp) for _ in xs], gp, tensor=tensor)
        want = _reference_on_models(name, xs, b, tensor)
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * scale, msg=tensor)
