"""`rlmerge train RECIPE.yaml`: preference / RL training on TRL with online merging."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import Json, command_line, emit_json, err_console
from .errors import boundary


def train(
    recipe: Annotated[Path, typer.Argument(help="The train recipe (YAML).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Where the final model goes (default OUTPUT_DIR/final)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the last checkpoint in output_dir (replacing the final model "
            "of that run, if it finished).",
        ),
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(help="Override training.max_steps (smoke runs).", min=1)
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate; print the resolved recipe, the TRL trainer arguments and the memory "
            "plan per process; no training (model directories may hold a config.json alone).",
        ),
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            help="--dry-run: plan for this many processes (default: WORLD_SIZE, else 1).", min=1
        ),
    ] = None,
    fsdp: Annotated[
        bool | None,
        typer.Option(
            "--fsdp/--no-fsdp",
            help="--dry-run: plan for FSDP full sharding (default: ACCELERATE_USE_FSDP).",
        ),
    ] = None,
    allow_code: Annotated[
        bool,
        typer.Option(
            "--allow-code", help="Allow reward.function (imports Python code named by the recipe)."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Start over: replace the final model and old checkpoints."),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress bar or per-step lines (metrics.jsonl is written).",
        ),
    ] = False,
    json: Json = False,
) -> None:
    """Train with DPO, KTO, GRPO or RLOO (TRL) as a recipe says, with online merging options.

    The recipe chooses OnDARE / OnTIES, Elastic Reset or a soup reference. Metrics go to
    OUTPUT_DIR/metrics.jsonl.

    Every path and hub id in the recipe is checked before anything is loaded or written; all
    problems are listed at once with their YAML keys (exit 2). The recipe keys are listed in
    docs/training.md.

    Example: rlmerge demo demo && cd demo && rlmerge train ../recipes/train/dpo-ondare.yaml --max-steps 5

    Several processes (DDP): accelerate launch --multi_gpu --num_processes 2 -m mergekit_rl.cli.app train RECIPE.yaml
    """
    with boundary("train", json):
        from mergekit_rl.train.recipe import read_train_recipe

        parsed, text = read_train_recipe(recipe, allow_code=allow_code, config_only=dry_run)
        if dry_run:
            _dry_run(parsed, max_steps, processes, fsdp, json)
            return
        from mergekit_rl.known_warnings import harmless_warnings_ignored
        from mergekit_rl.train.run import TrainOptions
        from mergekit_rl.train.run import train as run_train

        _quiet_progress_bars()

        opts = TrainOptions(
            output=output,
            resume=resume,
            max_steps=max_steps,
            force=force,
            command=command_line(),
            echo=_echo(quiet or json),
            progress=_progress(quiet or json),
        )
        with harmless_warnings_ignored():
            result = run_train(parsed, text, opts)
        if not result.main_process:
            return  # under DDP the main process reports
        if json:
            emit_json(
                "train",
                outputs=[result.final, result.metrics],
                final=str(result.final),
                metrics=str(result.metrics),
                steps=result.steps,
                seconds=result.seconds,
            )
        elif not quiet:
            err_console.print(
                f"[green]trained[/green] {result.steps} steps in {result.seconds:.1f}s; "
                f"final model: {result.final}; metrics: {result.metrics}",
                soft_wrap=True,
            )


def _dry_run(
    parsed: Any, max_steps: int | None, processes: int | None, fsdp: bool | None, json: bool
) -> None:
    """The resolved recipe, the TRL config arguments it gives (built, so that TRL's own checks
    run) and the memory plan per process (as YAML comments, so stdout stays YAML); packages
    the recipe needs are checked too."""
    from mergekit_rl.train.memory import GPU_GIB, plan_for_recipe
    from mergekit_rl.train.recipe import trl_config_class
    from mergekit_rl.train.run import check_environment, trainer_config, trainer_kwargs

    check_environment(parsed)
    trainer_config(parsed, max_steps)  # TRL's __post_init__ checks, as a real run does
    resolved = parsed.model_dump(mode="json")
    if max_steps is not None:
        resolved["training"]["max_steps"] = max_steps
    args = {
        "class": trl_config_class(parsed.algorithm).__name__,
        "args": trainer_kwargs(parsed, max_steps),
    }
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp is None:
        from mergekit_rl.train.run import accelerate_uses

        fsdp = accelerate_uses("FSDP")
    plan = plan_for_recipe(parsed, processes, fsdp)
    if json:
        memory = {
            "params": plan.params,
            "processes": processes,
            "fsdp": fsdp,
            "bytes": plan.items,
            "peak": plan.total,
            "fits_gb": {str(g): plan.fits(g) for g in GPU_GIB},
        }
        emit_json("train", dry_run=True, recipe=resolved, trainer=args, memory=memory)
        return
    import yaml

    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
    sys.stdout.write("# the TRL config it resolves to\n")
    sys.stdout.write(yaml.safe_dump({"trainer": args}, sort_keys=False))
    sys.stdout.write("".join(f"# {line}\n" for line in plan.lines()))


def _progress(silent: bool):  # noqa: ANN202
    """A bar on a terminal, step/total + ETA lines in a pipe, nothing when silent."""
    if silent:
        return None
    from mergekit_rl.train.progress import TrainProgress

    return TrainProgress("bar" if err_console.is_terminal else "lines", console=err_console)


def _echo(silent: bool):  # noqa: ANN202
    if silent:
        return lambda line: None
    return lambda line: err_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _quiet_progress_bars() -> None:
    """No per-file loading bars from transformers / datasets: the metrics lines are the output."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def register(app: typer.Typer) -> None:
    app.command()(train)
