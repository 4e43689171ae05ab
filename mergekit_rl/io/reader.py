"""Read checkpoints one tensor at a time.

`open_checkpoint(ref)` lists every tensor's name, shape and dtype from the headers without
loading data; `Checkpoint.read(name)` loads one tensor with a positional read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from ..errors import MismatchError, UsageError
from .adapter import LoraAdapter, load_adapter
from .reference import ModelSource, natural_key, resolve
from .safetensors_format import DTYPES, TensorInfo, read_header, read_rows

# (output embedding, input embedding) as transformers names them in *ForCausalLM checkpoints,
# by config model_type; checked against each class's `_tied_weights_keys` in
# tests/io/test_reader.py. Any other model_type gets the Llama-family default, and an input
# embedding stored under another name is found by its suffix (`_find_input_embedding`).
TIED_BY_MODEL_TYPE: dict[str, tuple[str, str]] = {
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
    "gpt_bigcode": ("lm_head.weight", "transformer.wte.weight"),
    "gptj": ("lm_head.weight", "transformer.wte.weight"),
    "codegen": ("lm_head.weight", "transformer.wte.weight"),
    "bloom": ("lm_head.weight", "transformer.word_embeddings.weight"),
    "falcon": ("lm_head.weight", "transformer.word_embeddings.weight"),
    "opt": ("lm_head.weight", "model.decoder.embed_tokens.weight"),
}
TIED_PAIR = ("lm_head.weight", "model.embed_tokens.weight")  # the Llama-family default
_INPUT_EMBED_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
TIED_METADATA_KEY = "rlmerge_tied_embeddings"  # safetensors metadata: '["out", "in"]'
# float8 tensors are checked in float32 copies of this many entries (64 MB) at a time
UPCAST_CHUNK = 1 << 24


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
                if source.remote_headers is not None:  # a dry run on a hub id: no files
                    _, header, meta = source.remote_headers[i]
                    infos = _remote_infos(path, header)
                else:
                    infos, meta = read_header(path)
                if i == 0:
                    self.metadata = meta
                for info in infos:
                    if info.name in self._infos:
                        raise UsageError(f"{path}: tensor '{info.name}' appears in two shards.")
                    self._infos[info.name] = info
        self.adapter = load_adapter(self)
        if self.adapter is not None and self.adapter.unties:
            self._untie()

    # -- listing ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): sequential reads. An
        output embedding that an adapter untied comes last (as transformers saves it)."""
        names = list(self._infos)
        if self._untied and self.shared_pair is not None:
            names.append(self.shared_pair[0])
        return names

    def info(self, name: str) -> TensorInfo:
        """Where `name` is stored. The unstored output embedding of a tied pair is served by
        the input one: under the input's name while tied (one matrix), under its own once an
        adapter untied them (two matrices that start equal)."""
        pair = self.shared_pair
        if pair is not None and name == pair[0]:
            stored = self._infos[pair[1]]
            return dataclasses.replace(stored, name=name) if self._untied else stored
        try:
            return self._infos[name]
        except KeyError:
            raise UsageError(f"{self.source.ref}: no tensor named '{name}'.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos or (
            self._untied and self.shared_pair is not None and name == self.shared_pair[0]
        )

    _untied = False  # an adapter's modules_to_save copy split a tied pair (see _untie)

    @functools.cached_property
    def shared_pair(self) -> tuple[str, str] | None:
        """(output, input) embedding names when the output one is not stored and its values
        are the input one's, as the headers and config.json say (before any adapter)."""
        return tied_pair(self.config, self._infos, self.metadata)

    @property
    def tied_pair(self) -> tuple[str, str] | None:
        """(output, input) embedding names when the output one is tied and not stored: one
        matrix serves both (None once an adapter untied them)."""
        return None if self._untied else self.shared_pair

    def has(self, name: str) -> bool:
        """True when `name` can be read: stored, or the tied output embedding."""
        return name in self or (self.shared_pair is not None and name == self.shared_pair[0])

    def _untie(self) -> None:
        """An adapter saved its own copy of one of a tied pair (modules_to_save: [lm_head]):
        peft's merge_and_unload() leaves two matrices then, and so do we. The output stores
        both and its config says `tie_word_embeddings: false`, else transformers would tie
        them again on load and drop the copy."""
        self.shared_pair  # noqa: B018 - computed from the config that still ties them
        self._untied = True
        if self.config is not None:
            self.config = {**self.config, "tie_word_embeddings": False}
            if isinstance(self.config.get("text_config"), dict):
                text = {**self.config["text_config"], "tie_word_embeddings": False}
                self.config["text_config"] = text

    @property
    def tied_embeddings(self) -> bool:
        """True when the output embedding (lm_head) is tied to the input one and not stored."""
        return self.tied_pair is not None

    @property
    def tied_output_name(self) -> str | None:
        """The name of the tied, unstored output embedding (e.g. 'lm_head.weight'), if any."""
        return self.tied_pair[0] if self.tied_pair else None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # -- reading ---------------------------------------------------------------------------
    def read(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        out: Tensor | None = None,
    ) -> Tensor:
        """Load one tensor (cast to `dtype` on `device` when given), the adapter merged in.
        `out`: a contiguous host tensor of the stored shape and dtype to read into (a run's
        pooled buffer), unused for pickles; an adapter's merge still returns a new tensor."""
        info = self.info(name)
        if self.source.pickle:
            t = self._pickled[self._stored_name(name)]
        else:
            t = self._read_raw(info, out)
        if self.adapter is not None:
            t = self.adapter.apply(info.name, t)
        return t.to(device=device, dtype=dtype or t.dtype)

    def read_rows(
        self, name: str, start: int, stop: int, pin: bool = False, out: Tensor | None = None
    ) -> Tensor:
        """Rows start .. stop - 1 (dim 0) of one tensor, the adapter merged in: equal to
        read(name)[start:stop] without holding the whole tensor. `pin`: read into page-locked
        memory (for asynchronous copies to CUDA). `out`: a buffer of the rows' shape and
        stored dtype to read into (see `read`). Safetensors only (not pickles)."""
        info = self.info(name)
        t = read_rows(info, start, stop, pin=pin, out=out)
        if self.adapter is not None:
            t = self.adapter.apply(info.name, t, rows=(start, stop))
        return t

    def _stored_name(self, name: str) -> str:
        pair = self.shared_pair
        return pair[1] if pair is not None and name == pair[0] else name

    def _read_raw(self, info: TensorInfo, out: Tensor | None = None) -> Tensor:
        if self.source.remote_headers is not None:
            raise UsageError(
                f"{self.source.ref}: only the headers were fetched (a dry run); cannot read "
                f"tensor '{info.name}'."
            )
        if out is None:  # torch.empty, not bytearray: about to be overwritten, no zero-filling
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
            raise ValueError(
                f"tensor '{info.name}': the read buffer is not {info.dtype} {info.shape}"
            )
        if info.nbytes == 0:
            return out
        fd = self._files.get(info.file)
        if fd is None:
            fd = self._files[info.file] = os.open(info.file, os.O_RDONLY)
        buf = out.reshape(-1).view(torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < info.nbytes:  # pread may return short reads for huge tensors
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if n == 0:
                raise UsageError(f"{info.file}: truncated while reading tensor '{info.name}'.")
            got += n
        return out

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


def tied_pair(
    config: dict[str, Any] | None, infos: dict[str, TensorInfo], metadata: dict[str, str]
) -> tuple[str, str] | None:
    """(output embedding, input embedding) names when the output embedding is tied and not
    stored, else None.

    With a config.json: its `tie_word_embeddings` (transformers' default, True, when the key is
    absent), the names from the config's model_type. Without one (a bare .safetensors file, e.g.
    a task vector): the pair recorded in the metadata at extract time, else tied when no
    'lm_head.weight' is stored beside an input embedding.
    """
    if config is None and TIED_METADATA_KEY in metadata:
        try:
            out, inp = json.loads(metadata[TIED_METADATA_KEY])
        except (ValueError, TypeError):
            out, inp = TIED_PAIR  # unreadable metadata: fall back to the names below
        if out not in infos and inp in infos:
            return str(out), str(inp)
    if config is not None and not _config_ties(config):
        return None
    model_type = str((config or {}).get("model_type", ""))
    out, inp = TIED_BY_MODEL_TYPE.get(model_type, TIED_PAIR)
    if out in infos:
        return None  # stored: untied, or tied but saved twice
    if inp not in infos:
        found = _find_input_embedding(infos)
        if found is None:
            return None  # no input embedding either: a headless model or a partial file
        inp = found
    return out, inp


def _config_ties(config: dict[str, Any]) -> bool:
    """tie_word_embeddings from config.json, or from its text_config (multimodal configs)."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return True  # transformers' PretrainedConfig default


def _find_input_embedding(infos: dict[str, TensorInfo]) -> str | None:
    """The one 2-D tensor named like an input embedding (shortest name if several)."""
    found = [n for n, i in infos.items() if n.endswith(_INPUT_EMBED_SUFFIXES) and len(i.shape) == 2]
    return min(found, key=len) if found else None


def open_checkpoint(ref: str | Path, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint(resolve(ref, allow_pickle=allow_pickle))


def _remote_infos(path: Path, header: dict[str, Any]) -> list[TensorInfo]:
    """TensorInfos of a header fetched from the hub (offsets relative to the data start:
    enough to plan, nothing is read from them)."""
    infos = []
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise UsageError(f"{path}: tensor '{name}' has unsupported dtype {h['dtype']}.")
        start, end = h["data_offsets"]
        infos.append(
            TensorInfo(name, tuple(h["shape"]), DTYPES[h["dtype"]], path, start, end - start)
        )
    return sorted(infos, key=lambda t: t.offset)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON ({e}).") from e
    return data if isinstance(data, dict) else None


def vocab_tensor_names(ckpt: Checkpoint) -> tuple[str, ...]:
    """The tensors with one row per token: the input embedding and the output one (lm_head),
    named from the tied pair of the config's model_type (stored or tied)."""
    model_type = str((ckpt.config or {}).get("model_type", ""))
    out, inp = ckpt.tied_pair or TIED_BY_MODEL_TYPE.get(model_type, TIED_PAIR)
    if inp not in ckpt:
        inp = _find_input_embedding(ckpt._infos) or inp
    return tuple(n for n in (inp, out) if ckpt.has(n))


def check_compatible(
    checkpoints: list[Checkpoint], max_listed: int = 5, vocab_rows: Collection[str] = ()
) -> list[str]:
    """Check that all inputs hold the same tensor names and shapes; return the common names.

    Tensors named in `vocab_rows` may differ in their first dimension (a union vocabulary).

    A tied-embedding checkpoint without lm_head.weight matches a twin that stores it. The order
    returned is the first checkpoint's storage order. Raises MismatchError with, for each other
    input, how many tensors only one side has and how many shared ones differ in shape (the
    real totals), listing the first `max_listed` of each kind.
    """
    first = checkpoints[0]
    names = first.names()
    problems: list[str] = []
    for other in checkpoints[1:]:
        problems += _differences(first, other, max_listed, vocab_rows)
    if problems:
        raise MismatchError(
            f"the input models do not have the same tensors: {'; '.join(problems)}. All inputs "
            "must share one architecture and vocabulary."
        )
    if any(not c.tied_embeddings for c in checkpoints) and first.tied_pair:
        names = names + [first.tied_pair[0]]  # an untied twin stores lm_head: the output does too
    return names


def _differences(
    first: Checkpoint, other: Checkpoint, max_listed: int, vocab_rows: Collection[str] = ()
) -> list[str]:
    """One entry per kind of difference between two inputs (only in one, only in the other,
    other shapes): its real count and its first `max_listed` tensors. Tensors in `vocab_rows`
    may differ in their rows (a union vocabulary)."""
    a, b = first.source.ref, other.source.ref
    mine, theirs = set(first.names()), set(other.names())
    if first.tied_pair and not other.tied_embeddings:
        mine.add(first.tied_pair[0])
    if other.tied_pair and not first.tied_embeddings:
        theirs.add(other.tied_pair[0])
    out = []
    for only, where in (
        (mine - theirs, f"in {a} but not in {b}"),
        (theirs - mine, f"in {b} but not in {a}"),
    ):
        if only:
            quoted = [f"'{n}'" for n in sorted(only, key=natural_key)]
            are = "tensor is" if len(only) == 1 else "tensors are"
            out.append(f"{len(only)} {are} {where}: {_first(quoted, max_listed)}")
    shared = sorted(mine & theirs, key=natural_key)
    shapes = [
        _shape_problem(n, first.info(n).shape, other.info(n).shape, a, b)
        for n in shared
        if _shape_key(first, n, vocab_rows) != _shape_key(other, n, vocab_rows)
    ]
    if shapes:
        out.append(
            f"{len(shapes)} of their {len(shared)} common tensors differ in shape: "
            f"{_first(shapes, max_listed)}"
        )
    return out


def _shape_key(ckpt: Checkpoint, name: str, vocab_rows: Collection[str]) -> tuple[int, ...]:
    """The shape two inputs must share: without the rows for a union's vocabulary tensors."""
    shape = tuple(ckpt.info(name).shape)
    return shape[1:] if name in vocab_rows else shape


def _shape_problem(name: str, x: tuple[int, ...], y: tuple[int, ...], a: str, b: str) -> str:
    # an embedding that differs only in its rows: another vocabulary, not another width
    vocab = ("embed" in name or "lm_head" in name) and x[1:] == y[1:]
    hint = " (vocabulary sizes differ)" if vocab else ""
    return f"'{name}' has shape {list(x)} in {a} but {list(y)} in {b}{hint}"


def _first(items: list[str], max_listed: int) -> str:
    more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
    return ", ".join(items[:max_listed]) + more


def all_finite(tensor: Tensor) -> bool:
    """True when a tensor holds no NaN or Inf (integer and empty tensors always do).

    One min/max reduction: NaN propagates into both and an Inf shows as one of them. About 10x
    faster on CPU than `isfinite(t).all()`, which builds a bool tensor (measured in bench/).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no min/max kernels; upcast it a chunk at a time
        return all(all_finite(part.float()) for part in tensor.reshape(-1).split(UPCAST_CHUNK))
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def warn_non_finite(tensor: Tensor, name: str, where: str) -> None:
    if not all_finite(tensor):
        warnings.warn(f"{where}: tensor '{name}' contains NaN or Inf values.", stacklevel=2)
