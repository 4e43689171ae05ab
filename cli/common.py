"""Options shared by several commands (declared once) and output helpers."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mergekit_rl.engine import RunOptions, RunSummary, parse_dtype
from mergekit_rl.errors import UsageError
from mergekit_rl.io.writer import DEFAULT_MAX_SHARD
from mergekit_rl.ops import WriteOptions

Output = Annotated[
    Path, typer.Option("--output", "-o", help="Output directory (or a .safetensors file).")
]
Device = Annotated[str, typer.Option(help="Where the math runs: cpu, cuda or cuda:N.")]
Dtype = Annotated[
    str | None,
    typer.Option(help="Output dtype: bfloat16, float16 or float32 (default: the inputs' dtype)."),
]
MaxShardSize = Annotated[
    str, typer.Option(help="Largest output shard, in bytes or with a unit (5GB, 500MB).")
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary.")]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Accept .bin/.pt checkpoints (loaded with weights_only=True)."
    ),
]

err_console = Console(stderr=True)
console = Console()

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-shard-size '{text}' is not a size: use bytes or 5GB / 500MB.")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise UsageError("--max-shard-size must be positive.")
    return size


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"{option} '{text}' must be comma-separated numbers, like 0.5,0.5."
        ) from None


def command_line() -> str:
    return shlex.join(["rlmerge", *sys.argv[1:]])


def write_options(
    device: str = "cpu",
    dtype: str | None = None,
    max_shard_size: str = str(DEFAULT_MAX_SHARD),
    force: bool = False,
    quiet: bool = False,
    as_json: bool = False,
    allow_pickle: bool = False,
) -> WriteOptions:
    progress = "none" if quiet or as_json else "auto"
    run = RunOptions(
        device=device, max_shard_size=parse_size(max_shard_size), force=force, progress=progress
    )
    return WriteOptions(
        run=run, dtype=parse_dtype(dtype), allow_pickle=allow_pickle, command=command_line()
    )


def report(summary: RunSummary, quiet: bool, as_json: bool) -> None:
    if as_json:
        print_json(summary.to_dict())
    elif not quiet:
        outs = ", ".join(summary.outputs)
        err_console.print(
            f"[green]wrote[/green] {outs}: {summary.tensors} tensors, "
            f"{summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.2f}s "
            f"(peak RSS {summary.peak_rss_mb:.0f} MB)"
        )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
