"""`rlmerge lab`: the alignment-tax experiment in miniature (see mergekit_rl/lab/run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.errors import OutputExistsError, UsageError
from mergekit_rl.known_warnings import harmless_warnings_ignored

from .common import Force, Json, emit_json, err_console
from .errors import boundary


def lab_command(
    out: Annotated[Path, typer.Option("--out", help="Directory for everything it makes.")] = Path(
        "lab"
    ),
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Training seeds per arm (default 3; 1 with --quick).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="One seed, few steps: about 3 minutes on 2 cores.")
    ] = False,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Run the alignment-tax experiment in miniature and write a report with plots.

    Pretrain, SFT and RL-train a tiny Llama with DPO (+ OnDARE / OnTIES) and GRPO (+ Elastic
    Reset / SALSA), interpolate, evaluate and plot: DIR/report.md, pareto_kl.png,
    pareto_ppl.png, results.json.

    Example: rlmerge lab --out lab --quick
    """
    with boundary("lab", json_out):
        from mergekit_rl.lab.run import run_lab

        def echo(message: str) -> None:
            if not json_out:
                err_console.print(message, highlight=False)

        with harmless_warnings_ignored():  # the workers install the same filters
            result = run_lab(out, seeds, quick, force, echo)
        outputs = [result.report, result.results, *result.plots]
        if json_out:
            emit_json(
                "lab",
                outputs=[str(p) for p in outputs],
                stages=result.stages,
                seconds=result.seconds,
            )
        else:
            err_console.print(
                f"[green]wrote[/green] {result.report} in {result.seconds / 60:.1f} minutes"
            )


def greedy_weights(
    models: list[str],
    weights: list[float] | None,
    eval_prompts: Path | None,
    reward: str,
    device: str,
    output: Path,
    force: bool,
) -> tuple[list[float], str]:
    """`soup --greedy`: the chosen members as 0/1 weights, and the model card's record."""
    from mergekit_rl.lab.evaluate import EvalSettings, parse_reward
    from mergekit_rl.lab.greedy import greedy_soup_weights

    if eval_prompts is None:
        raise UsageError("--greedy scores soups on held-out prompts: give --eval-prompts FILE.")
    if weights is not None:
        raise UsageError("--greedy chooses the members itself: drop --weights.")
    if output.exists() and not force:  # before the (slow) selection
        raise OutputExistsError(f"output '{output}' exists; pass --force to replace it.")
    settings = EvalSettings(prompts=str(eval_prompts), reward=parse_reward(reward), device=device)
    w, result = greedy_soup_weights(models, settings)
    chosen = ", ".join(models[i] for i in result.chosen)
    err_console.print(f"greedy soup: {chosen} (held-out reward {result.score:.4f})")
    return w, result.card_notes(models)


def register(app: typer.Typer) -> None:
    app.command("lab")(lab_command)
