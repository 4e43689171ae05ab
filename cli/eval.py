"""`rlmerge eval`: reward, KL to a reference and held-out perplexity, one row per model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.errors import UsageError

from .common import Device, Json, emit_json, err_console, print_table
from .errors import boundary


def eval_command(
    models: Annotated[list[str], typer.Argument(help="Models to score (dirs or hub ids).")],
    prompts: Annotated[
        Path,
        typer.Option(
            help="Prompts: .jsonl with a 'prompt' field (text or chat messages; other fields "
            "go to reward functions by name), or one per line."
        ),
    ],
    reward: Annotated[
        str,
        typer.Option(
            help="A reward `rlmerge train` accepts: a name (sentiment), inline YAML "
            "('{length: {target: 12}}') or a YAML file (a reward mapping or a train recipe)."
        ),
    ] = "sentiment",
    reference: Annotated[
        str | None,
        typer.Option(
            help="Reference model for the KL (between the two models' sampling distributions "
            "at --temperature / --top-k) and win rate."
        ),
    ] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out text, one document per line: perplexity.")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Completions per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="0: the whole vocabulary.")] = 0,
    seed: Annotated[int, typer.Option(help="Sampling seed (the same for every model).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_prompts: Annotated[int | None, typer.Option(min=1)] = None,
    max_heldout: Annotated[int | None, typer.Option(min=1)] = None,
    win_rate: Annotated[
        bool, typer.Option("--win-rate", help="Win rate against the reference's samples.")
    ] = False,
    allow_code: Annotated[
        bool, typer.Option("--allow-code", help="Allow a reward `function:` (runs Python).")
    ] = False,
    csv: Annotated[
        Path | None, typer.Option(help="Also write the rows (settings in a # line) as CSV.")
    ] = None,
    device: Device = "cpu",
    json_out: Json = False,
) -> None:
    """Score models on reward (mean, standard error), KL to a reference and perplexity.

    Example: rlmerge eval sft rlhf --prompts prompts.jsonl --reward sentiment --reference sft
    --heldout heldout.txt --json
    """
    with boundary("eval", json_out):
        from mergekit_rl.lab.evaluate import EvalSettings, parse_reward, write_csv

        if csv is not None and not csv.parent.is_dir():
            raise UsageError(f"--csv {csv}: the directory {csv.parent} does not exist.")
        settings = EvalSettings(
            prompts=str(prompts),
            reward=parse_reward(reward),
            reference=reference,
            heldout=str(heldout) if heldout else None,
            samples=samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            batch_size=batch_size,
            max_prompts=max_prompts,
            max_heldout=max_heldout,
            win_rate=win_rate,
            device=device,
            allow_code=allow_code,
        )
        rows = _run(models, settings, quiet=json_out)
        if csv is not None:
            write_csv(csv, rows, settings)
        if json_out:
            emit_json(
                "eval",
                outputs=[str(csv)] if csv else [],
                stages=[],
                settings=json.loads(json.dumps(settings.__dict__)),
                rows=rows,
            )
        else:
            _table(rows, settings)


def _run(models: list[str], settings, quiet: bool) -> list[dict]:  # noqa: ANN001
    from rich.progress import Progress

    from mergekit_rl.lab.evaluate import evaluate

    if quiet:
        return evaluate(models, settings)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("eval", total=None)

        def on_batch(label: str, done: int, total: int) -> None:
            bar.update(task, description=f"eval {label}", completed=done, total=total)

        return evaluate(models, settings, on_batch=on_batch)


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _kl_header(settings) -> str:  # noqa: ANN001
    """Which KL, in a column header: the sampling distributions' temperature and top-k."""
    if settings.temperature == 0:
        return "KL/token (greedy; T=1)"
    top = f", top-{settings.top_k}" if settings.top_k else ""
    return f"KL/token (T={settings.temperature:g}{top})"


def _table(rows: list[dict], settings) -> None:  # noqa: ANN001
    """A table on a terminal, tab-separated rows in a pipe (print_table); the caption says
    which KL the column holds."""
    from mergekit_rl.lab.evaluate import kl_definition

    caption = f"KL: {kl_definition(settings)}." if settings.reference else None
    if caption and any(r["kl"] == float("inf") for r in rows):
        caption += (
            " inf: the model's top-k held a token outside the reference's top-k, which the "
            "reference's sampler never draws."
        )
    columns = ("model", "reward", "± se", _kl_header(settings), "ppl", "win rate", "tokens")
    cells = [
        (
            r["label"],
            _fmt(r["reward"], 4),
            _fmt(r["reward_se"], 4),
            _fmt(r["kl"], 4),
            _fmt(r["ppl"], 2),
            _fmt(r["win_rate"], 3),
            _fmt(r["mean_tokens"], 1),
        )
        for r in rows
    ]
    print_table(columns, cells, title="rlmerge eval", right=columns[1:], caption=caption)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
