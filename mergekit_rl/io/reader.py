"""Read checkpoints one tensor at a time.

`open_checkpoint(ref)` lists every tensor's name, shape and dtype from the headers without
loading data; `Checkpoint.read(name)` loads one tensor with a positional read.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from ..errors import MismatchError, UsageError
from .adapter import LoraAdapter, load_adapter
from .reference import ModelSource, natural_key, resolve
from .safetensors_format import TensorInfo, read_header

TIED_PAIR = ("lm_head.weight", "model.embed_tokens.weight")


class Checkpoint:
    """A model's tensors, listed from headers, read one by one."""

    adapter: LoraAdapter | None = None  # BASE+ADAPTER: merged in by read() (io/adapter.py)

    def __init__(self, source: ModelSource):
        self.source = source
        self.config: dict[str, Any] | None = _read_json(source.root / "config.json")
        if source.is_file:
            self.config = None
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._files: dict[Path, Any] = {}
        self._pickled: dict[str, Tensor] = {}
        if source.pickle:
            self._load_pickles()
        else:
            for i, path in enumerate(source.weight_files):
                infos, meta = read_header(path)
                if i == 0:
                    self.metadata = meta
                for info in infos:
                    if info.name in self._infos:
                        raise UsageError(f"{path}: tensor '{info.name}' appears in two shards.")
                    self._infos[info.name] = info
        self.adapter = load_adapter(self)

    # -- listing ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): sequential reads."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name == TIED_PAIR[0] and name not in self._infos and self.tied_embeddings:
            name = TIED_PAIR[1]  # a tied lm_head is served by the input embedding
        try:
            return self._infos[name]
        except KeyError:
            raise UsageError(f"{self.source.ref}: no tensor named '{name}'.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    @property
    def tied_embeddings(self) -> bool:
        """True when lm_head is tied to the input embedding and not stored."""
        cfg = self.config or {}
        return bool(cfg.get("tie_word_embeddings", False)) and TIED_PAIR[0] not in self._infos

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # -- reading ---------------------------------------------------------------------------
    def read(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Load one tensor (cast to `dtype` on `device` when given)."""
        info = self.info(name)
        t = self._pickled[info.name] if self.source.pickle else self._read_raw(info)
        if self.adapter is not None:
            t = self.adapter.apply(info.name, t)
        return t.to(device=device, dtype=dtype or t.dtype)

    def _read_raw(self, info: TensorInfo) -> Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        fd = self._files.get(info.file)
        if fd is None:
            fd = self._files[info.file] = os.open(info.file, os.O_RDONLY)
        # torch.empty, not bytearray: the buffer is about to be overwritten, so skip zero-filling
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < info.nbytes:  # pread may return short reads for huge tensors
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if n == 0:
                raise UsageError(f"{info.file}: truncated while reading tensor '{info.name}'.")
            got += n
        return buf.view(info.dtype).reshape(info.shape)

    def _load_pickles(self) -> None:
        for path in self.source.weight_files:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, t in sd.items():
                self._pickled[name] = t
                self._infos[name] = TensorInfo(
                    name, tuple(t.shape), t.dtype, path, -1, t.numel() * t.element_size()
                )

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source.display!r}, {len(self._infos)} tensors)"


def open_checkpoint(ref: str | Path, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint(resolve(ref, allow_pickle=allow_pickle))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON ({e}).") from e
    return data if isinstance(data, dict) else None


def check_compatible(checkpoints: list[Checkpoint], max_listed: int = 5) -> list[str]:
    """Check that all inputs hold the same tensor names and shapes; return the common names.

    A tied-embedding checkpoint without lm_head.weight matches a twin that stores it. The order
    returned is the first checkpoint's storage order. Raises MismatchError listing the first
    offending tensors.
    """
    first = checkpoints[0]
    names = first.names()
    problems: list[str] = []
    for other in checkpoints[1:]:
        mine, theirs = set(names), set(other.names())
        if first.tied_embeddings and not other.tied_embeddings:
            mine.add(TIED_PAIR[0])
        if other.tied_embeddings and not first.tied_embeddings:
            theirs.add(TIED_PAIR[0])
        for n in sorted(mine - theirs, key=natural_key)[:max_listed]:
            problems.append(f"'{n}' is in {first.source.ref} but not in {other.source.ref}")
        for n in sorted(theirs - mine, key=natural_key)[:max_listed]:
            problems.append(f"'{n}' is in {other.source.ref} but not in {first.source.ref}")
        for n in names:
            if n in other and other.info(n).shape != first.info(n).shape:
                a, b = first.info(n).shape, other.info(n).shape
                hint = " (vocabulary sizes differ)" if "embed" in n or "lm_head" in n else ""
                problems.append(
                    f"'{n}' has shape {list(a)} in {first.source.ref} but {list(b)} in "
                    f"{other.source.ref}{hint}"
                )
                if len(problems) >= max_listed:
                    break
    if problems:
        listed = "; ".join(problems[:max_listed])
        more = f" (and {len(problems) - max_listed} more)" if len(problems) > max_listed else ""
        raise MismatchError(
            f"the input models do not have the same tensors: {listed}{more}. All inputs must "
            "share one architecture and vocabulary."
        )
    if any(not c.tied_embeddings for c in checkpoints) and first.tied_embeddings:
        names = names + [TIED_PAIR[0]]  # an untied twin stores lm_head: the output does too
    return names


def all_finite(tensor: Tensor) -> bool:
    """True when a tensor holds no NaN or Inf (integer and empty tensors always do).

    One min/max reduction: NaN propagates into both and an Inf shows as one of them. About 10x
    faster on CPU than `isfinite(t).all()`, which builds a bool tensor (measured in bench/).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def warn_non_finite(tensor: Tensor, name: str, where: str) -> None:
    if not all_finite(tensor):
        warnings.warn(f"{where}: tensor '{name}' contains NaN or Inf values.", stacklevel=2)
