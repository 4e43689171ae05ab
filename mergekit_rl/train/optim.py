"""Online Merging Optimizers (Lu et al. 2024, arXiv:2405.17931): OnDARE and OnTIES.

Every step, the ordinary AdamW update Delta is sparsified and merged with a fixed task vector
tau = theta_SFT - theta_base (computed once before training; only tau is kept):

    OnDARE:  p += alpha * tau + (1 - alpha) * drop(Delta)
    OnTIES:  p += alpha * tau * [sign tau = s] + (1 - alpha) * topk(Delta) * [sign Delta = s]

drop() keeps each entry with probability reserve_p (fresh every step, kept entries scaled by
1/reserve_p), topk() keeps the reserve_p fraction of largest |Delta|, and s is the elected sign of
tau + Delta. tau is sparsified once at construction the same way (one mask for the whole run).
Design notes section 2 gives the formulas and where the paper and the released code differ.

Storage: tau lives in the optimizer state in `tau_dtype` (bf16); when sparse (the default
reserve_p = 0.01) as flat indices + values, about 0.1 byte per parameter. Adam's moments (and the
merge_every buffer) are float32 whatever the parameter dtype. OnDARE's fresh masks are drawn as
geometric gaps from a counter-based hash (`rng.hash_sparse_keep`: a fixed-size draw, no host
sync), and its update is computed only at the kept entries, so a step costs about the Adam
moment update alone. OnTIES needs |Delta| everywhere for its top-k and forms Delta only at the
k kept entries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from ..errors import MismatchError, RunError, UsageError
from ..merge import blend, native, rng, rounding, selection
from . import optim_shard
from .taskvec import TaskVectorSource, find_task_vector, find_task_vector_rows

Mode = Literal["ondare", "onties"]
SignOn = Literal["unweighted", "weighted"]
Missing = Literal["zero", "error"]

# tau is stored as (int64 flat index, value) pairs when fewer than this fraction of its entries are
# kept: 10 bytes per kept entry against 2 bytes per entry (bf16) dense.
SPARSE_BELOW = 0.2
# devices where top-k selection may read sizes back on the host (a sync costs nothing on the CPU);
# elsewhere the selection is sync-free (`selection.top_magnitude_indices_static`, the same result)
HOST_SELECTION_DEVICES: tuple[str, ...] = ("cpu",)
# wrapper prefixes dropped from parameter names before they key random draws
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# state kept in float32 whatever the parameter dtype
FLOAT32_STATE = ("exp_avg", "exp_avg_sq", "acc")
# devices where torch's fused AdamW kernel computes the moments and Delta in one pass
# (`fused_adam_deltas_`); elsewhere multi-tensor moments and Delta per parameter (same math)
FUSED_ADAM_DEVICES: tuple[str, ...] = tuple(_get_fused_kernels_supported_devices())
# parameters are stepped in chunks of at most this many entries (or the largest parameter):
# the scratch buffers Delta and the float32 gradients live in are this big
CHUNK_ELEMS = 1 << 22
# the param-group key counting the group's optimizer steps, which keys every random draw
# (`mask_key`): saved with the param groups in every checkpoint, never reset with the state
DRAW_STEP = "draw_step"


# -- pure helpers on flattened tensors -------------------------------------------------------
# A "sparse flat" tensor is (idx, val): val[i] sits at flat index idx[i]; idx None means dense.


def gather(flat: Tensor, idx: Tensor | None) -> Tensor:
    """flat[idx] (a copy), or flat itself when idx is None."""
    return flat if idx is None else flat.index_select(0, idx)  # 4x faster than flat[idx] on CPU


def top_indices(flat: Tensor, density: float, magnitudes: bool = False) -> Tensor | None:
    """Sorted flat indices of the top int(density * numel) |x| (TIES); None keeps everything.
    magnitudes: flat already holds |x|.

    A tensor too small to keep a single entry (density * numel < 1) is kept dense, as the
    released code does for tau: otherwise small tensors (norms, biases) would never train.
    """
    if density >= 1.0 or density * flat.numel() < 1:
        return None
    k = int(density * flat.numel())
    if flat.device.type not in HOST_SELECTION_DEVICES:
        return selection.top_magnitude_indices_static(flat, k)
    # syncs are free on the host, and the sampled bound is faster there
    if magnitudes:
        return selection.top_indices_of_magnitudes(flat, k)
    return selection.top_magnitude_indices(flat, k)


def align_rows(tau: Tensor, shape: torch.Size, name: str) -> Tensor:
    """tau shaped like the parameter: resized embeddings keep the overlapping rows, 0 elsewhere."""
    if tau.shape == shape:
        return tau
    if tau.dim() == 0 or tau.dim() != len(shape) or tau.shape[1:] != shape[1:]:
        raise MismatchError(
            f"task vector '{name}' has shape {list(tau.shape)} but the parameter has "
            f"{list(shape)}; only the number of rows (a resized embedding) may differ."
        )
    out = tau.new_zeros(shape)
    rows = min(tau.shape[0], shape[0])
    out[:rows] = tau[:rows]
    return out


def canonical_name(name: str) -> str:
    """The parameter name without wrapper prefixes ("module." of DDP, "_orig_mod." of
    torch.compile): the name random masks are keyed by, so a run keeps its masks when it is
    resumed with or without a wrapper."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def mask_key(seed: int, name: str, *tags: str) -> int:
    """The key of a counter-based random draw (`rng.hash_bits`) for one parameter.

    OnDARE's tau mask: ("tau",); the Delta mask at draw step t: ("delta", str(t));
    stochastic rounding at draw step t: ("round", str(t), what). The draw step is the param
    group's DRAW_STEP counter (its optimizer steps), which no optimizer-state reset clears:
    Elastic Reset's `reset_optimizer` restarts Adam's own step count, and keying on that would
    draw the same masks every cycle. Pure functions of the seed, the parameter's canonical name
    and the draw step: every rank, device and resume draws the same.
    """
    return rng.tensor_seed(seed, "online-merging", canonical_name(name), *tags)


def ondare_tau(
    tau: Tensor, reserve_p: float, rescale: bool, clip_val: float | None, key: int
) -> tuple[Tensor | None, Tensor]:
    """OnDARE init: one Bernoulli(reserve_p) mask for the run (`rng.hash_sparse_keep` under
    key, on tau's device), x 1/p, clamped."""
    flat = tau.reshape(-1)
    if reserve_p >= 1.0:
        idx, val = None, flat
    else:
        idx, valid = rng.hash_sparse_keep(flat.numel(), reserve_p, key, device=tau.device)
        idx = idx[valid]  # a host sync, once per tensor at construction
        val = flat[idx] / reserve_p if rescale else flat[idx]
    return idx, clip(val, clip_val)


def onties_tau(
    tau: Tensor, reserve_p: float, l1_rescale: bool, clip_val: float | None
) -> tuple[Tensor | None, Tensor]:
    """OnTIES init: keep the top reserve_p fraction of |tau| (optionally L1-rescaled), clamped."""
    flat = tau.reshape(-1)
    idx = top_indices(flat, reserve_p)
    if idx is None:
        return None, clip(flat, clip_val)
    val = flat[idx]
    return idx, clip(blend.l1_rescale(flat, val) if l1_rescale else val, clip_val)


def clip(val: Tensor, clip_val: float | None) -> Tensor:
    return val if clip_val is None else val.clamp(-clip_val, clip_val)


def compact(idx: Tensor | None, val: Tensor, numel: int) -> tuple[Tensor | None, Tensor]:
    """Sparse storage when it is smaller than dense, dense (zeros elsewhere) otherwise."""
    if idx is None or idx.numel() < SPARSE_BELOW * numel:
        return idx, val
    dense = val.new_zeros(numel)
    dense[idx] = val
    return None, dense


def tau_at(state: Mapping[str, Any], idx: Tensor | None, numel: int, like: Tensor) -> Tensor:
    """tau (as like's dtype) at flat indices idx (every entry if None); 0 where tau stores nothing."""
    tau, tau_idx = state.get("tau"), state.get("tau_idx")
    size = numel if idx is None else idx.numel()
    if tau is None or (tau_idx is not None and tau_idx.numel() == 0):
        return like.new_zeros(size)
    if tau_idx is None:
        return gather(tau, idx).to(like.dtype)
    if idx is None:
        dense = like.new_zeros(numel)
        dense[tau_idx] = tau.to(like.dtype)
        return dense
    pos = selection.sorted_positions(tau_idx, idx)  # both sorted; -1 where tau stores nothing
    return torch.where(pos >= 0, gather(tau, pos.clamp(min=0)).to(like.dtype), 0.0)


def add_at_(
    flat: Tensor, idx: Tensor | None, val: Tensor, round_key: int | Tensor | None = None
) -> None:
    """flat[idx] += val (val float32 [len(idx)], or [numel] with idx None); repeated indices
    accumulate.

    round_key: for a bfloat16 / float16 flat, round every sum up or down at random (unbiased,
    `rounding.stochastic_round` with bits from the key, or the bits themselves) instead of to
    nearest, so updates far below half an ulp still move the weights on average
    (`rounding.stochastic_add_at_`; a repeated index must carry 0 there).
    """
    if round_key is None or flat.dtype not in (torch.bfloat16, torch.float16):
        if idx is None:
            flat.add_(val)
        else:
            scatter_add_(flat, idx, val.to(flat.dtype))
        return
    if idx is None:
        flat.copy_(rounding.stochastic_round(flat.float() + val, flat.dtype, round_key))
    else:
        rounding.stochastic_add_at_(flat, idx, val, round_key)


def add_many_(adds: list[tuple[Tensor, Tensor | None, Tensor, int | Tensor | None]]) -> None:
    """`add_at_(flat, idx, val, round)` for many tensors. The sparse rounded adds whose random
    bits were drawn already (`OnlineMergingAdamW._rounding`) run as one batch per dtype
    (`rounding.stochastic_add_at_many_`: ~10 kernels for all of them instead of ~11 per tensor);
    the others one by one (the host kernels draw their own bits)."""
    batches: dict[torch.dtype, list] = {}
    for flat, idx, val, rnd in adds:
        if idx is not None and isinstance(rnd, Tensor) and flat.dtype in LOW_PRECISION:
            batches.setdefault(flat.dtype, []).append((flat, idx, val, rnd))
        else:
            add_at_(flat, idx, val, rnd)
    for batch in batches.values():
        rounding.stochastic_add_at_many_(*(list(x) for x in zip(*batch, strict=True)))


def scatter_add_(flat: Tensor, idx: Tensor, val: Tensor) -> None:
    """flat[idx] += val, repeated indices accumulating. On the host `scatter_add_` is 1.7x
    faster than `index_add_` for float32 and 10x slower for bfloat16 (measured, 1 thread)."""
    if flat.dtype == torch.float32:
        flat.scatter_add_(0, idx, val)
    else:
        flat.index_add_(0, idx, val)


def tau_pushes(
    states: Sequence[Mapping[str, Any]], alpha: float
) -> list[tuple[Tensor | None, Tensor] | None]:
    """What the per-step push p += alpha * tau adds for each state: (tau's flat indices, None
    for dense; alpha * tau in float32), cast and scaled for all of them at once (one kernel
    each, not one per parameter). None where a state has no tau, or alpha is 0."""
    out: list[tuple[Tensor | None, Tensor] | None] = [None] * len(states)
    have = [i for i, st in enumerate(states) if st.get("tau") is not None]
    if alpha == 0.0 or not have:
        return out
    taus = [states[i]["tau"] for i in have]
    vals = torch.cat(taus).float().mul_(alpha).split([t.numel() for t in taus])
    for i, v in zip(have, vals, strict=True):
        out[i] = (states[i].get("tau_idx"), v)
    return out


def adam_delta(m: Tensor, v: Tensor, idx: Tensor | None, step_size: float, eps: float) -> Tensor:
    """HF-style AdamW update -step_size * m / (sqrt(v) + eps), flattened, at idx (all if None)."""
    m, v = gather(m.reshape(-1), idx), gather(v.reshape(-1), idx)
    denom = v.sqrt().add_(eps)
    return torch.div(m, denom, out=denom).mul_(-step_size)


def fused_adam_deltas_(
    out: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """out[i] <- the HF-style AdamW update of parameter i at step steps[i], and its moments
    updated in place, in one fused pass (torch's fused AdamW kernel run on zeroed float32 buffers
    as "parameters"; every list float32, out zeroed by the caller).

    The moments are those of `_update_moments` to rounding (the kernel may fuse multiply-adds;
    the values are bit-identical on most entries). torch adds eps after the bias
    correction, HF before it: eps / sqrt(1 - b2^t) makes the two the same formula
    (-lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)), rounded differently (a few ulp).
    One kernel per distinct step count; the step tensors are filled on the device (no copy).
    """
    b1, b2 = betas
    for t in sorted(set(steps)):
        at = [i for i, s in enumerate(steps) if s == t]
        step = torch.full((), float(t), device=out[0].device)
        torch._fused_adamw_(
            [out[i] for i in at],
            [grads[i] for i in at],
            [exp_avgs[i] for i in at],
            [exp_avg_sqs[i] for i in at],
            [],
            [step] * len(at),
            lr=lr,
            beta1=b1,
            beta2=b2,
            weight_decay=0.0,
            eps=eps / math.sqrt(1.0 - b2**t),
            amsgrad=False,
            maximize=False,
        )


def one_device(params: list[Tensor]) -> bool:
    """All on one device: one batch of kernels can serve them."""
    return len({p.device for p in params}) == 1


def chunks(numels: list[int], budget: int) -> list[range]:
    """Consecutive runs of indices whose numels sum to at most max(budget, largest)."""
    budget, out, start, total = max(budget, *numels), [], 0, 0
    for i, n in enumerate(numels):
        if total + n > budget:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    out.append(range(start, len(numels)))
    return out


def adam_magnitude(m: Tensor, v: Tensor, step_size: float, eps: float) -> Tensor:
    """|adam_delta| over every entry, bit for bit (|-s * (m / d)| = s * |m / d|), in one buffer."""
    denom = v.reshape(-1).sqrt().add_(eps)
    return torch.div(m.reshape(-1), denom, out=denom).abs_().mul_(step_size)


def ondare_drop(
    delta_at: Callable[[Tensor | None], Tensor],
    idx: Tensor | None,
    valid: Tensor | None,
    reserve_p: float,
    alpha: float,
    rescale: bool,
) -> Tensor:
    """(1 - alpha) * drop(Delta) at the drawn entries idx [n] (every entry if None): Delta there,
    x 1/reserve_p when rescaling, 0 at the draws past the end (valid False). A fresh tensor.

    The mask is a fixed-size draw (`rng.hash_sparse_keep`): no host sync, and Adam's update is
    computed only at the ~reserve_p * numel drawn entries. idx and delta_at may also span the
    parameters of a whole chunk (one gather for all of them).
    """
    delta = delta_at(idx)  # [n] or [numel], float32 (with idx None, maybe the buffer itself)
    if idx is not None and rescale:
        delta = delta.div_(reserve_p)
    if valid is not None:
        delta = torch.where(valid, delta, 0.0)
    return delta * (1.0 - alpha)


def all_finite(tensors: Sequence[Tensor], whole: Tensor | None = None) -> Tensor:
    """[len(tensors)] bool on their device: whether each holds no NaN or inf, from their L2
    norms (one multi-tensor kernel; NaN and inf give a non-finite norm, and so would finite
    entries whose squares sum past float32's range, ~1e19 each: Adam's update is bounded by
    about lr * sqrt(1 / (1 - beta2)), far below). Each tensor has at least one entry.

    whole: the tensors laid end to end in one flat buffer, on a device where a sync is free
    (HOST_SELECTION_DEVICES): one dot product of it answers for all of them (4M entries: 2.3 ms
    against 4.3 ms for the norms, and 77 ms for isfinite().all(), 1 thread); the norms run only
    when it is not finite, to find which one."""
    if whole is not None and bool(torch.dot(whole, whole).isfinite()):
        return torch.ones(len(tensors), dtype=torch.bool, device=whole.device)
    return torch.stack(torch._foreach_norm(list(tensors), 2.0)).isfinite()


@dataclass
class FiniteCheck:
    """One step's finiteness flags of a group's updates, on their way to the host: flags[i]
    False when the update of names[i] held NaN or inf at optimizer step `step`. `arrived` is
    an event recorded after a non-blocking copy from an accelerator (None: already here)."""

    step: int
    names: list[str]
    flags: Tensor  # [P] bool, on the host
    arrived: Any = None

    def ready(self, wait: bool) -> bool:
        if self.arrived is not None and wait:
            self.arrived.synchronize()
        return self.arrived is None or self.arrived.query()

    def raise_if_bad(self) -> None:
        ok = self.flags.numpy()  # host memory: no device op, no sync
        bad = [n for n, good in zip(self.names, ok, strict=True) if not good]
        if bad:
            more = f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
            raise RunError(
                f"optimizer step {self.step}: the update of parameter '{bad[0]}'{more} holds NaN "
                "or inf (its gradient or AdamW moments diverged); training stopped. Lower the "
                "learning rate, check the loss and the data, and resume from a checkpoint saved "
                "before this step."
            )


@dataclass
class Merge:
    """One parameter's merge at one step, ready to apply (`OnlineMergingAdamW._apply`):

        p *= 1 - decay (before or after);  p += alpha * tau (push);  p[idx] += vals

    push: whether alpha * tau is added (OnTIES keeping every entry has it in vals already).
    rounds: the stochastic-rounding keys (tau push, vals, decay), None for round-to-nearest."""

    p: Tensor
    state: dict[str, Any]
    idx: Tensor | None
    vals: Tensor
    push: bool
    rounds: tuple[int, int, int] | None
    decay: float


def onties_sparse(
    numel: int,
    state: Mapping[str, Any],
    delta_at: Callable[[Tensor | None], Tensor],
    reserve_p: float,
    alpha: float,
    weighted_sign: bool,
    magnitude: Callable[[], Tensor] | None = None,
) -> tuple[Tensor | None, Tensor]:
    """p += alpha * tau * [tau agrees] + (1 - alpha) * topk(Delta) * [Delta agrees], for one
    parameter, as (idx, vals) of a `Merge`: the top reserve_p of |Delta| (idx [k]) and there
    the merged update less the alpha * tau the push adds; or, when every entry is kept, (None,
    the whole update [numel]), which then takes no push.

    Off the kept entries of Delta the elected sign is tau's own, so tau always agrees there:
    every stored tau entry gets alpha * tau (the push), and the k kept entries the difference
    between their merged update and alpha * tau (the election runs on them only).

    magnitude: |Delta| over every entry (a fresh buffer), when cheaper than Delta itself.
    """
    if magnitude is None:
        dense = delta_at(None)  # [numel] float32
        idx = top_indices(dense, reserve_p)
        delta = gather(dense, idx)  # [k]
    else:  # select on |Delta| alone; Delta itself only at the k kept entries
        idx = top_indices(magnitude(), reserve_p, magnitudes=True)
        delta = delta_at(idx)  # [k] (or [numel] when every entry is kept)
    tau = tau_at(state, idx, numel, like=delta)  # [k]
    update = onties_update(tau, delta, alpha, weighted_sign)  # [k]
    if idx is None:  # tau, stored dense, is in the update already
        return None, update
    return idx, update.sub_(tau, alpha=alpha)


def onties_update(tau: Tensor, delta: Tensor, alpha: float, weighted_sign: bool) -> Tensor:
    """alpha * tau * [tau agrees] + (1 - alpha) * Delta * [Delta agrees] at the kept entries
    (tau and Delta float32 [k], entry by entry: k may span many parameters). A fresh tensor."""
    if weighted_sign:
        sign = blend.elect_sign(torch.stack([tau * alpha, delta * (1.0 - alpha)]))
    else:
        sign = blend.elect_sign(torch.stack([tau, delta]))
    kept_tau = torch.where(blend.agrees_with(tau, sign), tau, 0.0)
    kept_delta = torch.where(blend.agrees_with(delta, sign), delta, 0.0)
    return kept_tau.mul_(alpha).add_(kept_delta, alpha=1.0 - alpha)


# -- the optimizer ---------------------------------------------------------------------------


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise UsageError(f"OnlineMergingAdamW option '{option}': {message}")


def _check_group(group: Mapping[str, Any]) -> None:
    _check(group["lr"] >= 0.0, "lr", f"must be >= 0, got {group['lr']}.")
    _check(group["eps"] >= 0.0, "eps", f"must be >= 0, got {group['eps']}.")
    b1, b2 = group["betas"]
    _check(0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0, "betas", f"must be in [0, 1), got {(b1, b2)}.")
    _check(group["weight_decay"] >= 0.0, "weight_decay", "must be >= 0.")
    p = group["reserve_p"]
    low = rng.GAP_MIN_DENSITY  # below it a mask keeps under one entry in a million
    _check(low <= p <= 1.0, "reserve_p", f"must be in [{low:g}, 1], got {p}.")
    a = group["alpha"]
    _check(0.0 <= a <= 1.0, "alpha", f"must be in [0, 1], got {a}.")


class OnlineMergingAdamW(Optimizer):
    """AdamW that merges every update with a task vector (OnDARE / OnTIES).

    named_params: `model.named_parameters()` (or param groups whose "params" are (name, param)
    pairs): names match parameters to tau (a wrapper prefix such as "module." is dropped when
    the source lacks the full name). task_vectors: a {name: tau} mapping or a lazy
    `TaskVectorSource` (read one tensor at a time here, at construction); None means tau = 0
    everywhere (for instance before `load_state_dict` restores a saved tau).

    alpha is a per-step rate: after T steps the push towards tau is about T * alpha / reserve_p
    on a fixed reserve_p fraction of the weights, independent of the learning rate. clip_val
    clamps the stored tau to +-clip_val in both modes (the released code clamps OnDARE's).

    Random masks are counter-based (`rng.hash_sparse_keep` under `mask_key`): a pure function
    of (seed, parameter name, the group's step count), the same on every device and DDP rank,
    with no generator state to save. The step count is the param group's "draw_step", saved
    with the param groups and kept when the optimizer state is reset (Elastic Reset's
    reset_optimizer), so every step draws a fresh mask.

    alpha * tau is pushed at every step into every parameter that has a tau, also into one that
    got no gradient that step (merge_every = 1; with K > 1 the push comes with a parameter's
    merges). Parameters with no entries are skipped.

    A diverged update stops training: when Adam's update of a parameter (or, on the path that
    does not form it densely, its first moment) holds NaN or inf, RunError names the parameter and
    the optimizer step, at that step on the host and a step or so later on accelerators (the
    flags come back without a host sync; `flush()` waits for them).

    Precision: Adam moments and the merge_every buffer are float32 whatever the parameter dtype.
    For bfloat16 / float16 parameters every update is added with stochastic rounding
    (`stochastic_rounding=True`, the default; random bits from the same counter-based hash, so
    ranks agree): alpha * tau (~1e-7 per step) and small Adam updates are far below half an ulp
    of a bf16 weight, and round-to-nearest would drop them every step. Stochastic rounding moves
    the weight by the right amount on average at no memory cost (a Kahan compensation buffer
    would cost 2-4 more bytes per parameter). False rounds to nearest.

    merge_every=K: Adam runs every step but its updates accumulate in a float32 buffer and the
    parameters stay put; every K-th step the accumulated update is sparsified and merged (and
    tau pushed, once per K steps). Weight decay is applied at the merge with the summed rate
    sum(lr_t * weight_decay) of the K steps. K = 1 is the ordinary per-step optimizer. A
    checkpoint saved mid-cycle holds the weights of the last merge, and the pending buffer in
    the optimizer state (a resume continues the cycle); `flush()` merges the pending buffer
    now (the train runner calls it at the end of training, before the final model is written).
    """

    def __init__(
        self,
        named_params: Iterable[Any],
        task_vectors: Mapping[str, Tensor] | TaskVectorSource | None,
        *,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: Mode = "ondare",
        reserve_p: float = 0.01,
        alpha: float = 1e-7,
        rescale: bool = True,
        sign_on: SignOn = "unweighted",
        clip_val: float | None = 1.0,
        tau_l1_rescale: bool = False,
        merge_every: int = 1,
        decay_after_update: bool = True,
        tau_dtype: torch.dtype = torch.bfloat16,
        missing: Missing = "zero",
        stochastic_rounding: bool = True,
        seed: int = 0,
    ):
        _check(mode in ("ondare", "onties"), "mode", f"must be ondare or onties, got {mode!r}.")
        _check(sign_on in ("unweighted", "weighted"), "sign_on", f"got {sign_on!r}.")
        _check(missing in ("zero", "error"), "missing", f"must be zero or error, got {missing!r}.")
        _check(int(merge_every) == merge_every >= 1, "merge_every", "must be an integer >= 1.")
        _check(clip_val is None or clip_val > 0, "clip_val", "must be > 0 or None.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_p=reserve_p, alpha=alpha
        )
        defaults[DRAW_STEP] = 0
        super().__init__(named_params, defaults)
        self.mode, self.rescale, self.weighted_sign = mode, rescale, sign_on == "weighted"
        self.clip_val, self.tau_l1_rescale, self.merge_every = clip_val, tau_l1_rescale, merge_every
        self.decay_after_update, self.tau_dtype, self.seed = decay_after_update, tau_dtype, seed
        self.stochastic_rounding = stochastic_rounding
        self._names: dict[Tensor, str] = {}
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}  # see _scratch
        self._finite_checks: list[FiniteCheck] = []  # see _check_finite
        self._shards: dict[Tensor, optim_shard.FlatShard] = {}  # FSDP2 DTensor parameters
        for group in self.param_groups:
            _check_group(group)
            names = group.get("param_names")
            if names is None:
                raise UsageError(
                    "OnlineMergingAdamW option 'named_params': pass named parameters "
                    "(model.named_parameters()) so tau can be matched by name."
                )
            for name, p in zip(names, group["params"], strict=True):
                _check(p.is_contiguous(), "named_params", f"parameter '{name}' is not contiguous.")
                self._names[p] = name
                shard = optim_shard.flat_shard(p, name)
                if shard is not None:
                    self._shards[p] = shard
                    # state made now, not at the first step: a fresh optimizer's state_dict is
                    # then the template torch.distributed.checkpoint loads a checkpoint into
                    self._state(p)
                tau = None if task_vectors is None else self._read_tau(task_vectors, name, p)
                if tau is None and task_vectors is not None and missing == "error":
                    raise UsageError(
                        f"parameter '{name}' has no task vector (no tensor of that name in the "
                        "base/SFT checkpoints); freeze it, or pass missing='zero' to train it with "
                        "tau = 0."
                    )
                if tau is not None:
                    self._init_tau(name, p, tau, group)
        first = self.param_groups[0]["param_names"][0]
        if task_vectors is not None and not any("tau" in s for s in self.state.values()):
            # every name missed: the wrong checkpoints, or a wrapper that renames parameters
            # (FSDP's flat parameters); training on would silently be plain sparse Adam
            raise UsageError(
                f"no parameter matches a task vector (the first is '{first}'); give the base and "
                "SFT checkpoints the policy was trained from, or run without FSDP flat parameters."
            )

    def _read_tau(
        self, source: Mapping[str, Tensor] | TaskVectorSource, name: str, p: Tensor
    ) -> Tensor | None:
        """tau for p: the whole tensor, or a sharded parameter's own rows only."""
        shard = self._shards.get(p)
        if shard is None:
            return find_task_vector(source, name)
        return find_task_vector_rows(source, name, shard.row0, shard.row0 + shard.rows)

    def _init_tau(self, name: str, p: Tensor, tau: Tensor, group: Mapping[str, Any]) -> None:
        if p in self._shards:
            optim_shard.init_tau(self, name, p, self._shards[p], tau, group)
            return
        tau = align_rows(tau, p.shape, name).to(device=p.device, dtype=torch.float32)
        reserve_p = group["reserve_p"]
        if self.mode == "ondare":
            key = mask_key(self.seed, name, "tau")
            idx, val = ondare_tau(tau, reserve_p, self.rescale, self.clip_val, key)
        else:
            idx, val = onties_tau(tau, reserve_p, self.tau_l1_rescale, self.clip_val)
        idx, val = compact(idx, val, p.numel())
        self.state[p]["tau"] = val.to(self.tau_dtype)
        if idx is not None:
            self.state[p]["tau_idx"] = idx

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step merged with tau. No host syncs on accelerators: sizes come from the
        shapes, random draws from the counter-based hash, top-k from a radix select."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._raise_nonfinite(wait=False)  # flags of earlier steps that have arrived
        for group in self.param_groups:
            group[DRAW_STEP] += 1
            # an empty parameter has nothing to update (and no index a mask could draw)
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            self._push_without_grad(group)
            if not params:
                continue
            states = [self._state(p) for p in params]
            for state in states:
                state["step"] += 1
            if self._shards:  # FSDP2 shards step one by one (optim_shard)
                for p, state in zip(params, states, strict=True):
                    if p in self._shards:
                        optim_shard.step_param(self, group, p, state, self._shards[p])
                states = [s for p, s in zip(params, states, strict=True) if p not in self._shards]
                params = [p for p in params if p not in self._shards]
                if not params:
                    continue
            masks = self._masks(group, params, states)
            if self._fused(params):
                self._check_finite(group, params, self._fused_steps(group, params, states, masks))
                continue
            self._update_moments(group, params, states)
            # Delta is not formed densely here: a NaN / inf gradient stays in its first moment
            self._check_finite(group, params, [all_finite([s["exp_avg"] for s in states])])
            per = [None] * len(params)
            if masks is not None:
                idx, valid, draws = masks
                per = list(zip(idx.split(draws), valid.split(draws), strict=True))
            for p, state, mask in zip(params, states, per, strict=True):
                merge = self._step_param(group, p, state, mask)
                if merge is not None:
                    self._apply(group, [merge])
        return loss

    def _check_finite(
        self, group: Mapping[str, Any], params: list[Tensor], flags: list[Tensor]
    ) -> None:
        """Queue this step's finiteness flags of the group's updates (`FiniteCheck`), and raise
        at once where a sync costs nothing (HOST_SELECTION_DEVICES). On accelerators the flags
        go to pinned host memory without blocking, and a later step (or `flush`) reads them
        once they have arrived: no host sync per tensor or per step."""
        done = torch.cat(flags)  # [P] bool
        names = [self._names[p] for p in params]
        if done.device.type == "cpu":
            check = FiniteCheck(group[DRAW_STEP], names, done)
        else:
            host = torch.empty(done.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(done, non_blocking=True)
            arrived = torch.Event(device=done.device)
            arrived.record()
            check = FiniteCheck(group[DRAW_STEP], names, host, arrived)
        self._finite_checks.append(check)
        if done.device.type in HOST_SELECTION_DEVICES:
            self._raise_nonfinite(wait=True)

    def _raise_nonfinite(self, wait: bool) -> None:
        """Read the queued `FiniteCheck`s in step order, as far as they have arrived (all of
        them with wait), and raise RunError at the first that found NaN or inf."""
        while self._finite_checks and self._finite_checks[0].ready(wait):
            self._finite_checks.pop(0).raise_if_bad()

    def _push_without_grad(self, group: Mapping[str, Any]) -> None:
        """alpha * tau into the parameters of the group that got no gradient this step (an MoE
        expert no token was routed to): the push is part of every step whatever the gradient
        (design notes section 2), so such a parameter drifts towards tau like the others. No
        Adam update and no weight decay (AdamW skips a parameter without a gradient). With
        merge_every > 1 the push comes with a parameter's merges, every K of its own steps, so
        a step without a gradient does not push it."""
        if group["alpha"] == 0.0 or self.merge_every > 1:
            return
        t = group[DRAW_STEP]
        merges = []
        for p in group["params"]:
            state = self.state.get(p, {})
            # FSDP2 shards are left out: a sharded parameter's push goes through optim_shard,
            # which pushes only with an update (FSDP2 gives every parameter a gradient)
            if p.grad is None and p.numel() > 0 and state.get("tau") is not None:
                if p in self._shards:
                    continue
                empty = torch.empty(0, dtype=torch.int64, device=p.device)
                vals = torch.empty(0, dtype=torch.float32, device=p.device)
                merges.append(Merge(p, state, empty, vals, True, self._round_keys(p, t), 0.0))
        if merges:
            self._apply(group, merges)

    @staticmethod
    def _fused(params: list[Tensor]) -> bool:
        """Whether torch's fused AdamW kernel serves these parameters (one device it has)."""
        return one_device(params) and params[0].device.type in FUSED_ADAM_DEVICES

    def _fused_steps(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        states: list[dict],
        masks: tuple[Tensor, Tensor, list[int]] | None,
    ) -> list[Tensor]:
        """The step of every parameter, a chunk at a time: one fused kernel writes the chunk's
        Delta (and updates its moments), then each parameter merges its slice of it. Returns
        each chunk's `all_finite` flags of Delta ([parameters in the chunk] bool, in order).

        What can be done for the whole chunk at once is (a fixed number of kernels per chunk,
        not per parameter, which is what bounds a step on an accelerator): OnDARE's gather,
        rescale and mask of Delta at the drawn entries (`_ondare_chunk`), OnTIES' tau lookup,
        sign election and update at the kept entries (`_onties_chunk`; the top-k itself stays
        per parameter), and in `_apply` the alpha * tau pushes and the stochastic rounding of
        every sparse add. Each parameter then only adds its slices of the results."""
        numels = [p.numel() for p in params]
        starts = [0, *itertools.accumulate(numels)]  # each parameter's offset in the group
        drawn = None if masks is None else self._drawn(masks, starts)
        finite = []
        for run in chunks(numels, CHUNK_ELEMS):
            size = sum(numels[i] for i in run)
            delta = self._scratch("delta", size, params[0].device).zero_()
            deltas = delta.split(numels[run.start : run.stop])
            grads = [params[i].grad.reshape(-1) for i in run]
            if any(g.dtype != torch.float32 for g in grads):
                g32 = self._scratch("grad", size, params[0].device).split(
                    numels[run.start : run.stop]
                )
                grads = [b.copy_(g) for b, g in zip(g32, grads, strict=True)]
            fused_adam_deltas_(
                deltas,
                grads,
                [states[i]["exp_avg"].view(-1) for i in run],
                [states[i]["exp_avg_sq"].view(-1) for i in run],
                [states[i]["step"] for i in run],
                group["lr"],
                group["betas"],
                group["eps"],
            )
            host = params[0].device.type in HOST_SELECTION_DEVICES
            finite.append(all_finite(deltas, delta if host else None))
            sparse: list[tuple[Tensor, Tensor] | None] = [None] * len(run)
            if drawn is not None:
                sparse = self._ondare_chunk(group, run, delta, starts, drawn)
            elif self.mode == "onties" and self.merge_every == 1:
                sparse = self._onties_chunk(group, run, states, delta, deltas, starts)
            pending = [
                self._step_param(group, params[i], states[i], None, deltas[j], sparse[j])
                for j, i in enumerate(run)
            ]
            self._apply(group, [m for m in pending if m is not None])  # before delta is reused
        return finite

    @staticmethod
    def _drawn(
        masks: tuple[Tensor, Tensor, list[int]], starts: list[int]
    ) -> tuple[Tensor, Tensor, Tensor, list[int], list[int]]:
        """OnDARE's masks (`_masks`) with their entries also as offsets into the group's
        parameters laid end to end: (idx, flat idx, valid, draws, each parameter's first draw)."""
        idx, valid, draws = masks
        firsts = [0, *itertools.accumulate(draws)]
        offsets, reps = rng.to_device(torch.tensor([starts[:-1], draws]), idx.device)
        flat_idx = idx + torch.repeat_interleave(offsets, reps, output_size=firsts[-1])
        return idx, flat_idx, valid, draws, firsts

    def _ondare_chunk(
        self,
        group: Mapping[str, Any],
        run: range,
        delta: Tensor,
        starts: list[int],
        drawn: tuple[Tensor, Tensor, Tensor, list[int], list[int]],
    ) -> list[tuple[Tensor, Tensor] | None]:
        """(idx, (1 - alpha) * drop(Delta) there) for every parameter of the chunk run, from one
        gather of the chunk's Delta buffer [size] (`ondare_drop`)."""
        idx, flat_idx, valid, draws, firsts = drawn
        a, b = firsts[run.start], firsts[run.stop]
        at = flat_idx[a:b] - starts[run.start]  # [draws of the chunk] into delta
        reserve_p, alpha = group["reserve_p"], group["alpha"]
        drop = ondare_drop(partial(gather, delta), at, valid[a:b], reserve_p, alpha, self.rescale)
        pieces = drop.split(draws[run.start : run.stop])
        return [(idx[firsts[i] : firsts[i + 1]], d) for i, d in zip(run, pieces, strict=True)]

    def _onties_chunk(
        self,
        group: Mapping[str, Any],
        run: range,
        states: list[dict],
        delta: Tensor,
        deltas: Sequence[Tensor],
        starts: list[int],
    ) -> list[tuple[Tensor, Tensor] | None]:
        """(idx, update - alpha * tau there) for the parameters of the chunk run: each one's top
        k of its Delta, then tau at the kept entries of all of them (sparse tau laid end to end,
        `tau_at`), the election and the update (`onties_update`) in one batch of kernels. None
        for a parameter that keeps every entry or stores tau dense: `onties_sparse` serves it."""
        reserve_p, alpha = group["reserve_p"], group["alpha"]
        batch = []  # (position in run, parameter, its kept entries [k])
        for j, i in enumerate(run):
            if "tau" in states[i] and "tau_idx" not in states[i]:
                continue
            idx = top_indices(deltas[j], reserve_p)
            if idx is not None:
                batch.append((j, i, idx))
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(run)
        if not batch:
            return out
        base = starts[run.start]
        offsets = [starts[i] - base for _, i, _ in batch]
        ks = [idx.numel() for *_, idx in batch]
        taus = [(starts[i] - base, states[i]) for _, i, _ in batch if "tau" in states[i]]
        sizes = [st["tau_idx"].numel() for _, st in taus]
        host = torch.tensor([*offsets, *ks, *(o for o, _ in taus), *sizes])
        o_k, n_k, o_t, n_t = rng.to_device(host, delta.device).split(
            [len(offsets), len(ks), len(taus), len(sizes)]
        )
        at = torch.cat([idx for *_, idx in batch])  # [K] kept entries, sorted, into delta
        at += torch.repeat_interleave(o_k, n_k, output_size=sum(ks))
        kept = gather(delta, at)  # [K]
        tau = {}
        if taus:
            tau_idx = torch.cat([st["tau_idx"] for _, st in taus])
            tau_idx += torch.repeat_interleave(o_t, n_t, output_size=sum(sizes))
            tau = {"tau": torch.cat([st["tau"] for _, st in taus]), "tau_idx": tau_idx}
        tau_k = tau_at(tau, at, delta.numel(), like=kept)  # [K]
        update = onties_update(tau_k, kept, alpha, self.weighted_sign).sub_(tau_k, alpha=alpha)
        for (j, _, idx), vals in zip(batch, update.split(ks), strict=True):
            out[j] = (idx, vals)
        return out

    def _scratch(self, what: str, size: int, device: torch.device) -> Tensor:
        """A float32 buffer [size] kept between steps (a fresh one would page-fault on the host
        every step); not optimizer state, never saved."""
        buf = self._buffers.get((what, device))
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.float32, device=device)
            self._buffers[(what, device)] = buf
        return buf[:size]

    def _masks(
        self, group: Mapping[str, Any], params: list[Tensor], states: list[dict]
    ) -> tuple[Tensor, Tensor, list[int]] | None:
        """This step's OnDARE masks for every parameter of the group, drawn in one batch of
        kernels (`rng.hash_sparse_keep_many`: the same masks as one call per parameter):
        (idx, valid) of all of them end to end, and the draws per parameter to split them by.
        None when masks are drawn per merge instead (merge_every > 1, a single device only)."""
        reserve_p = group["reserve_p"]
        if self.mode != "ondare" or self.merge_every > 1 or reserve_p >= 1.0:
            return None
        if not one_device(params):
            return None
        t = group[DRAW_STEP]
        keys = [mask_key(self.seed, self._names[p], "delta", str(t)) for p in params]
        numels = [p.numel() for p in params]
        return rng.hash_sparse_keep_many(numels, reserve_p, keys, device=params[0].device)

    def _round_keys(self, p: Tensor, t: int) -> tuple[int, int, int] | None:
        """Stochastic-rounding keys of p's updates at draw step t (the group's DRAW_STEP):
        (tau push, Delta, weight decay); None when p's updates are rounded to nearest."""
        if not (self.stochastic_rounding and p.dtype in LOW_PRECISION):
            return None
        name = self._names[p]
        return tuple(
            mask_key(self.seed, name, "round", str(t), w) for w in ("tau", "delta", "decay")
        )

    @torch.no_grad()
    def flush(self) -> bool:
        """Merge the updates accumulated since the last merge (merge_every > 1) now, as a merge
        step would (sparsified, one alpha * tau push, the summed weight decay). Call it at the
        end of training; the parameters are otherwise missing the last step % K steps. True when
        something was pending. A later step starts a new accumulation. Raises RunError when a
        step's update held NaN or inf and was not reported yet (on accelerators a step reports
        late: see `_check_finite`)."""
        self._raise_nonfinite(wait=True)  # every step's updates were finite
        flushed = False
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if self.merge_every > 1 and self._pending(state):
                    if p in self._shards:
                        optim_shard.merge_pending(self, group, p, state, self._shards[p])
                    else:
                        self._merge_pending(group, p, state)
                    flushed = True
        return flushed

    def _pending(self, state: Mapping[str, Any]) -> int:
        """Steps accumulated in the buffer and not merged yet."""
        if "acc" not in state:
            return 0
        return int(state.get("acc_steps", state["step"] % self.merge_every))  # (older states)

    def _state(self, p: Tensor) -> dict[str, Any]:
        if p.grad is not None and p.grad.is_sparse:
            raise UsageError("OnlineMergingAdamW does not support sparse gradients.")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            # float32 whatever p's dtype: in bf16, 0.999 * v rounds back to v and v never decays
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if self.merge_every > 1:
                state["acc"] = torch.zeros_like(p, dtype=torch.float32)
                state["decay_acc"] = 0.0
                state["acc_steps"] = 0
        return state

    @staticmethod
    def _update_moments(group: Mapping[str, Any], params: list[Tensor], states: list[dict]) -> None:
        """m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2 (in place, all parameters at once).

        The moments are float32: low-precision gradients are cast first. On the host each one
        is cast into one reused buffer, one tensor at a time (a fresh float32 copy of every
        gradient costs page faults there: measured 3-5x slower on 100M bf16 parameters);
        accelerators cast them all and run the multi-tensor kernels (their caching allocator
        reuses the memory)."""
        b1, b2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in params if p.grad is not None]  # params all have one
        if any(g.dtype != torch.float32 for g in grads) and grads[0].device.type == "cpu":
            buf = torch.empty(max(g.numel() for g in grads), dtype=torch.float32)
            for g, m, v in zip(grads, exp_avgs, exp_avg_sqs, strict=True):
                g32 = buf[: g.numel()].view(g.shape).copy_(g)
                m.lerp_(g32, 1.0 - b1)
                v.mul_(b2).addcmul_(g32, g32, value=1.0 - b2)
            return
        grads = [g.float() for g in grads]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)

    def _step_param(
        self,
        group: Mapping[str, Any],
        p: Tensor,
        state: dict[str, Any],
        mask: tuple[Tensor, Tensor] | None = None,
        delta: Tensor | None = None,
        sparse: tuple[Tensor, Tensor] | None = None,
    ) -> Merge | None:
        """This step's merge of p (`_merge_of`), to apply; None when the update was accumulated
        instead (merge_every > 1: a cycle's last step merges here). delta: Delta over every
        entry [numel] float32, or None to compute it from the moments where needed. These may
        come computed for many parameters at once: OnDARE's mask (idx, valid); sparse, the
        update after the tau push (idx, vals)."""
        t, lr, eps = state["step"], group["lr"], group["eps"]
        b1, b2 = group["betas"]
        step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        decay = lr * group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if delta is None:
            delta_at = partial(adam_delta, m, v, step_size=step_size, eps=eps)
            magnitude = partial(adam_magnitude, m, v, step_size, eps)
        else:  # Delta is at hand: select on it directly (the candidate scan takes |.| itself)
            delta_at, magnitude = partial(gather, delta), None
        if self.merge_every == 1:
            return self._merge_of(group, p, state, delta_at, decay, magnitude, mask, sparse)
        state["acc"].view(-1).add_(delta_at(None))
        state["decay_acc"] += decay
        state["acc_steps"] = self._pending(state) + 1
        if t % self.merge_every == 0:
            self._merge_pending(group, p, state)
        return None

    def _merge_pending(self, group: Mapping[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        acc = state["acc"].view(-1)
        self._apply(
            group, [self._merge_of(group, p, state, partial(gather, acc), state["decay_acc"])]
        )
        acc.zero_()
        state["decay_acc"], state["acc_steps"] = 0.0, 0

    def _merge_of(
        self,
        group: Mapping[str, Any],
        p: Tensor,
        state: dict[str, Any],
        delta_at: Callable[[Tensor | None], Tensor],
        decay: float,
        magnitude: Callable[[], Tensor] | None = None,
        mask: tuple[Tensor, Tensor] | None = None,
        sparse: tuple[Tensor, Tensor] | None = None,
    ) -> Merge:
        """The OnDARE / OnTIES merge of the update delta_at gives (at flat indices) into p at
        the group's draw step (masks and rounding bits are keyed on it), with weight decay, as a
        `Merge` to apply."""
        t = group[DRAW_STEP]
        rounds = self._round_keys(p, t)
        reserve_p, alpha = group["reserve_p"], group["alpha"]
        if sparse is not None:  # computed for the whole chunk
            return Merge(p, state, *sparse, True, rounds, decay)
        if self.mode == "ondare":
            idx, valid = mask if mask is not None else self._draw(p, t, reserve_p)
            vals = ondare_drop(delta_at, idx, valid, reserve_p, alpha, self.rescale)
            return Merge(p, state, idx, vals, True, rounds, decay)
        weighted = self.weighted_sign
        idx, vals = onties_sparse(p.numel(), state, delta_at, reserve_p, alpha, weighted, magnitude)
        return Merge(p, state, idx, vals, idx is not None, rounds, decay)

    def _apply(self, group: Mapping[str, Any], merges: list[Merge]) -> None:
        """Apply the merges of many parameters, in the order each parameter needs: weight decay
        (when before the update), every alpha * tau push, every sparse add, weight decay (when
        after). The pushes are cast in one batch (`tau_pushes`), and the rounded sparse adds of
        each phase run as one batch (`add_many_`) with bits drawn at once (`_rounding`)."""
        pushes = tau_pushes([m.state if m.push else {} for m in merges], group["alpha"])
        rounds = self._rounding(merges, pushes)  # per merge: (tau, vals, decay) or None
        decays = [(m, r and r[2]) for m, r in zip(merges, rounds, strict=True) if m.decay]
        if not self.decay_after_update:
            for m, rnd in decays:
                self._decay(m.p, m.decay, rnd)
        flats = [m.p.view(-1) for m in merges]
        add_many_(
            [
                (f, *pushed, r and r[0])
                for f, pushed, r in zip(flats, pushes, rounds, strict=True)
                if pushed is not None
            ]
        )
        add_many_(
            [(f, m.idx, m.vals, r and r[1]) for m, f, r in zip(merges, flats, rounds, strict=True)]
        )
        if self.decay_after_update:
            for m, rnd in decays:
                self._decay(m.p, m.decay, rnd)

    def _rounding(
        self, merges: list[Merge], pushes: list[tuple[Tensor | None, Tensor] | None]
    ) -> list[tuple[int | Tensor, ...] | None]:
        """Each merge's stochastic-rounding keys (tau push, vals, decay), or, off the host
        kernels (which draw their own), the random bits themselves: those of every rounded add
        of the merges from one `rng.hash_bits_many`, sized by the adds at hand (~20 integer ops
        for all of them instead of per add)."""
        keys = [m.rounds for m in merges]
        rounded = [j for j, k in enumerate(keys) if k is not None]
        if not rounded or native.usable(merges[rounded[0]].p):
            return keys
        sizes = {}  # (merge, which add) -> entries it touches
        for j in rounded:
            m, pushed = merges[j], pushes[j]
            sizes[j, 0] = 0 if pushed is None else pushed[1].numel()
            sizes[j, 1] = m.vals.numel()
            sizes[j, 2] = m.p.numel() if m.decay else 0
        used = [jw for jw, n in sizes.items() if n]
        if not used:
            return keys
        device = merges[rounded[0]].p.device
        bits = rng.hash_bits_many(
            [sizes[jw] for jw in used], [keys[j][w] for j, w in used], device=device
        )
        drawn = dict(zip(used, bits.split([sizes[jw] for jw in used]), strict=True))
        return [
            None if k is None else tuple(drawn.get((j, w), k[w]) for w in range(3))
            for j, k in enumerate(keys)
        ]

    def _draw(self, p: Tensor, t: int, reserve_p: float) -> tuple[Tensor | None, Tensor | None]:
        """OnDARE's mask of p at draw step t drawn on its own: (idx, valid), or every entry."""
        if reserve_p >= 1.0:
            return None, None
        key = mask_key(self.seed, self._names[p], "delta", str(t))
        return rng.hash_sparse_keep(p.numel(), reserve_p, key, device=p.device)

    def _decay(self, p: Tensor, decay: float, round_key: int | Tensor | None) -> None:
        """p *= 1 - decay; a dense stochastic rounding pass for low-precision parameters
        (round_key given)."""
        if round_key is None:
            if self.decay_after_update:
                p.add_(p, alpha=-decay)
            else:
                p.mul_(1.0 - decay)
            return
        flat = p.view(-1)
        add_at_(flat, None, flat.float().mul_(-decay), round_key)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's, less tau of sharded (FSDP2) parameters: each rank holds its own rows of tau
        as plain tensors of its own length, which `torch.distributed.checkpoint` would take for
        replicated ones and save from one rank. It is rebuilt from the task vectors when the
        optimizer is constructed (a pure function of them, the seed and the names), and
        `load_state_dict` keeps the rebuilt one."""
        sd = super().state_dict()
        if not self._shards:
            return sd
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in enumerate(params):
            if p in self._shards and i in sd["state"]:
                sd["state"][i] = {
                    k: v for k, v in sd["state"][i].items() if k not in optim_shard.TAU_STATE
                }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, keeping each state tensor's own dtype (torch would cast float32
        moments to a bf16 parameter's dtype, and int64 indices to float). State dicts from
        older versions carry per-device generator states ("generators"): masks no longer
        depend on them, so they are ignored (even keys such as "cuda:0" on a CPU-only machine).
        """
        state_dict = {k: v for k, v in state_dict.items() if k != "generators"}
        per_param = {i: dict(s) for i, s in state_dict["state"].items()}
        tensors = {
            i: {k: s.pop(k) for k in list(s) if k != "step" and isinstance(s[k], Tensor)}
            for i, s in per_param.items()
        }
        rebuilt = {  # sharded parameters' tau, built at construction (see state_dict)
            p: {k: v for k, v in st.items() if k in optim_shard.TAU_STATE}
            for p, st in self.state.items()
            if p in self._shards
        }
        super().load_state_dict({**state_dict, "state": per_param})
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(saved_ids, params, strict=True):
            for k, t in tensors.get(i, {}).items():
                dtype = self.tau_dtype if k == "tau" else t.dtype
                dtype = torch.float32 if k in FLOAT32_STATE else dtype
                self.state[p][k] = t.to(device=p.device, dtype=dtype)
        for group in self.param_groups:  # older states keyed the draws on Adam's step count
            if DRAW_STEP not in group:
                steps = [self.state[p].get("step", 0) for p in group["params"] if p in self.state]
                group[DRAW_STEP] = max(steps, default=0)
        for p, tau in rebuilt.items():
            if "tau" not in self.state[p]:
                self.state[p].update(tau)
