"""`rlmerge demo`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.demo import run_demo

from .common import Force, err_console
from .errors import boundary


def demo(
    directory: Annotated[
        Path | None, typer.Argument(help="Where to build (default: a new temporary directory).")
    ] = None,
    force: Force = False,
) -> None:
    """Build tiny random checkpoints and run soup, interpolate and task vectors end to end.

    Example: rlmerge demo ./demo
    """
    with boundary():
        root = directory or Path(tempfile.mkdtemp(prefix="rlmerge-demo-"))
        run_demo(
            root,
            echo=lambda s: err_console.print(s, highlight=False, markup=False, soft_wrap=True),
            force=force,
        )


def register(app: typer.Typer) -> None:
    app.command()(demo)
