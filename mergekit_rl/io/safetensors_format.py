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
    """Parse a safetensors header: tensors in storage order, and the __metadata__ map."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({e}).") from e
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = []
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise UsageError(f"{path}: tensor '{name}' has unsupported dtype {h['dtype']}.")
        start, end = h["data_offsets"]
        infos.append(
            TensorInfo(name, tuple(h["shape"]), DTYPES[h["dtype"]], path, base + start, end - start)
        )
    infos.sort(key=lambda t: t.offset)
    return infos, metadata


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


def read_rows(info: TensorInfo, start: int, stop: int, pin: bool = False) -> Tensor:
    """Rows start .. stop - 1 (along dim 0) of a stored tensor, read with positional reads.

    Rows are contiguous in the file (row-major), so this is one read of (stop - start) rows:
    a large tensor can be streamed in row blocks without ever holding it whole. `pin`: read
    into page-locked memory, so that a copy to CUDA can be asynchronous.
    """
    if info.offset < 0 or not info.shape:
        raise ValueError(f"tensor '{info.name}' cannot be read in rows")
    row_bytes = info.nbytes // info.shape[0]
    nbytes = (stop - start) * row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)  # not zero-filled: overwritten
    view, got = memoryview(buf.numpy()), 0
    fd = os.open(info.file, os.O_RDONLY)
    try:
        while got < nbytes:  # pread may return short reads
            n = os.preadv(fd, [view[got:]], info.offset + start * row_bytes + got)
            if n == 0:
                raise UsageError(f"{info.file}: truncated while reading tensor '{info.name}'.")
            got += n
    finally:
        os.close(fd)
    return buf.view(info.dtype).reshape(stop - start, *info.shape[1:])
