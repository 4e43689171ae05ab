"""`rlmerge demo`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.demo import DONE_MARKER, is_complete_demo, run_demo

from .common import Json, Quiet, console, emit_json
from .errors import boundary


def demo(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Where to build (default: a new temporary directory). A complete demo made "
            "earlier is reused."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild, replacing what DIRECTORY holds.")
    ] = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Build tiny random checkpoints and run soup, interpolate and task vectors end to end.

    Models go to DIR/models/{base,sft1,sft2,rlhf}, outputs to DIR/outputs. Running it again on
    a directory it completed reuses it (so every guide can start with `rlmerge demo demo`).

    Example: rlmerge demo ./demo
    """
    with boundary("demo", json):
        root = directory or Path(tempfile.mkdtemp(prefix="rlmerge-demo-"))
        reused = not force and is_complete_demo(root)

        def echo(line: str) -> None:  # the walk-through is the demo's result: stdout
            if not (quiet or json):
                console.print(line, highlight=False, markup=False, soft_wrap=True)

        paths = run_demo(root, echo=echo, force=force)
        if json:
            outputs = [] if reused else [str(root)]
            models = {k: str(v) for k, v in paths.items() if k != "outputs"}
            emit_json(
                "demo",
                outputs=outputs,
                directory=str(root),
                reused=reused,
                models=models,
                marker=str(root / DONE_MARKER),
            )


def register(app: typer.Typer) -> None:
    app.command()(demo)
