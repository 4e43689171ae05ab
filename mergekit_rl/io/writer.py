"""Write checkpoints atomically, one tensor at a time.

Every output tensor's name, shape and dtype is known before any math runs, so the shard layout
and each shard's header are planned up front (`plan_shards`, a pure function); tensors are then
appended in plan order with no per-shard buffer. Everything is written into a temporary
directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import torch
from torch import Tensor

from ..errors import OutputExistsError, RunError
from .reference import ModelSource
from .safetensors_format import build_header, tensor_nbytes

DEFAULT_MAX_SHARD = 5_000_000_000
TMP_MARK = ".rlmerge-tmp-"

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype)


@dataclass(frozen=True)
class Shard:
    filename: str
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(s, d) for _, s, d in self.entries)


def plan_shards(entries: Sequence[Entry], max_shard_size: int = DEFAULT_MAX_SHARD) -> list[Shard]:
    """Greedy split into shards of at most max_shard_size bytes (a bigger tensor gets its own)."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = tensor_nbytes(e[1], e[2])
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    n = len(groups)
    if n == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    return [
        Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)
    ]


def check_output_path(out: Path, inputs: Sequence[ModelSource], force: bool) -> None:
    """Refuse an output that exists (unless force) or that is, contains or is inside an input."""
    out = out.resolve()
    for src in inputs:
        # a bare file protects only itself; a checkpoint directory protects the whole folder
        for p in (f.resolve() for f in (src.weight_files if src.is_file else (src.root,))):
            if out == p or p in out.parents or out in p.parents:
                raise OutputExistsError(
                    f"output '{out}' is, contains or is inside the input '{src.ref}'; writing "
                    "there could destroy the input. Choose another output path."
                )
    if out.exists() and not force:
        raise OutputExistsError(
            f"output '{out}' already exists. Pass --force to replace it, or choose another path."
        )


@dataclass
class _OpenShard:
    shard: Shard
    handle: IO[bytes]
    next_index: int = 0


@dataclass
class CheckpointWriter:
    """Writes a checkpoint directory (or a single .safetensors file) atomically.

    Use as a context manager: `add` every tensor in plan order, `add_file` any extra files, and
    the output is renamed into place on a clean exit; on an exception the temporary directory is
    removed and nothing appears at `out`.
    """

    out: Path
    entries: Sequence[Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    max_shard_size: int = DEFAULT_MAX_SHARD
    single_file: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out).absolute()
        size = float("inf") if self.single_file else self.max_shard_size
        self.shards = plan_shards(self.entries, int(min(size, 2**62)))
        if self.single_file:
            self.shards = [Shard(self.out.name, self.shards[0].entries)]
        self._order = [e for s in self.shards for e in s.entries]
        self._next = 0
        self._open: _OpenShard | None = None
        self._shard_i = 0
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
        self.bytes_written = 0
        self._part_left = 0  # bytes still to come of a tensor written in parts

    def __enter__(self) -> CheckpointWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def add(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor of the plan (names must come in plan order)."""
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RunError(
                f"internal: expected tensor '{want_name}' {list(shape)} {dtype}, got '{name}' "
                f"{list(tensor.shape)} {tensor.dtype}."
            )
        if self._open is None or self._open.next_index == len(self._open.shard.entries):
            self._start_shard()
        assert self._open is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._open.handle.write(data.view(torch.uint8).numpy().data)
        self._open.next_index += 1
        self._next += 1
        self.bytes_written += data.numel() * data.element_size()

    def begin_tensor(self, name: str, dtype: torch.dtype) -> None:
        """Start the next tensor of the plan, to be written in parts (row blocks, in order)
        with `write_part`; it counts as added once all its bytes were written."""
        want_name, shape, want_dtype = self._order[self._next]
        if name != want_name or dtype != want_dtype:
            raise RunError(
                f"internal: expected tensor '{want_name}' {want_dtype}, got '{name}' {dtype}."
            )
        if self._open is None or self._open.next_index == len(self._open.shard.entries):
            self._start_shard()
        self._part_left = tensor_nbytes(shape, dtype)
        if self._part_left == 0:
            self._end_tensor()

    def write_part(self, part: Tensor) -> None:
        """Append the next part of the tensor started by `begin_tensor`."""
        assert self._open is not None
        data = part.detach().to("cpu").contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if data.dtype != self._order[self._next][2] or nbytes > self._part_left:
            raise RunError(f"internal: a part of '{self._order[self._next][0]}' does not fit.")
        if nbytes:
            self._open.handle.write(data.view(torch.uint8).numpy().data)
        self.bytes_written += nbytes
        self._part_left -= nbytes
        if self._part_left == 0:
            self._end_tensor()

    def _end_tensor(self) -> None:
        assert self._open is not None
        self._open.next_index += 1
        self._next += 1

    def _start_shard(self) -> None:
        if self._open is not None:
            self._open.handle.close()
        shard = self.shards[self._shard_i]
        self._shard_i += 1
        handle = open(self.tmp / shard.filename, "wb")  # noqa: SIM115 - closed by _finish/abort
        handle.write(build_header(list(shard.entries), self.metadata))
        self._open = _OpenShard(shard, handle)

    def add_file(self, relpath: str, content: str | bytes) -> None:
        path = self.tmp / relpath
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        shutil.copy2(src, self.tmp / (relpath or src.name))

    def _finish(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            raise RunError(f"internal: output incomplete, tensor '{missing}' was never written.")
        if self._open is not None:
            self._open.handle.close()
        if not self._order:  # a model with no tensors still gets its (empty) file
            (self.tmp / self.shards[0].filename).write_bytes(build_header([], self.metadata))
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {n: s.filename for s in self.shards for n, _, _ in s.entries},
            }
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    def _commit(self) -> None:
        """Rename the finished temporary output into place (replacing an old one if forced)."""
        src = self.tmp / self.out.name if self.single_file else self.tmp
        old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{os.getpid()}"
        if self.out.exists():
            if not self.force:
                raise OutputExistsError(
                    f"output '{self.out}' appeared while running; not replaced."
                )
            os.replace(self.out, old)
        os.replace(src, self.out)
        for leftover in (old, self.tmp):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()

    def abort(self) -> None:
        if self._open is not None:
            self._open.handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()
            return
        try:
            self._finish()
            self._commit()
        except BaseException:
            self.abort()
            raise
