"""The built-in merge methods that are not task-vector pipelines, and the `BUILTINS` table.

Every method here is a pure function of one output tensor:
fn(ctx, tensors, base, model_params, global_params) -> Tensor, float32, shape of the inputs.
Formulas: design notes section 1 and docs/methods.md. Inputs are never modified.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from ..errors import UsageError
from . import blend
from .registry import MergeMethod, MethodParams, NoParams, TensorContext, set_builtins
from .task_vectors import TASK_VECTOR_METHODS, WeightParams

# ---- linear ------------------------------------------------------------------------------------


class LinearGlobals(MethodParams):
    normalize: bool = True


def _weight_sum(ctx: TensorContext, weights: list[float], method: str) -> float:
    total = sum(weights)
    if abs(total) < 1e-8:
        raise UsageError(
            f"{method}, tensor '{ctx.name}': the model weights {weights} sum to {total:g}, so "
            "normalizing would divide by zero; change the weights (or set normalize: false)."
        )
    return total


def linear(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[WeightParams],
    global_params: LinearGlobals,
) -> Tensor:
    """sum_i w_i x_i, divided by sum_i w_i if normalize. A base tensor is ignored: the recipe
    layer passes a `models:` recipe's base_model as one more model, listed or not (mergekit
    does the same), with the global weight when it has none of its own."""
    weights = [p.weight for p in model_params]
    divisor = _weight_sum(ctx, weights, "linear") if global_params.normalize else None
    return blend.linear_sum(tensors, weights, divisor)


# ---- slerp / nuslerp ---------------------------------------------------------------------------


class SlerpGlobals(MethodParams):
    t: float  # required: 0 gives the base, 1 the other model


def slerp(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[NoParams],
    global_params: SlerpGlobals,
) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    assert base is not None
    return blend.slerp(base, tensors[0], global_params.t, weights=ctx.slerp)


# nuslerp lerps only (anti)parallel pairs, as mergekit's nuslerp does (|sin theta| <= 1e-8; in
# float32 that is cos^2 rounding to 1): near-parallel rows, such as the norm weights of two
# fine-tunes, still take the spherical path. Coefficients are computed in float64, so small
# angles are accurate.
NUSLERP_PARALLEL_COS = 1.0 - 1e-12


class NuslerpGlobals(MethodParams):
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False


def _vectors(x: Tensor, row_wise: bool) -> Tensor:
    """[R, D] view of x whose rows are the vectors nuslerp interpolates: slices along the last
    dimension (x[i, :] of a matrix), or along the first one if row_wise (x[:, j])."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if row_wise:
        x = x.movedim(0, -1)
    return x.reshape(-1, x.shape[-1])


def _unvectors(rows: Tensor, like: Tensor, row_wise: bool) -> Tensor:
    if like.dim() == 0 or not row_wise:
        return rows.reshape(like.shape)
    moved = like.movedim(0, -1).shape
    return rows.reshape(moved).movedim(-1, 0)


def nuslerp_t(ctx: TensorContext, model_params: list[WeightParams]) -> float:
    """nuslerp's t = w_2 / (w_1 + w_2)."""
    weights = [p.weight for p in model_params]
    return weights[1] / _weight_sum(ctx, weights, "nuslerp")


def nuslerp_pair(tensors: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
    """The two tensors nuslerp interpolates: the models, or their task vectors with a base."""
    if base is None:
        return tensors[0], tensors[1]
    return tensors[0] - base, tensors[1] - base


def nuslerp(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[WeightParams],
    global_params: NuslerpGlobals,
) -> Tensor:
    """Slerp between two models with t = w_2 / (w_1 + w_2); with a base, slerp their task
    vectors and add the base. Whole tensor (flatten) or one vector at a time."""
    t = nuslerp_t(ctx, model_params)
    a, b = nuslerp_pair(tensors, base)
    if global_params.nuslerp_flatten:  # ctx.slerp: the whole tensor's angle, for a row block
        out = blend.slerp(a, b, t, parallel_cos=NUSLERP_PARALLEL_COS, weights=ctx.slerp)
    else:
        row_wise = global_params.nuslerp_row_wise
        va, vb = _vectors(a, row_wise), _vectors(b, row_wise)
        rows = blend.slerp_rows(va, vb, t, parallel_cos=NUSLERP_PARALLEL_COS)
        out = _unvectors(rows, a, row_wise)
    return out if base is None else base + out


# ---- karcher -----------------------------------------------------------------------------------


class KarcherGlobals(MethodParams):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, gt=0.0)


def karcher(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[NoParams],
    global_params: KarcherGlobals,
) -> Tensor:
    """Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by the
    mean of their norms. Uniform weights; a base tensor is ignored, as for linear (a `models:`
    recipe's base_model is one more model).

    The mean direction is always a combination of the inputs, so it is iterated as
    coefficients against their float64 Gram matrix (`karcher_coefficients`), and the result is
    one float64 weighted sum of the inputs: `ctx.gram` carries the whole tensor's matrix when
    the tensors are one row block of it (a first pass over the blocks).
    """
    gram = ctx.gram if ctx.gram is not None else blend.gram_sums([tensors])
    coefficients = karcher_coefficients(gram, global_params.max_iter, global_params.tol)
    if not any(coefficients):
        return torch.zeros_like(tensors[0])  # every input is (near) zero: +0.0, whatever x is
    return blend.weighted_sum_f64(tensors, coefficients)


def karcher_coefficients(gram: Tensor, max_iter: int, tol: float) -> list[float]:
    """c such that sum_i c_i x_i is the Karcher mean of inputs with Gram matrix `gram` [n, n].

    Directions u_i = x_i / |x_i| (inputs with |x_i| <= tol drop out of the direction but count
    in the norm mean). Start from the normalised Euclidean mean, then repeat: step along the
    mean of the log maps, g = mean_i theta_i / sin(theta_i) * (u_i - cos(theta_i) m), with the
    exponential map m <- cos|g| m + sin|g| g/|g|, until |g| < tol or max_iter steps. m and g
    are coefficient vectors over the u_i ([k], float64): m.u_j = (U m)_j and |m|^2 = m.U m
    with U the Gram matrix of the directions.
    """
    norms = gram.diagonal().sqrt()  # [n]
    live = [i for i in range(len(norms)) if float(norms[i]) > tol]
    if not live:
        return [0.0] * len(norms)  # every input is (near) zero: so is the mean
    r = norms[live]
    units = gram[live][:, live] / (r[:, None] * r[None, :])  # [k, k]

    def norm(v: Tensor) -> float:
        return math.sqrt(max(float(v @ units @ v), 0.0))

    k = len(live)
    alpha = 1.0 / k
    m = torch.full((k,), alpha, dtype=torch.float64)
    m_norm = norm(m)
    m = torch.eye(k, dtype=torch.float64)[0] if m_norm < tol else m / m_norm
    for _ in range(max_iter):
        g = torch.zeros(k, dtype=torch.float64)
        cosines = units @ m  # [k]: m . u_j
        for j in range(k):
            cos = min(max(float(cosines[j]), -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol or math.sin(theta) < tol:  # same point, or antipodal (no log map)
                continue
            g -= (alpha * theta / math.sin(theta) * cos) * m
            g[j] += alpha * theta / math.sin(theta)
        g_norm = norm(g)
        if g_norm < tol:
            break
        m = math.cos(g_norm) * m + math.sin(g_norm) * (g / g_norm)
        m = m / norm(m)
    scale = float(norms.mean())
    coefficients = [0.0] * len(norms)
    for j, i in enumerate(live):
        coefficients[i] = scale * float(m[j]) / float(norms[i])  # u_i = x_i / |x_i|
    return coefficients


# ---- model stock -------------------------------------------------------------------------------


class ModelStockGlobals(MethodParams):
    filter_wise: bool = False


def model_stock(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[NoParams],
    global_params: ModelStockGlobals,
) -> Tensor:
    """Model Stock: cos = mean pairwise cosine of the task vectors (per tensor, or per row of
    the last dimension if filter_wise); t = N cos / (1 + (N - 1) cos);
    result t * mean(x_i) + (1 - t) * base."""
    assert base is not None
    n = len(tensors)

    def rows(x: Tensor) -> Tensor:  # [R, D]: one row, or the last-dimension slices
        if not global_params.filter_wise or x.dim() == 0:
            return x.reshape(1, -1)
        return x.reshape(-1, x.shape[-1])

    if global_params.filter_wise:
        deltas = [rows(x - base).double() for x in tensors]
        norms = [d.norm(dim=-1) for d in deltas]  # each [R]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        dots = {(i, j): (deltas[i] * deltas[j]).sum(-1) for i, j in pairs}
    else:  # one cosine over the whole tensor: from the Gram matrix (ctx.gram: a row block's)
        gram = ctx.gram
        if gram is None:
            gram = blend.gram_sums([model_stock_vectors(tensors, base)])
        norms = [gram[i, i].sqrt().reshape(1) for i in range(n)]  # each [1]
        dots = {(i, j): gram[i, j].reshape(1) for i in range(n) for j in range(i + 1, n)}
    cos_pairs = [
        (dots[i, j] / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1, 1)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = torch.stack(cos_pairs).mean(0)  # [R]
    denom = 1.0 + (n - 1) * cos  # >= 0 by construction; 0 only if the task vectors cancel out
    t = torch.where(denom > 1e-12, n * cos / denom.clamp_min(1e-12), 0.0)  # [R]

    mean = blend.weighted_sum(tensors, [1.0 / n] * n)
    t_b = t.to(base.dtype).reshape(-1, 1)  # [R, 1], broadcast over each row
    out = blend.lerp(rows(base), rows(mean), t_b)
    return out.reshape(base.shape)


def model_stock_vectors(tensors: list[Tensor], base: Tensor) -> list[Tensor]:
    """The task vectors whose whole-tensor angles set model_stock's ratio."""
    return [x - base for x in tensors]


# ---- passthrough -------------------------------------------------------------------------------


class PassthroughParams(MethodParams):
    scale: float = 1.0


def passthrough(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[PassthroughParams],
    global_params: NoParams,
) -> Tensor:
    """The one input tensor, times scale (a new tensor)."""
    return tensors[0] * model_params[0].scale


# ---- the table ---------------------------------------------------------------------------------

BUILTINS: tuple[MergeMethod, ...] = (
    MergeMethod(
        name="linear",
        fn=linear,
        global_params=LinearGlobals,
        model_params=WeightParams,
        needs_base=False,
        min_models=1,
        max_models=None,
        paper="https://arxiv.org/abs/2203.05482",
        description="weighted average of the models (model soup)",
    ),
    MergeMethod(
        name="slerp",
        fn=slerp,
        global_params=SlerpGlobals,
        model_params=NoParams,
        needs_base=True,
        min_models=1,
        max_models=1,
        paper="https://en.wikipedia.org/wiki/Slerp",
        description="spherical interpolation from the base model (t=0) to one other model (t=1)",
    ),
    MergeMethod(
        name="nuslerp",
        fn=nuslerp,
        global_params=NuslerpGlobals,
        model_params=WeightParams,
        needs_base=False,
        min_models=2,
        max_models=2,
        paper=None,
        description="slerp of two models (or of their task vectors), weighted, per tensor or row",
    ),
    *TASK_VECTOR_METHODS,
    MergeMethod(
        name="model_stock",
        fn=model_stock,
        global_params=ModelStockGlobals,
        model_params=NoParams,
        needs_base=True,
        min_models=2,
        max_models=None,
        paper="https://arxiv.org/abs/2403.19522",
        description="interpolate base and model average with a ratio from task-vector angles",
    ),
    MergeMethod(
        name="karcher",
        fn=karcher,
        global_params=KarcherGlobals,
        model_params=NoParams,
        needs_base=False,
        min_models=1,
        max_models=None,
        paper="https://en.wikipedia.org/wiki/Karcher_mean",
        description="Riemannian (Karcher) mean of the models on the sphere, mean norm",
    ),
    MergeMethod(
        name="passthrough",
        fn=passthrough,
        global_params=NoParams,
        model_params=PassthroughParams,
        needs_base=False,
        min_models=1,
        max_models=1,
        paper=None,
        description="copy one model's tensor, optionally scaled (layer stacking)",
    ),
)
set_builtins(BUILTINS)
