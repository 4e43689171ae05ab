"""Options shared by several commands (declared once) and output helpers.

Output contract (docs/cli.md): messages go to stderr, results to stdout. With --json, stdout
holds exactly one JSON object, the envelope `json_envelope` builds (success) or
`json_error` builds (failure), checked against JSON_SCHEMA in the tests. Without a terminal
(a pipe, a file, CI), output is plain: no colour, no wrapping at 80 columns, no truncation.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mergekit_rl.engine import RunOptions, RunSummary, parse_dtype
from mergekit_rl.errors import UsageError
from mergekit_rl.io.writer import DEFAULT_MAX_SHARD
from mergekit_rl.io.writer import parse_size as size_in_bytes
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
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout (docs/cli.md).")
]
TokenizerSource = Annotated[
    str | None,
    typer.Option(
        help="The input whose config and tokenizer are copied: a model as given, or its "
        "position (0 = the first). Default: the first input."
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Accept .bin/.pt checkpoints (loaded with weights_only=True)."
    ),
]

SCHEMA_VERSION = 1


def _console(stderr: bool) -> Console:
    """Rich on a terminal; plain text (no colour, no wrap, no width limit) elsewhere."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, soft_wrap=True)
    return Console(stderr=stderr, soft_wrap=True, no_color=True, highlight=False, width=10_000)


err_console = _console(stderr=True)
console = _console(stderr=False)


def parse_size(text: str) -> int:
    try:
        return size_in_bytes(text)
    except UsageError as e:
        raise UsageError(f"--max-shard-size: {e}") from None


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


def report(command: str, summary: RunSummary, quiet: bool, as_json: bool) -> None:
    if as_json:
        stats = summary.to_dict()
        emit_json(command, outputs=stats.pop("outputs"), **stats)
    elif not quiet:
        outs = ", ".join(summary.outputs)
        err_console.print(
            f"[green]wrote[/green] {outs}: {summary.tensors} tensors, "
            f"{summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.2f}s "
            f"(peak RSS {summary.peak_rss_mb:.0f} MB)"
        )


def print_json(data: Any) -> None:
    """Strict JSON (RFC 8259): a NaN or infinite float, such as the cosine of a zero task
    vector, is written as null, which every parser accepts."""
    text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False)
    sys.stdout.write(text + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_envelope(
    command: str,
    *,
    outputs: Sequence[str | Path] = (),
    stages: Sequence[dict[str, Any]] | None = None,
    ok: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The one --json shape: {schema_version, command, ok, outputs, stages, ...command keys}."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": ok,
        "outputs": [str(p) for p in outputs],
        "stages": list(stages or []),
        **extra,
    }


def emit_json(
    command: str,
    *,
    outputs: Sequence[str | Path] = (),
    stages: Sequence[dict[str, Any]] | None = None,
    **extra: Any,
) -> None:
    """Print the success envelope on stdout (see json_envelope)."""
    print_json(json_envelope(command, outputs=outputs, stages=stages, **extra))


def json_error(command: str, message: str, exit_code: int) -> dict[str, Any]:
    """The failure envelope, printed on stdout by the error boundary when --json was given."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": False,
        "error": {"message": message, "exit_code": exit_code},
    }


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    right: Sequence[str] = (),
    caption: str | None = None,
) -> None:
    """A rich table on a terminal; tab-separated lines (a header, then one per row) elsewhere,
    so that `| cut`, `| grep` and logs see every cell whole. `right`: columns right-aligned
    on a terminal (numbers). Title and caption are `# ` comment lines in a pipe."""
    if sys.stdout.isatty():
        table = Table(title=title, caption=caption)
        for col in columns:
            table.add_column(col, justify="right" if col in right else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    if title:
        sys.stdout.write(f"# {title}\n")
    for row in [columns, *rows]:
        sys.stdout.write("\t".join(row) + "\n")
    if caption:
        sys.stdout.write(f"# {caption}\n")


# JSON Schema (draft 2020-12) of every --json output; docs/cli.md shows it, tests validate
# each command's output against it.
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rlmerge --json output",
    "type": "object",
    "required": ["schema_version", "command", "ok"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "command": {"type": "string", "minLength": 1},
        "ok": {"type": "boolean"},
        "outputs": {"type": "array", "items": {"type": "string"}},
        "stages": {"type": "array", "items": {"type": "object"}},
        "error": {
            "type": "object",
            "required": ["message", "exit_code"],
            "properties": {
                "message": {"type": "string"},
                "exit_code": {"type": "integer", "minimum": 1},
            },
        },
    },
    "if": {"properties": {"ok": {"const": True}}},
    "then": {"required": ["outputs", "stages"], "not": {"required": ["error"]}},
    "else": {"required": ["error"]},
}
