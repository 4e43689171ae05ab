"""`rlmerge plot`: reward against KL / perplexity from `rlmerge eval` or `rlmerge lab` results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.errors import OutputExistsError, UsageError

from .common import Force, Json, emit_json, err_console
from .errors import boundary


def plot_command(
    results: Annotated[
        list[Path],
        typer.Argument(help="`rlmerge eval --json` / `--csv` outputs or a lab results.json."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The figure: .png, .pdf or .svg.")],
    x: Annotated[str, typer.Option(help="Drift axis: kl or ppl.")] = "kl",
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Plot reward against drift (KL or perplexity) from eval or lab results.

    One colour per method, lines through sweeps, error bars from seeds (their range), the
    Pareto front marked. The file type follows the name: .png, .pdf or .svg.

    Example: rlmerge plot lab/results.json -o pareto.png --x ppl
    """
    with boundary("plot", json_out):
        from mergekit_rl.lab.plot import FORMATS, load_rows, plot

        if output.suffix.lower() not in FORMATS:
            raise UsageError(
                f"--output {output}: name the figure *.png, *.pdf or *.svg (the format follows it)."
            )
        if output.exists() and not force:
            raise OutputExistsError(f"--output {output} exists; pass --force to replace it.")
        if output.resolve() in {p.resolve() for p in results}:
            raise UsageError(f"--output {output} is one of the inputs.")
        points = plot(load_rows(results), output, x, title)
        if json_out:
            emit_json(
                "plot",
                outputs=[str(output)],
                stages=[],
                points=[p.__dict__ for p in points],
            )
        else:
            err_console.print(f"[green]wrote[/green] {output}: {len(points)} points")


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_command)
