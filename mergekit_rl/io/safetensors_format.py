"""The safetensors file format, read and planned by hand.

Layout: 8-byte little-endian header length N, N bytes of JSON header (name -> {dtype, shape,
data_offsets}, plus an optional "__metadata__" string map), then the raw little-endian data.
We read tensors with plain positional reads (no mmap), so resident memory stays at one tensor
however large the file is.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in `file` (-1 for pickle checkpoints)
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse a safetensors header: tensors in storage order, and the __metadata__ map.

    The file is untrusted: every length, shape and offset is checked against the file size
    before anything is allocated from it, and every problem is a UsageError naming the file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER, size - 8):
                raise _bad(
                    path,
                    f"the header length {n} is past the end of the file ({size} bytes)"
                    if n <= MAX_HEADER
                    else f"the header length {n} is implausible (over {MAX_HEADER} bytes)",
                )
            raw = f.read(n)
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e}).") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"the header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - n
    infos = [_tensor_info(path, name, h, 8 + n, data_size) for name, h in header.items()]
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    last: TensorInfo | None = None  # sorted by start: each tensor begins after the one before
    for cur in (t for t in infos if t.nbytes):
        if last is not None and last.offset + last.nbytes > cur.offset:
            raise _bad(path, f"tensors '{last.name[:100]}' and '{cur.name[:100]}' overlap")
        last = cur
    return infos, metadata


def _bad(path: Path, why: str) -> UsageError:
    return UsageError(f"{path}: not a valid safetensors file: {why}.")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the name '{dup[:100]}' appears twice")
    return out


def _tensor_info(path: Path, name: str, h: object, base: int, data_size: int) -> TensorInfo:
    """One header entry, checked: known dtype, non-negative int shape, offsets that lie in the
    data section and span exactly numel * element size bytes."""
    where = f"tensor '{name[:100]}'"
    if not isinstance(h, dict):
        raise _bad(path, f"{where} is not a JSON object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UsageError(f"{path}: {where} has unsupported dtype {str(dtype)[:40]}.")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"{where} has shape {str(shape)[:80]}, not a list of sizes >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= data_size
    ):
        raise _bad(
            path,
            f"{where} has data_offsets {str(offsets)[:80]}, outside the {data_size}-byte data",
        )
    start, end = offsets
    want = _nbytes_upto(shape, DTYPES[dtype], data_size)
    if want != end - start:
        raise _bad(
            path,
            f"{where} ({dtype}, shape {str(shape)[:80]}) needs "
            f"{'more than ' + str(data_size) if want < 0 else want} bytes, but its "
            f"data_offsets span {end - start}",
        )
    return TensorInfo(name, tuple(shape), DTYPES[dtype], path, base + start, end - start)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _nbytes_upto(shape: list[int], dtype: torch.dtype, limit: int) -> int:
    """numel * element size, or -1 as soon as it exceeds `limit` (no huge products)."""
    if 0 in shape:
        return 0
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
        if n > limit:
            return -1
    return n


def build_header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]
) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in this order.

    The JSON is padded with spaces so the data starts 8-byte aligned, as safetensors expects.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def read_rows(
    info: TensorInfo, start: int, stop: int, pin: bool = False, out: Tensor | None = None
) -> Tensor:
    """Rows start .. stop - 1 (along dim 0) of a stored tensor, read with positional reads.

    Rows are contiguous in the file (row-major), so this is one read of (stop - start) rows:
    a large tensor can be streamed in row blocks without ever holding it whole. `pin`: read
    into page-locked memory, so that a copy to CUDA can be asynchronous. `out`: a contiguous
    host tensor of the rows' shape and dtype to read into (a run's pooled buffer, whose pages
    are already faulted in), returned; else a new one.
    """
    if info.offset < 0 or not info.shape:
        raise ValueError(f"tensor '{info.name}' cannot be read in rows")
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0  # a [0, ...] tensor: none
    shape = (stop - start, *info.shape[1:])
    if out is None:  # not zero-filled: overwritten
        out = torch.empty(shape, dtype=info.dtype, pin_memory=pin)
    elif out.dtype != info.dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"tensor '{info.name}': the read buffer is not {info.dtype} {shape}")
    _pread_into(info, out.reshape(-1).view(torch.uint8), info.offset + start * row_bytes)
    return out


def _pread_into(info: TensorInfo, buf: Tensor, offset: int) -> None:
    """Fill the contiguous uint8 host tensor buf from info.file at offset (positional reads:
    pread may return short reads for huge tensors)."""
    if buf.numel() == 0:
        return
    view, got = memoryview(buf.numpy()), 0
    fd = os.open(info.file, os.O_RDONLY)
    try:
        while got < buf.numel():
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise UsageError(f"{info.file}: truncated while reading tensor '{info.name}'.")
            got += n
    finally:
        os.close(fd)
