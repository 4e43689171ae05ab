"""`OnlineMergingAdamW` on FSDP2 shards: each rank steps the rows of every parameter it holds.

FSDP2 (`torch.distributed.fsdp.fully_shard`) makes every parameter a DTensor split on dim 0:
rank r holds rows [r0, r1), the global flat entries [start, start + n) with start = r0 * row
size (the last ranks may hold fewer rows, or none). Everything the optimizer keeps for such a
parameter is the local shard's: the moments and the merge_every buffer are DTensors like the
parameter, tau (and its indices) covers the local rows only and is read from disk row by row.

A sharded run computes the unsharded run's weights bit for bit:
- OnDARE's masks are the unsharded tensor's (`rng.shard_sparse_keep`, keyed by global flat
  index); the random bits that round an add are those of the entry's position in the whole
  tensor's update (its global flat index for a dense add, its rank among the kept entries for
  a sparse one).
- OnTIES' top-k is exact over the whole tensor (`selection.top_magnitude_indices_sharded`: summed
  radix-select histograms, ties by global index), never a gather of |Delta|.
The per-parameter work mirrors `OnlineMergingAdamW._merge_of` and `_apply` (same formulas,
same order of operations); the batched multi-parameter kernels of the unsharded path are not
used here (one parameter at a time, a few collectives each for OnTIES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..errors import MismatchError, UsageError
from ..merge import rng, selection
from . import optim as om

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch.distributed import ProcessGroup

    from .optim import OnlineMergingAdamW


# a sharded parameter's tau state: rebuilt at construction, never saved (`state_dict`)
TAU_STATE = ("tau", "tau_idx", "tau_pos")


@dataclass(frozen=True)
class FlatShard:
    """This rank's part of a parameter sharded on dim 0: global flat entries [start, start +
    local) of numel, rows [row0, row0 + rows), its ranks' process group."""

    numel: int
    start: int
    local: int
    row0: int
    rows: int
    group: ProcessGroup


def flat_shard(p: Tensor, name: str) -> FlatShard | None:
    """The `FlatShard` of a DTensor parameter, None for a plain tensor."""
    if not isinstance(p, DTensor):
        return None
    if p.device_mesh.ndim != 1 or list(p.placements) != [Shard(0)] or p.dim() == 0:
        raise UsageError(
            f"OnlineMergingAdamW: parameter '{name}' is a DTensor with placements "
            f"{list(p.placements)} on a {p.device_mesh.ndim}-D mesh; only dim-0 sharding on a "
            "1-D mesh (FSDP2 fully_shard) is supported."
        )
    local_shape, offset = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements
    )
    row = math.prod(p.shape[1:])
    rows = local_shape[0]
    return FlatShard(
        p.numel(), offset[0] * row, rows * row, offset[0], rows, p.device_mesh.get_group(0)
    )


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares its storage), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def align_shard_rows(tau: Tensor, shape: torch.Size, name: str) -> Tensor:
    """tau's rows of a shard shaped like the local shard: rows past tau's end (a resized
    embedding, or a shard past it) are 0."""
    if tau.dim() != len(shape) or tau.shape[1:] != shape[1:]:
        raise MismatchError(
            f"task vector '{name}' has rows of shape {list(tau.shape[1:])} but the parameter "
            f"has {list(shape[1:])}; only the number of rows (a resized embedding) may differ."
        )
    if tau.shape[0] == shape[0]:
        return tau
    out = tau.new_zeros(shape)
    out[: tau.shape[0]] = tau
    return out


def init_tau(
    opt: OnlineMergingAdamW,
    name: str,
    p: Tensor,
    shard: FlatShard,
    tau_rows: Tensor,
    group: Mapping[str, Any],
) -> None:
    """`OnlineMergingAdamW._init_tau` for this rank's rows of tau: the same entries as the
    unsharded tau holds there, stored sparse or dense as the unsharded one is; "tau_pos" is the
    position of the first local entry among the whole tensor's stored entries."""
    lp = local(p)
    tau = align_shard_rows(tau_rows, lp.shape, name).to(device=lp.device, dtype=torch.float32)
    flat, reserve_p = tau.reshape(-1), group["reserve_p"]
    idx, pos, count = None, shard.start, shard.numel
    if opt.mode == "ondare" and reserve_p < 1.0:
        key = om.mask_key(opt.seed, name, "tau")
        idx, pos, count = rng.shard_sparse_keep(
            shard.numel, reserve_p, key, shard.start, shard.local, device=lp.device
        )
        val = flat[idx] / reserve_p if opt.rescale else flat[idx]
    elif opt.mode == "onties" and reserve_p < 1.0 and reserve_p * shard.numel >= 1:
        if opt.tau_l1_rescale:
            raise UsageError(
                "OnlineMergingAdamW option 'tau_l1_rescale': not supported on sharded (FSDP2) "
                f"parameters such as '{name}'; run without it."
            )
        count = int(reserve_p * shard.numel)
        idx, pos = selection.top_magnitude_indices_sharded(flat, count, shard.start, shard.group)
        val = flat[idx]
    else:
        val = flat
    val = om.clip(val, opt.clip_val)
    state = opt.state[p]
    if idx is not None and count >= om.SPARSE_BELOW * shard.numel:  # stored dense (`compact`)
        dense = val.new_zeros(shard.local)
        dense[idx] = val
        idx, val = None, dense
    state["tau"] = val.to(opt.tau_dtype)
    if idx is not None:
        state["tau_idx"], state["tau_pos"] = idx, pos


def adam_delta_(group: Mapping[str, Any], p: Tensor, state: dict[str, Any]) -> Tensor:
    """Update the local moments with the local gradient; the local Adam update Delta [n] float32,
    computed as the unsharded path computes it on this device (`fused_adam_deltas_` where
    torch's fused kernel runs, else the multi-tensor moments and `adam_delta`)."""
    t, lr, eps, (b1, b2) = state["step"], group["lr"], group["eps"], group["betas"]
    m, v = local(state["exp_avg"]).view(-1), local(state["exp_avg_sq"]).view(-1)
    g32 = local(p.grad).reshape(-1).float()
    if p.device.type in om.FUSED_ADAM_DEVICES:
        delta = torch.zeros_like(g32)
        if g32.numel():
            om.fused_adam_deltas_([delta], [g32], [m], [v], [t], lr, (b1, b2), eps)
        return delta
    m.lerp_(g32, 1.0 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1.0 - b2)
    step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    return om.adam_delta(m, v, None, step_size, eps)


def step_param(
    opt: OnlineMergingAdamW, group: Mapping[str, Any], p: Tensor, state: dict, shard: FlatShard
) -> None:
    """One step of a sharded parameter (`OnlineMergingAdamW._step_param`): merged now, or
    accumulated when merge_every > 1 (a cycle's last step merges)."""
    delta = adam_delta_(group, p, state)
    decay = group["lr"] * group["weight_decay"]
    if opt.merge_every == 1:
        merge(opt, group, p, state, shard, delta, decay)
        return
    local(state["acc"]).view(-1).add_(delta)
    state["decay_acc"] += decay
    state["acc_steps"] = opt._pending(state) + 1
    if state["step"] % opt.merge_every == 0:
        merge_pending(opt, group, p, state, shard)


def merge_pending(
    opt: OnlineMergingAdamW, group: Mapping[str, Any], p: Tensor, state: dict, shard: FlatShard
) -> None:
    """Merge the accumulated local update (`OnlineMergingAdamW._merge_pending`)."""
    acc = local(state["acc"]).view(-1)
    merge(opt, group, p, state, shard, acc, state["decay_acc"])
    acc.zero_()
    state["decay_acc"], state["acc_steps"] = 0.0, 0


def merge(
    opt: OnlineMergingAdamW,
    group: Mapping[str, Any],
    p: Tensor,
    state: dict[str, Any],
    shard: FlatShard,
    delta: Tensor,
    decay: float,
) -> None:
    """The OnDARE / OnTIES merge of the local update delta [n] into the local rows of p
    (`OnlineMergingAdamW._merge_of`, then `_apply`)."""
    reserve_p, alpha, n = group["reserve_p"], group["alpha"], shard.local
    idx, pos, push = None, shard.start, True
    if opt.mode == "ondare":
        if reserve_p < 1.0:
            key = om.mask_key(opt.seed, opt._names[p], "delta", str(group[om.DRAW_STEP]))
            idx, pos, _ = rng.shard_sparse_keep(
                shard.numel, reserve_p, key, shard.start, n, device=delta.device
            )
        vals = om.ondare_drop(partial(om.gather, delta), idx, None, reserve_p, alpha, opt.rescale)
    elif reserve_p >= 1.0 or reserve_p * shard.numel < 1:  # OnTIES keeping every entry
        tau = om.tau_at(state, None, n, like=delta)
        vals, push = om.onties_update(tau, delta, alpha, opt.weighted_sign), False
    else:
        k = int(reserve_p * shard.numel)
        idx, pos = selection.top_magnitude_indices_sharded(delta, k, shard.start, shard.group)
        kept = om.gather(delta, idx)  # [k local]
        tau = om.tau_at(state, idx, n, like=kept)
        vals = om.onties_update(tau, kept, alpha, opt.weighted_sign).sub_(tau, alpha=alpha)
    apply(opt, group, p, state, shard, (idx, vals, pos, push), decay)


def apply(
    opt: OnlineMergingAdamW,
    group: Mapping[str, Any],
    p: Tensor,
    state: Mapping[str, Any],
    shard: FlatShard,
    update: tuple[Tensor | None, Tensor, int, bool],
    decay: float,
) -> None:
    """`OnlineMergingAdamW._apply` on the local rows: weight decay (before or after), the
    alpha * tau push, the sparse add; each rounded add draws the bits of its global positions.
    update: (local indices or None for every entry, values, global position of the first, push)."""
    idx, vals, pos, push = update
    flat = local(p).view(-1)
    rounds = opt._round_keys(p, group[om.DRAW_STEP])  # (tau push, Delta, decay) keys, or None
    if decay and not opt.decay_after_update:
        decay_(opt, flat, decay, rounds and rounds[2], shard.start)
    alpha = group["alpha"]
    if push and alpha != 0.0 and state.get("tau") is not None:
        tau_idx = state.get("tau_idx")
        at = shard.start if tau_idx is None else state["tau_pos"]
        add_(flat, tau_idx, state["tau"].float().mul_(alpha), rounds and rounds[0], at)
    add_(flat, idx, vals, rounds and rounds[1], pos)
    if decay and opt.decay_after_update:
        decay_(opt, flat, decay, rounds and rounds[2], shard.start)


def add_(flat: Tensor, idx: Tensor | None, val: Tensor, key: int | None, first: int) -> None:
    """`optim.add_at_` whose rounding bits are those of positions first .. first + len(val) - 1
    of the whole tensor's add."""
    bits = None
    if key is not None and flat.dtype in om.LOW_PRECISION:
        bits = rng.hash_bits(val.numel(), key, offset=first, device=flat.device)
    om.add_at_(flat, idx, val, bits)


def decay_(
    opt: OnlineMergingAdamW, flat: Tensor, decay: float, key: int | None, start: int
) -> None:
    """`OnlineMergingAdamW._decay` on the local rows (start: their first global flat index)."""
    if key is None:  # rounded to nearest: no position is involved, the unsharded decay serves
        opt._decay(flat, decay, None)
        return
    add_(flat, None, flat.float().mul_(-decay), key, start)
