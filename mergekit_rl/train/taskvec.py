"""Task vectors for the online merging optimizers, streamed from disk one tensor at a time.

tau = theta_SFT - theta_base, per tensor, computed in float32 and stored in a compact dtype
(bf16 by default). The optimizer asks for one tensor at a time through `TaskVectorSource.get`,
so a lazy source never holds more than one float32 tensor of each checkpoint in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Protocol

import torch
from torch import Tensor
from typing_extensions import Self

from ..errors import MismatchError
from ..io.reader import Checkpoint, open_checkpoint
from ..merge import blend


class TaskVectorSource(Protocol):
    """Anything that gives tau for a parameter name, or None when it has no counterpart.

    A plain `dict[str, Tensor]` qualifies (its `get`), and so do the lazy readers below.
    """

    def get(self, name: str) -> Tensor | None: ...


def has_tensor(ckpt: Checkpoint, name: str) -> bool:
    """True when ckpt holds name (a tied lm_head counts: the input embedding serves it)."""
    return name in ckpt or (name == "lm_head.weight" and ckpt.tied_embeddings)


def name_candidates(name: str) -> list[str]:
    """name, then name without its leading components ("module.x.w" -> "x.w" -> "w").

    Wrappers (DDP's "module.", PEFT's "base_model.model.") prefix parameter names; the checkpoint
    stores the bare names. The first candidate a source holds is the parameter's counterpart.
    """
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def find_task_vector(source: TaskVectorSource, name: str) -> Tensor | None:
    """tau for a parameter name, matching wrapper-prefixed names (see `name_candidates`)."""
    for candidate in name_candidates(name):
        tau = source.get(candidate)
        if tau is not None:
            return tau
    return None


def find_task_vector_rows(
    source: TaskVectorSource, name: str, start: int, stop: int
) -> Tensor | None:
    """Rows start .. stop - 1 (dim 0) of `find_task_vector(source, name)`, fewer where tau has
    fewer rows (a resized embedding); a rank of a sharded run reads only its own rows. Lazy
    sources read just those rows (`get_rows`); a mapping holds every tensor already."""
    get_rows = getattr(source, "get_rows", None)
    for candidate in name_candidates(name):
        if get_rows is not None:
            tau = get_rows(candidate, start, stop)
        else:
            tau = source.get(candidate)
            tau = None if tau is None else tau[start:stop]
        if tau is not None:
            return tau
    return None


def read_checkpoint_rows(ckpt: Checkpoint, name: str, start: int, stop: int) -> Tensor:
    """Rows start .. stop - 1 of a tensor (clipped to its rows) as float32, through
    `Checkpoint.read_rows` (positional reads of those rows alone, a LoRA adapter merged in as
    a whole read would); pickles and 0-dim tensors are read whole and sliced."""
    info = ckpt.info(name)
    stop = max(start, min(stop, info.shape[0] if info.shape else 0))
    if ckpt.source.pickle or not info.shape or ckpt.source.remote_headers is not None:
        return ckpt.read(name, dtype=torch.float32)[start:stop]
    return ckpt.read_rows(name, start, stop).to(torch.float32)


class _Closing:
    """`with source:` closes the checkpoints a lazy source holds open."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CheckpointTaskVectors(_Closing):
    """Lazy tau = sft - base, read from two checkpoints when asked for (one tensor at a time)."""

    def __init__(
        self,
        base_ref: str,
        sft_ref: str,
        dtype: torch.dtype = torch.bfloat16,
        allow_pickle: bool = False,
    ):
        self.dtype = dtype
        self.base = open_checkpoint(base_ref, allow_pickle=allow_pickle)
        try:
            self.sft = open_checkpoint(sft_ref, allow_pickle=allow_pickle)
        except BaseException:
            self.base.close()
            raise

    def get(self, name: str) -> Tensor | None:
        if not (has_tensor(self.base, name) and has_tensor(self.sft, name)):
            return None
        self._check_shapes(name)
        sft = self.sft.read(name, dtype=torch.float32)
        base = self.base.read(name, dtype=torch.float32)
        return blend.weighted_sum([sft, base], [1.0, -1.0]).to(self.dtype)

    def _check_shapes(self, name: str) -> None:
        base_shape = tuple(self.base.info(name).shape)
        sft_shape = tuple(self.sft.info(name).shape)
        if base_shape != sft_shape:
            raise MismatchError(
                f"tensor '{name}' has shape {list(base_shape)} in the base model "
                f"({self.base.source.ref}) but {list(sft_shape)} in the SFT model "
                f"({self.sft.source.ref}); a task vector needs the two to match."
            )

    def get_rows(self, name: str, start: int, stop: int) -> Tensor | None:
        """Rows start .. stop - 1 of `get(name)`, reading only those rows of both checkpoints."""
        if not (has_tensor(self.base, name) and has_tensor(self.sft, name)):
            return None
        self._check_shapes(name)
        sft = read_checkpoint_rows(self.sft, name, start, stop)
        base = read_checkpoint_rows(self.base, name, start, stop)
        return blend.weighted_sum([sft, base], [1.0, -1.0]).to(self.dtype)

    def close(self) -> None:
        self.base.close()
        self.sft.close()


class TaskVectorFile(_Closing):
    """Lazy tau read from a task-vector file (a checkpoint whose tensors are tau)."""

    def __init__(
        self, tv_ref: str, dtype: torch.dtype = torch.bfloat16, allow_pickle: bool = False
    ):
        self.dtype = dtype
        self.ckpt = open_checkpoint(tv_ref, allow_pickle=allow_pickle)

    def get(self, name: str) -> Tensor | None:
        if not has_tensor(self.ckpt, name):
            return None
        return self.ckpt.read(name, dtype=self.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor | None:
        """Rows start .. stop - 1 of `get(name)`, reading only those rows."""
        if not has_tensor(self.ckpt, name):
            return None
        return read_checkpoint_rows(self.ckpt, name, start, stop).to(self.dtype)

    def close(self) -> None:
        self.ckpt.close()


def _collect(source: TaskVectorSource, names: Iterable[str]) -> dict[str, Tensor]:
    out = {}
    for name in names:
        tau = source.get(name)
        if tau is not None:
            out[name] = tau
    return out


def task_vectors_from_checkpoints(
    base_ref: str, sft_ref: str, names: Iterable[str], dtype: torch.dtype = torch.bfloat16
) -> dict[str, Tensor]:
    """tau = sft - base for each of `names` present in both checkpoints (others are left out)."""
    with CheckpointTaskVectors(base_ref, sft_ref, dtype) as source:
        return _collect(source, names)


def task_vectors_from_file(
    tv_ref: str, names: Iterable[str], dtype: torch.dtype = torch.bfloat16
) -> dict[str, Tensor]:
    """tau read from a task-vector file for each of `names` it holds (others are left out)."""
    with TaskVectorFile(tv_ref, dtype) as source:
        return _collect(source, names)
