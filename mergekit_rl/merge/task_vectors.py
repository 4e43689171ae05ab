"""Task-vector methods: task_arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

All eight are configurations of one engine, `task_vector_merge`: a sparsifier (none, magnitude,
random, breadcrumbs, della) and sign election on or off. Per output tensor, in this order:

1. delta_i = x_i - base
2. sparsify each delta_i on its own, with that model's density
3. rescale the kept entries if `rescale` (L1-norm matching, or 1 / keep probability)
4. weight: w_i * delta_i
5. sign election (TIES family): majority sign = sign(sum_i w_i delta_i), 0 counts as +;
   keep the entries of each weighted delta that carry it
6. mix: sum of the kept weighted deltas; divide by the matching sum of weights if `normalize`;
   multiply by `lambda`; add base
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from ..errors import UsageError
from . import blend, sparsify
from .registry import MergeMethod, MethodParams, TensorContext

# ---- parameters --------------------------------------------------------------------------------


class WeightParams(MethodParams):
    weight: float = 1.0


class DensityParams(WeightParams):
    density: float = Field(1.0, ge=0.0, le=1.0)


class BreadcrumbsParams(DensityParams):
    gamma: float = Field(0.01, ge=0.0, le=1.0)


class DellaParams(DensityParams):
    epsilon: float = Field(0.15, ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        lo, hi = self.density - self.epsilon, self.density + self.epsilon
        if self.density < 1.0 and (lo < 0.0 or hi > 1.0):
            raise ValueError(
                f"epsilon={self.epsilon} with density={self.density} gives keep probabilities "
                f"[{lo:g}, {hi:g}] outside [0, 1]; lower epsilon to at most "
                f"{min(self.density, 1.0 - self.density):g}"
            )
        return self


class TaskArithmeticGlobals(MethodParams):
    normalize: bool = False
    lambda_: float = Field(1.0, alias="lambda")
    int8_mask: bool = False  # mergekit memory option, accepted and ignored (masks are bool here)


class SparseGlobals(TaskArithmeticGlobals):
    rescale: bool = True
    rescale_mode: Literal["l1", "inverse_density"] = "l1"


class TiesGlobals(SparseGlobals):
    normalize: bool = True
    rescale: bool = False


class BreadcrumbsGlobals(SparseGlobals):
    rescale: bool = False


class DellaGlobals(SparseGlobals):
    # rescale_mode stays "l1" (mergekit's DELLA); the paper's 1/p_i is rescale_mode: inverse_density
    normalize: bool = True


# ---- the engine --------------------------------------------------------------------------------

# sparsifier(delta, params of that model, ctx, model index) -> kept entries
Sparsifier = Callable[[Tensor, MethodParams, TensorContext, int], sparsify.Kept]


def _model_id(ctx: TensorContext, i: int) -> str:
    if len(ctx.model_ids) <= i:
        raise UsageError(
            f"tensor '{ctx.name}': random masks need one model id per input model "
            f"(TensorContext.model_ids has {len(ctx.model_ids)})."
        )
    return ctx.model_ids[i]


def _magnitude(delta: Tensor, p: DensityParams, ctx: TensorContext, i: int) -> sparsify.Kept:
    cut = None if ctx.cuts is None else ctx.cuts[i]
    return sparsify.magnitude(delta, p.density, cut, ctx.min_keep)


def _random(delta: Tensor, p: DensityParams, ctx: TensorContext, i: int) -> sparsify.Kept:
    mid = _model_id(ctx, i)
    return sparsify.bernoulli(delta, p.density, ctx.seed, mid, ctx.name, ctx.offset)


def _breadcrumbs(delta: Tensor, p: BreadcrumbsParams, ctx: TensorContext, i: int) -> sparsify.Kept:
    cuts = None if ctx.cuts is None else ctx.cuts[i]  # (top n_top + n_keep, top n_top)
    return sparsify.breadcrumbs(delta, p.density, p.gamma, cuts)


def _della(delta: Tensor, p: DellaParams, ctx: TensorContext, i: int) -> sparsify.Kept:
    mid = _model_id(ctx, i)
    return sparsify.della(delta, p.density, p.epsilon, ctx.seed, mid, ctx.name, ctx.offset)


def task_vector_merge(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor | None,
    model_params: list[WeightParams],
    global_params: TaskArithmeticGlobals,
    *,
    sparsifier: Sparsifier | None,
    elect: bool,
) -> Tensor:
    assert base is not None  # needs_base=True: checked by MergeMethod.run
    weights = [p.weight for p in model_params]
    rescale = getattr(global_params, "rescale", False)
    mode = getattr(global_params, "rescale_mode", "l1")
    if sparsifier is _magnitude and elect and not rescale and blend.ties_native(base, *tensors):
        return _ties(ctx, tensors, base, model_params, global_params)  # type: ignore[arg-type]

    # the L1 norms of each whole delta and its kept entries are made here (not given by a
    # first pass over row blocks): a fused sparsifier sums them as it goes
    l1 = rescale and mode == "l1" and ctx.l1_factors is None
    weighted = []  # w_i * (sparsified, rescaled) delta_i: new tensors, ours to modify in place
    for i, (x, p) in enumerate(zip(tensors, model_params, strict=True)):
        delta, kept = _sparsified(ctx, x, base, p, i, sparsifier, l1)  # 1-2
        if kept is not None:
            delta = _rescaled(ctx, delta, kept, mode, i) if rescale else kept.values  # 3
        assert delta is not None  # only a sparsifier's fused path leaves no delta tensor
        weighted.append(delta.mul_(p.weight))  # 4

    normalize, lam = global_params.normalize, global_params.lambda_
    if elect:
        # 5-6: sum of the entries agreeing with the elected sign; per-entry divisor is the sum
        # of the weights of the models that contributed there (0 -> 1), needed to normalize
        return blend.ties_consensus_(weighted, weights, base, normalize=normalize, lam=lam)
    divisor = sum(weights)
    if normalize and abs(divisor) < 1e-8:
        raise UsageError(
            f"tensor '{ctx.name}': the model weights sum to {divisor:g}, so `normalize: "
            "true` would divide by zero; set normalize: false or change the weights."
        )
    return blend.mix_weighted(base, weighted, divisor if normalize else None, lam)  # 6


def _ties(
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor,
    model_params: list[DensityParams],
    global_params: TiesGlobals,
) -> Tensor:
    """Steps 1-6 of TIES (magnitude cuts, no rescale) in one fused pass on the host
    (`blend.ties_merge`), with each task vector's cut of the whole tensor: the context's (a row
    block) or found here, without delta tensors for a large one."""
    cuts = ctx.cuts
    if cuts is None:
        densities = [p.density for p in model_params]
        cuts = tuple(sparsify.magnitude_cuts(tensors, base, densities, ctx.min_keep))
    weights = [p.weight for p in model_params]
    normalize, lam = global_params.normalize, global_params.lambda_
    return blend.ties_merge(base, tensors, cuts, weights, normalize=normalize, lam=lam)


def _sparsified(
    ctx: TensorContext,
    x: Tensor,
    base: Tensor,
    p: WeightParams,
    i: int,
    sparsifier: Sparsifier | None,
    l1: bool = False,
) -> tuple[Tensor | None, sparsify.Kept | None]:
    """Steps 1-2 for model i: (delta_i, its kept entries, or None without a sparsifier). A
    keep mask in the context (recorded by the L1 pass over row blocks) replaces the drawing:
    delta * mask are the products the random sparsifiers make (their keep is 1.0 / 0.0).
    DARE on the host makes and drops the delta chunk by chunk (`sparsify.bernoulli_delta`):
    then delta is None, and with `l1` the kept entries carry the L1 norms."""
    if _fused_dare(sparsifier, ctx, x):
        assert isinstance(p, DensityParams)
        mid = _model_id(ctx, i)
        kept = sparsify.bernoulli_delta(x, base, p.density, ctx.seed, mid, ctx.name, ctx.offset, l1)
        return None, kept
    delta = x - base
    if sparsifier is None:
        return delta, None
    if ctx.keep_masks is not None:
        return delta, sparsify.Kept(delta * ctx.keep_masks[i].view(delta.shape), p.density)
    return delta, sparsifier(delta, p, ctx, i)


def _fused_dare(sparsifier: Sparsifier | None, ctx: TensorContext, x: Tensor) -> bool:
    """DARE's drop fused with the delta: on the host (on an accelerator, chunks would be
    many small kernels), when no recorded mask replaces the drawing."""
    return sparsifier is _random and ctx.keep_masks is None and x.device.type == "cpu"


def add_l1_sums(
    method: MergeMethod,
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor,
    model_params: list[dict[str, Any]],
    sums: list[tuple[blend.StableSum, blend.StableSum]],
) -> bool:
    """Add each model's |delta| and |kept| to its pair of sums without holding either (DARE
    on the host: the L1 pass over row blocks needs only the norms); False, adding nothing,
    for the other sparsifiers (`l1_terms` makes their tensors)."""
    sparsifier = _SPARSIFIERS[method.name]
    if not tensors or not _fused_dare(sparsifier, ctx, tensors[0]):
        return False
    for i, (x, raw) in enumerate(zip(tensors, model_params, strict=True)):
        p = method.model_params.model_validate(raw)
        mid = _model_id(ctx, i)
        sparsify.bernoulli_abs_sums(
            x, base, p.density, ctx.seed, mid, ctx.name, ctx.offset, sums[i]
        )
    return True


def _rescaled(
    ctx: TensorContext, delta: Tensor | None, kept: sparsify.Kept, mode: str, i: int
) -> Tensor:
    """Step 3; a row block uses the whole tensor's L1 factor when the context carries it."""
    if ctx.l1_factors is None:
        return sparsify.rescale(delta, kept, mode)
    return sparsify.rescale(delta, kept, mode, ctx.l1_factors[i])


def l1_terms(
    method: MergeMethod,
    ctx: TensorContext,
    tensors: list[Tensor],
    base: Tensor,
    model_params: list[dict[str, Any]],
) -> list[tuple[Tensor, Tensor]]:
    """(delta_i, kept_i) for each model of a task-vector method, made as its merge makes them
    (steps 1-2): the L1 rescale sums their magnitudes over the whole tensor. A first pass over
    the row blocks of a large tensor feeds them to `blend.StableSum.add_abs` (`merge.blocks`)."""
    sparsifier = _SPARSIFIERS[method.name]
    out = []
    for i, (x, raw) in enumerate(zip(tensors, model_params, strict=True)):
        p = method.model_params.model_validate(raw)
        delta, kept = _sparsified(ctx, x, base, p, i, sparsifier)
        assert kept is not None  # an L1 rescale implies a sparsifier
        out.append((x - base if delta is None else delta, kept.values))
    return out


_SPARSIFIERS: dict[str, Sparsifier | None] = {}  # method name -> its sparsifier


def _method(
    name: str,
    *,
    sparsifier: Sparsifier | None,
    elect: bool,
    model_params: type[MethodParams],
    global_params: type[MethodParams],
    paper: str,
    description: str,
) -> MergeMethod:
    _SPARSIFIERS[name] = sparsifier
    return MergeMethod(
        name=name,
        fn=partial(task_vector_merge, sparsifier=sparsifier, elect=elect),
        global_params=global_params,
        model_params=model_params,
        needs_base=True,
        min_models=1,
        max_models=None,
        paper=paper,
        description=description,
    )


TASK_ARITHMETIC_PAPER = "https://arxiv.org/abs/2212.04089"
TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

TASK_VECTOR_METHODS: tuple[MergeMethod, ...] = (
    _method(
        "task_arithmetic",
        sparsifier=None,
        elect=False,
        model_params=WeightParams,
        global_params=TaskArithmeticGlobals,
        paper=TASK_ARITHMETIC_PAPER,
        description="base + lambda * weighted sum of task vectors",
    ),
    _method(
        "ties",
        sparsifier=_magnitude,
        elect=True,
        model_params=DensityParams,
        global_params=TiesGlobals,
        paper=TIES_PAPER,
        description="keep the largest task-vector entries, elect a sign per entry, average",
    ),
    _method(
        "dare_linear",
        sparsifier=_random,
        elect=False,
        model_params=DensityParams,
        global_params=SparseGlobals,
        paper=DARE_PAPER,
        description="randomly drop task-vector entries, rescale, add",
    ),
    _method(
        "dare_ties",
        sparsifier=_random,
        elect=True,
        model_params=DensityParams,
        global_params=SparseGlobals,
        paper=DARE_PAPER,
        description="randomly drop task-vector entries, rescale, elect a sign per entry",
    ),
    _method(
        "breadcrumbs",
        sparsifier=_breadcrumbs,
        elect=False,
        model_params=BreadcrumbsParams,
        global_params=BreadcrumbsGlobals,
        paper=BREADCRUMBS_PAPER,
        description="drop the largest (outlier) and smallest task-vector entries, add",
    ),
    _method(
        "breadcrumbs_ties",
        sparsifier=_breadcrumbs,
        elect=True,
        model_params=BreadcrumbsParams,
        global_params=BreadcrumbsGlobals,
        paper=BREADCRUMBS_PAPER,
        description="breadcrumbs pruning followed by TIES sign election",
    ),
    _method(
        "della",
        sparsifier=_della,
        elect=True,
        model_params=DellaParams,
        global_params=DellaGlobals,
        paper=DELLA_PAPER,
        description="drop entries with magnitude-ranked probabilities, rescale, elect a sign",
    ),
    _method(
        "della_linear",
        sparsifier=_della,
        elect=False,
        model_params=DellaParams,
        global_params=SparseGlobals,
        paper=DELLA_PAPER,
        description="drop entries with magnitude-ranked probabilities, rescale, add",
    ),
)
