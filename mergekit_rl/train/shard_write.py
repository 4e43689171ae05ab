"""Write the final model from FSDP2 shards, one gathered tensor at a time.

Under FSDP2 (`fully_shard`) every parameter is a DTensor split on dim 0. Gathering the whole
state dict on one rank before writing needs the full model in that rank's memory on top of its
shard. Instead every rank walks the same state, in the output's storage order, and for each
tensor joins one `DTensor.full_tensor()` (an all-gather); the writing rank hands the gathered
tensor to its sink (cast, check, append to the atomic `CheckpointWriter`) and drops it before
the next gather. Peak memory beyond a rank's shard: one full tensor (plus its cast copy).

A failure on the writing rank (a NaN, a full disk, an existing output) must not leave the other
ranks waiting in the next gather: after opening the output, after each tensor and after the
commit every rank joins one all-reduce of a failure flag, and all of them stop together (the
writing rank with its own error, the others with a RunError that points at it).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..errors import RunError

Take = Callable[[str, Tensor], None]  # (name, the whole tensor) -> written
Sink = Callable[[], AbstractContextManager[Take]]  # opens the output, commits on a clean exit


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2's `fully_shard`)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


# module names that wrappers insert into state dict names (torch.compile's; activation
# checkpointing's and FSDP1's, where their own hooks do not strip them): not checkpoint names
WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def checkpoint_name(name: str) -> str:
    """A state dict name without the wrappers' module names (what an unwrapped model calls it)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def sharded_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with its DTensors as they are (nothing gathered), in state dict
    order, named as the unwrapped model names them; a name whose tensor is an earlier name's
    (tied embeddings) is dropped, as `run.unique_tensors` drops it for a gathered state.
    Identity, not storage, decides: an empty local shard has no storage to compare, and every
    rank must keep the same names."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[checkpoint_name(name)] = t
    return out


def _flag_device(state: Mapping[str, Tensor]) -> torch.device:
    """Where the failure flag lives: the device type of the shards' mesh (NCCL needs a CUDA
    tensor, even when the parameters are offloaded to the CPU; gloo a CPU one)."""
    for t in state.values():
        if isinstance(t, DTensor):
            return torch.device(t.device_mesh.device_type)
    return torch.device("cpu")


def _agree(error: BaseException | None, device: torch.device, what: str) -> None:
    """All ranks learn whether any failed at `what`; each then raises (its own error if it has
    one) or goes on."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RunError(
            f"the process writing the final model failed while {what} (its own error says why). No "
            "final model was written."
        )


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as e:  # handed to _agree: every rank must reach the same collective
        return None, e


@torch.no_grad()
def stream_full_tensors(state: Mapping[str, Tensor], sink: Sink | None) -> None:
    """Gather `state` tensor by tensor (in its order) and hand each whole tensor to `sink`'s
    taker on the rank that passes a sink (one rank; the others pass None and only join the
    gathers). Every rank calls this with the same names in the same order.

    A DTensor is gathered with `full_tensor()` (a collective of its mesh); a plain tensor (a
    buffer, replicated) is taken as it is. The gathered tensor is released before the next
    gather, so a rank never holds two."""
    device = _flag_device(state)
    stack = contextlib.ExitStack()
    take, error = _attempt(lambda: stack.enter_context(sink()) if sink else None)
    try:
        _agree(error, device, "opening the output")
        for name, t in state.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t  # [global shape]
            error = None
            if take is not None:
                _, error = _attempt(partial(take, name, full))
            del full  # before the next gather: one whole tensor at a time
            _agree(error, device, f"writing tensor '{name}'")
    except BaseException:
        stack.__exit__(*sys.exc_info())  # the writer aborts: nothing appears at the output
        raise
    _, error = _attempt(stack.close)  # the writer commits (renames into place)
    _agree(error, device, "committing the output")
