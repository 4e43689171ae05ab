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
reserve_p = 0.01) as flat indices + values, about 0.1 byte per parameter. Sparse updates are
computed only at the kept entries: a fresh OnDARE mask is drawn as geometric gaps
(`core.random_indices`), so a step costs about the Adam moment update alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import MismatchError, UsageError
from ..merge import core
from .taskvec import TaskVectorSource, find_task_vector

Mode = Literal["ondare", "onties"]
SignOn = Literal["unweighted", "weighted"]
Missing = Literal["zero", "error"]

# tau is stored as (int64 flat index, value) pairs when fewer than this fraction of its entries are
# kept: 10 bytes per kept entry against 2 bytes per entry (bf16) dense.
SPARSE_BELOW = 0.2


# -- pure helpers on flattened tensors -------------------------------------------------------
# A "sparse flat" tensor is (idx, val): val[i] sits at flat index idx[i]; idx None means dense.


def gather(flat: Tensor, idx: Tensor | None) -> Tensor:
    """flat[idx] (a copy), or flat itself when idx is None."""
    return flat if idx is None else flat[idx]


def top_indices(flat: Tensor, density: float) -> Tensor | None:
    """Sorted flat indices of the top int(density * numel) |x| (TIES); None keeps everything.

    A tensor too small to keep a single entry (density * numel < 1) is kept dense, as the
    released code does for tau: otherwise small tensors (norms, biases) would never train.
    """
    if density >= 1.0 or density * flat.numel() < 1:
        return None
    return core.top_magnitude_indices(flat, int(density * flat.numel()))


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


def ondare_tau(
    tau: Tensor, reserve_p: float, rescale: bool, clip_val: float | None, seed: int, name: str
) -> tuple[Tensor | None, Tensor]:
    """OnDARE init: one Bernoulli(reserve_p) mask for the run (seeded by name), x 1/p, clamped."""
    flat = tau.reshape(-1)
    if reserve_p >= 1.0:
        idx, val = None, flat
    else:
        keep = core.bernoulli_mask(tau.shape, reserve_p, seed, "tau", name, device=tau.device)
        idx = keep.reshape(-1).nonzero().squeeze(1)
        val = flat[idx] / reserve_p if rescale else flat[idx]
    if clip_val is not None:
        val = val.clamp(-clip_val, clip_val)
    return idx, val


def onties_tau(tau: Tensor, reserve_p: float, l1_rescale: bool) -> tuple[Tensor | None, Tensor]:
    """OnTIES init: keep the top reserve_p fraction of |tau| (optionally L1-rescaled)."""
    flat = tau.reshape(-1)
    idx = top_indices(flat, reserve_p)
    if idx is None:
        return None, flat
    val = flat[idx]
    return idx, core.l1_rescale(flat, val) if l1_rescale else val


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
    # both sorted: locate each wanted index among the stored ones
    pos = torch.searchsorted(tau_idx, idx).clamp_(max=tau_idx.numel() - 1)
    hit = tau_idx[pos] == idx
    return torch.where(hit, tau[pos].to(like.dtype), 0.0)


def add_tau_(flat: Tensor, state: Mapping[str, Any], alpha: float) -> None:
    """flat += alpha * tau (dense add, or index_add at the stored entries)."""
    tau, tau_idx = state.get("tau"), state.get("tau_idx")
    if tau is None or alpha == 0.0:
        return
    if tau_idx is None:
        flat.add_(tau, alpha=alpha)
    else:
        flat.index_add_(0, tau_idx, tau.to(flat.dtype), alpha=alpha)


def adam_delta(m: Tensor, v: Tensor, idx: Tensor | None, step_size: float, eps: float) -> Tensor:
    """HF-style AdamW update -step_size * m / (sqrt(v) + eps), flattened, at idx (all if None)."""
    m, v = gather(m.reshape(-1), idx), gather(v.reshape(-1), idx)
    denom = v.sqrt().add_(eps)
    return torch.div(m, denom, out=denom).mul_(-step_size)


def ondare_merge_(
    flat: Tensor,
    state: Mapping[str, Any],
    delta_at: Callable[[Tensor | None], Tensor],
    reserve_p: float,
    alpha: float,
    rescale: bool,
    generator: torch.Generator,
) -> None:
    """p += alpha * tau + (1 - alpha) * drop(Delta), with a fresh drop mask."""
    idx = None if reserve_p >= 1.0 else core.random_indices(flat.numel(), reserve_p, generator)
    delta = delta_at(idx)  # [len(idx)] or [numel]
    if idx is not None and rescale:
        delta = delta.div_(reserve_p)
    add_tau_(flat, state, alpha)
    if idx is None:
        flat.add_(delta, alpha=1.0 - alpha)
    else:
        flat.index_add_(0, idx, delta, alpha=1.0 - alpha)


def onties_merge_(
    flat: Tensor,
    state: Mapping[str, Any],
    delta_at: Callable[[Tensor | None], Tensor],
    reserve_p: float,
    alpha: float,
    weighted_sign: bool,
) -> None:
    """p += alpha * tau * [tau agrees] + (1 - alpha) * topk(Delta) * [Delta agrees].

    Off the kept entries of Delta the elected sign is tau's own, so tau always agrees there:
    those entries get plain alpha * tau and the election runs on the kept entries only.
    """
    dense = delta_at(None)  # [numel]
    idx = top_indices(dense, reserve_p)
    delta = gather(dense, idx)  # [k]
    tau = tau_at(state, idx, flat.numel(), like=delta)  # [k]
    if weighted_sign:
        sign = core.elect_sign(torch.stack([tau * alpha, delta * (1.0 - alpha)]))
    else:
        sign = core.elect_sign(torch.stack([tau, delta]))
    kept_tau = torch.where(core.agrees_with(tau, sign), tau, 0.0)
    kept_delta = torch.where(core.agrees_with(delta, sign), delta, 0.0)
    update = kept_tau.mul_(alpha).add_(kept_delta, alpha=1.0 - alpha)  # [k]
    if idx is None:
        flat.add_(update)
        return
    before = flat[idx]
    add_tau_(flat, state, alpha)  # every stored tau entry; the kept ones are rewritten next
    flat.index_copy_(0, idx, before.add_(update))


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
    _check(0.0 < p <= 1.0, "reserve_p", f"must be in (0, 1], got {p}.")
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
    on a fixed reserve_p fraction of the weights, independent of the learning rate.

    merge_every=K: Adam runs every step but its updates accumulate in a float buffer and the
    parameters stay put; every K-th step the accumulated update is sparsified and merged (and
    tau pushed, once per K steps). Weight decay is applied at the merge with the summed rate
    sum(lr_t * weight_decay) of the K steps. K = 1 is the ordinary per-step optimizer.
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
        super().__init__(named_params, defaults)
        self.mode, self.rescale, self.weighted_sign = mode, rescale, sign_on == "weighted"
        self.clip_val, self.tau_l1_rescale, self.merge_every = clip_val, tau_l1_rescale, merge_every
        self.decay_after_update, self.tau_dtype, self.seed = decay_after_update, tau_dtype, seed
        self._generators: dict[str, torch.Generator] = {}
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
                tau = None if task_vectors is None else find_task_vector(task_vectors, name)
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

    def _init_tau(self, name: str, p: Tensor, tau: Tensor, group: Mapping[str, Any]) -> None:
        tau = align_rows(tau, p.shape, name).to(device=p.device, dtype=torch.float32)
        if self.mode == "ondare":
            idx, val = ondare_tau(
                tau, group["reserve_p"], self.rescale, self.clip_val, self.seed, name
            )
        else:
            idx, val = onties_tau(tau, group["reserve_p"], self.tau_l1_rescale)
        idx, val = compact(idx, val, p.numel())
        self.state[p]["tau"] = val.to(self.tau_dtype)
        if idx is not None:
            self.state[p]["tau_idx"] = idx

    def _generator(self, device: torch.device) -> torch.Generator:
        """The per-device generator of the fresh per-step masks (saved in state_dict)."""
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(core.tensor_seed(self.seed, "delta-masks", key))
            self._generators[key] = gen
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            self._update_moments(group, params, states)
            for p, state in zip(params, states, strict=True):
                self._step_param(group, p, state)
        return loss

    def _state(self, p: Tensor) -> dict[str, Any]:
        if p.grad is not None and p.grad.is_sparse:
            raise UsageError("OnlineMergingAdamW does not support sparse gradients.")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if self.merge_every > 1:
                state["acc"] = torch.zeros_like(p)
                state["decay_acc"] = 0.0
        return state

    @staticmethod
    def _update_moments(group: Mapping[str, Any], params: list[Tensor], states: list[dict]) -> None:
        """m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2 (in place, all parameters at once)."""
        b1, b2 = group["betas"]
        grads = [p.grad for p in params if p.grad is not None]  # params all have one
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)

    def _step_param(self, group: Mapping[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        state["step"] += 1
        t, lr, eps = state["step"], group["lr"], group["eps"]
        b1, b2 = group["betas"]
        step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        decay = lr * group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        delta_at: Callable[[Tensor | None], Tensor]  # the update to merge, at flat indices
        if self.merge_every > 1:
            acc = state["acc"].view(-1)
            acc.add_(adam_delta(m, v, None, step_size, eps))
            state["decay_acc"] += decay
            if t % self.merge_every:
                return
            decay, state["decay_acc"] = state["decay_acc"], 0.0
            delta_at = partial(gather, acc)
        else:
            delta_at = partial(adam_delta, m, v, step_size=step_size, eps=eps)

        flat = p.view(-1)
        if decay and not self.decay_after_update:
            p.mul_(1.0 - decay)
        if self.mode == "ondare":
            gen = self._generator(p.device)
            ondare_merge_(
                flat, state, delta_at, group["reserve_p"], group["alpha"], self.rescale, gen
            )
        else:
            onties_merge_(
                flat, state, delta_at, group["reserve_p"], group["alpha"], self.weighted_sign
            )
        if decay and self.decay_after_update:
            p.add_(p, alpha=-decay)
        if self.merge_every > 1:
            state["acc"].zero_()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (moments, steps, tau, buffers) + the mask generators' states."""
        sd = super().state_dict()
        sd["generators"] = {key: g.get_state() for key, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        # torch casts every state tensor to its parameter's dtype on load, int64 indices included:
        # take tau out and put it back unchanged
        per_param = {i: dict(s) for i, s in state_dict["state"].items()}
        taus = {
            i: {k: s.pop(k) for k in ("tau", "tau_idx") if k in s} for i, s in per_param.items()
        }
        super().load_state_dict({**state_dict, "state": per_param})
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(saved_ids, params, strict=True):
            saved = taus.get(i, {})
            if "tau" in saved:
                self.state[p]["tau"] = saved["tau"].to(device=p.device, dtype=self.tau_dtype)
            if "tau_idx" in saved:
                self.state[p]["tau_idx"] = saved["tau_idx"].to(device=p.device)
        self._generators = {}
        for key, gen_state in generators.items():
            self._generator(torch.device(key)).set_state(gen_state)
