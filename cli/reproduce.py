"""`rlmerge reproduce OUTPUT [-o NEW]`: re-run an output's recorded command, compare bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import Force, Json, Quiet, console, json_envelope, print_json
from .errors import boundary


def reproduce(
    output: Annotated[Path, typer.Argument(help="An rlmerge output (directory or .safetensors).")],
    new: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Keep the re-made output here (default: a temporary folder)."
        ),
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Re-run the command recorded in OUTPUT and compare the new output with it bit for bit.

    The command is re-run from that record alone: every input must resolve to the recorded
    revision / content fingerprint (else exit 2, naming it); then every tensor of the new
    output is compared with OUTPUT's. Exit 0 when bit-identical, 1 when not.

    Example: rlmerge reproduce demo/outputs/salsa_ref
    """
    with boundary("reproduce", json):
        from mergekit_rl.reproduce import reproduce as run_reproduce

        report = run_reproduce(output, new, force)
        if json:
            outputs = [str(report.new)] if report.new else []
            print_json(
                json_envelope("reproduce", outputs=outputs, ok=report.identical, **report.to_dict())
            )
        elif not quiet:  # the verdict is the result: stdout
            for rec in report.inputs:
                console.print(f"input {rec['ref']}: {rec['status']}", soft_wrap=True)
            if report.identical:
                console.print(
                    f"[green]reproduced[/green] {output}: all {report.tensors} tensors "
                    "bit-identical",
                    soft_wrap=True,
                )
            else:
                listed = ", ".join(report.differing[:5])
                console.print(
                    f"[red]not reproduced[/red] {output}: {len(report.differing)} of "
                    f"{report.tensors} tensors differ ({listed})",
                    soft_wrap=True,
                )
    if not report.identical:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(reproduce)
