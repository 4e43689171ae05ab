"""A detector of host synchronisations, for code meant to run on accelerators, tested on the CPU.

On a GPU, an op whose result size or value the host must read (`.item()`, `int(t)`, `nonzero`,
boolean-mask indexing, `repeat_interleave` without output_size, ...) waits for every queued
kernel. On the CPU nothing waits, so such ops go unnoticed; this dispatch mode records them
wherever they run. Ops inside a kernel's own implementation are not seen, which is why the
list below names the ops that sync internally, not only `_local_scalar_dense`.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that read device data on the host whatever their arguments
ALWAYS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), x[t] with a 0-dim t
    "nonzero",  # its size comes from the data (nonzero_static does not sync)
    "masked_select",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "equal",
    "is_nonzero",
    "argwhere",
}


def _bool_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: ...`; then `syncs.found` lists (op, where) of each sync."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = name in ALWAYS
        if name == "repeat_interleave":  # tensor repeats: the output size is read unless given
            repeats = args[1] if len(args) > 1 else args[0]
            syncs = isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_"):  # x[mask] and x[mask] = v
            syncs = _bool_index(args[1])
        if syncs:
            where = "".join(traceback.format_stack(limit=6)[:-1])
            self.found.append((name, where))
        return func(*args, **kwargs)
