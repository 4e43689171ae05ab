"""The safetensors header reader on hostile files: targeted cases, then hypothesis fuzzing.

Every file either parses into tensors whose bytes lie inside the file (and read back), or
raises UsageError naming the file (exit 2 in the CLI): never another exception, a hang, or an
allocation sized by an unchecked length. RLMERGE_FUZZ_EXAMPLES sets the cases per test
(bench/faults.py runs more).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.errors import UsageError
from mergekit_rl.io.reader import open_checkpoint
from mergekit_rl.io.safetensors_format import DTYPES, read_header

EXAMPLES = int(os.environ.get("RLMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CASES = {
    "shorter than 8 bytes": b"\x01\x02",
    "header length past EOF": safetensors_bytes({"a": entry()}, bytes(8), length=10_000),
    "absurd header length": struct.pack("<Q", 2**63) + b"{}",
    "invalid JSON": safetensors_bytes(b"{'a': 1", bytes(8)),
    "not UTF-8": safetensors_bytes(b'{"\xff\xfe": 1}'),
    "a JSON list": safetensors_bytes([1, 2, 3]),
    "deeply nested JSON": safetensors_bytes(b"[" * 100_000 + b"]" * 100_000),
    "entry not an object": safetensors_bytes({"a": 5}),
    "unknown dtype": safetensors_bytes({"a": entry(dtype="F4")}, bytes(8)),
    "dtype not a string": safetensors_bytes({"a": entry(dtype=["F32"])}, bytes(8)),
    "negative shape": safetensors_bytes({"a": entry(shape=(-2,), offsets=(0, 8))}, bytes(8)),
    "bool in shape": safetensors_bytes({"a": entry(shape=(True, 2))}, bytes(8)),
    "overflowing shape": safetensors_bytes({"a": entry(shape=(2**62, 2**62, 4))}, bytes(8)),
    "shape and offsets disagree": safetensors_bytes({"a": entry(shape=(3,))}, bytes(12)),
    "offsets past the data": safetensors_bytes({"a": entry(shape=(2**30,), offsets=(0, 2**32))}),
    "negative offset": safetensors_bytes({"a": entry(offsets=(-8, 0))}, bytes(8)),
    "reversed offsets": safetensors_bytes({"a": entry(offsets=(8, 0))}, bytes(16)),
    "three offsets": safetensors_bytes({"a": entry(offsets=(0, 8, 16))}, bytes(16)),
    "overlapping tensors": safetensors_bytes(
        {"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(offsets=(8, 16))}, bytes(16)
    ),
    "overlap behind an empty tensor": safetensors_bytes(
        {
            "a": entry(shape=(4,), offsets=(0, 16)),
            "e": entry(shape=(0,), offsets=(4, 4)),
            "b": entry(shape=(1,), offsets=(8, 12)),
        },
        bytes(16),
    ),
    "duplicate names": safetensors_bytes(
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
        bytes(16),
    ),
    "metadata not strings": safetensors_bytes({"__metadata__": {"k": 1}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_headers_are_usage_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CASES[case])
    with pytest.raises(UsageError) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_cli_exit_2_on_a_hostile_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CASES["offsets past the data"])
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2 and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def check_file(path: Path, blob: bytes) -> None:
    """The property: parsed tensors lie inside the file and read back, or a UsageError."""
    path.write_bytes(blob)
    try:
        infos, _ = read_header(path)
    except UsageError as e:
        assert str(path) in str(e)
        return
    size = len(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    end = 8 + n
    for info in sorted(infos, key=lambda i: i.offset):
        elem = torch.empty((), dtype=info.dtype).element_size()
        assert info.nbytes == info.numel * elem
        assert 8 + n <= info.offset and info.offset + info.nbytes <= size
        if info.nbytes:
            assert info.offset >= end
            end = info.offset + info.nbytes
    with open_checkpoint(path) as ckpt:  # what the header promised can be read
        for info in infos:
            assert tuple(ckpt.read(info.name).shape) == info.shape


DTYPE_NAMES = st.sampled_from([*DTYPES, "F4", "f32", "", "BF16 "]) | st.integers() | st.none()
SIZES = st.integers(0, 8) | st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=3)
OFFSETS = st.lists(SIZES, min_size=0, max_size=3) | SIZES


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Mostly well-formed headers with a few fields broken, and data of a random length."""
    n = draw(st.integers(0, 4))
    header: dict[str, object] = {}
    offset = 0
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(list(DTYPES)))
        nbytes = (
            int(torch.tensor(shape, dtype=torch.int64).prod())
            * torch.empty((), dtype=DTYPES[dtype]).element_size()
        )
        e: dict[str, object] = {"dtype": dtype, "shape": shape}
        e["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
        broken = draw(st.sampled_from(["", "", "dtype", "shape", "data_offsets", "drop", "shift"]))
        if broken in ("dtype",):
            e["dtype"] = draw(DTYPE_NAMES)
        elif broken == "shape":
            e["shape"] = draw(st.lists(SIZES, max_size=4) | SIZES)
        elif broken == "data_offsets":
            e["data_offsets"] = draw(OFFSETS)
        elif broken == "drop":
            e.pop(draw(st.sampled_from(sorted(e))))
        elif broken == "shift":
            d = draw(st.integers(-16, 16))
            e["data_offsets"] = [offset - nbytes + d, offset + d]
        header[draw(st.sampled_from([f"t{i}", "t0", "__metadata__"]))] = e
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
    raw = json.dumps(header).encode()
    data = bytes(max(0, offset + draw(st.integers(-8, 8))))
    length = draw(st.sampled_from([None, None, None, 0, len(raw) + 1, 2**64 - 1]))
    return safetensors_bytes(raw, data, length=length)


@FUZZ
@given(blob=headers())
def test_fuzz_structured_headers(tmp_path: Path, blob: bytes) -> None:
    check_file(tmp_path / "f.safetensors", blob)


@FUZZ
@given(blob=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path: Path, blob: bytes) -> None:
    check_file(tmp_path / "f.safetensors", blob)


@FUZZ
@given(raw=st.binary(max_size=120), length=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_fuzz_random_header_text(tmp_path: Path, raw: bytes, length: int, tail: bytes) -> None:
    check_file(tmp_path / "f.safetensors", struct.pack("<Q", length) + raw + tail)
