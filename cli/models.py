"""Commands on whole models: soup, interpolate, task-vector, inspect, diff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergekit_rl import analysis, ops
from mergekit_rl.errors import UsageError

from .common import (
    AllowPickle,
    Device,
    Dtype,
    Force,
    Json,
    MaxShardSize,
    Output,
    Quiet,
    console,
    parse_floats,
    print_json,
    report,
    write_options,
)
from .errors import boundary

DEFAULT_SHARD = "5GB"
GREEDY_HELP = (
    "Greedy soup: add models by their own score, keeping one only if the soup's score improves."
)
task_vector_app = typer.Typer(help="Extract and apply task vectors (tau = finetuned - base).")


def soup(
    models: Annotated[
        list[str], typer.Argument(help="Two or more models (dirs, files or hub ids).")
    ],
    output: Output,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weights, normalised (default: uniform).")
    ] = None,
    tokenizer_source: Annotated[
        int, typer.Option(help="Index of the model whose config/tokenizer is copied.")
    ] = 0,
    greedy: Annotated[bool, typer.Option("--greedy", help=GREEDY_HELP)] = False,
    eval_prompts: Annotated[
        Path | None, typer.Option(help="Held-out prompts scored by --greedy.")
    ] = None,
    reward: Annotated[str, typer.Option(help="--greedy's reward (as `rlmerge eval`).")] = (
        "sentiment"
    ),
    device: Device = "cpu",
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = DEFAULT_SHARD,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Average models (uniform or weighted): a model soup, or a SALSA reference model.

    Example: rlmerge soup sft_seed1 sft_seed2 -o ref
    (greedy: rlmerge soup a b c -o soup --greedy --eval-prompts prompts.jsonl --reward sentiment)
    """
    with boundary():
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        w = parse_floats(weights, "--weights")
        if not 0 <= tokenizer_source < len(models):
            raise UsageError(f"--tokenizer-source {tokenizer_source} is not a model index.")
        notes = ""
        if greedy:
            from .lab import greedy_weights

            w, notes = greedy_weights(models, w, eval_prompts, reward, device, output, force)
        report(ops.soup(models, output, w, opts, tokenizer_source, notes), quiet, json)


def interpolate(
    sft: Annotated[str, typer.Argument(help="The SFT model (alpha = 0).")],
    rlhf: Annotated[str, typer.Argument(help="The RLHF model (alpha = 1).")],
    output: Output,
    alpha: Annotated[
        str, typer.Option(help="One alpha, or a list (0,0.5,1) written to OUT/alpha-<a> each.")
    ] = "0.5",
    method: Annotated[str, typer.Option(help="lerp or slerp.")] = "lerp",
    device: Device = "cpu",
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = DEFAULT_SHARD,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Interpolate SFT and RLHF weights: theta = (1 - alpha) * SFT + alpha * RLHF.

    Example: rlmerge interpolate sft rlhf -o sweep --alpha 0,0.25,0.5,0.75,1
    """
    with boundary():
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        alphas = parse_floats(alpha, "--alpha") or []
        report(ops.interpolate(sft, rlhf, output, alphas, method, opts), quiet, json)


@task_vector_app.command("extract")
def tv_extract(
    base: Annotated[str, typer.Argument(help="The base (pretrained) model.")],
    finetuned: Annotated[str, typer.Argument(help="The fine-tuned model.")],
    output: Output,
    device: Device = "cpu",
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = DEFAULT_SHARD,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Save tau = finetuned - base (its metadata names the base).

    Example: rlmerge task-vector extract base sft -o tau_sft.safetensors
    """
    with boundary():
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        report(ops.extract_task_vector(base, finetuned, output, opts), quiet, json)


@task_vector_app.command("apply")
def tv_apply(
    base: Annotated[str, typer.Argument(help="The model to add the task vectors to.")],
    task_vectors: Annotated[list[str], typer.Argument(help="One or more task vectors.")],
    output: Output,
    scale: Annotated[
        str | None, typer.Option(help="Comma-separated scales, one per task vector (default 1).")
    ] = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = DEFAULT_SHARD,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """theta = base + sum_i scale_i * tau_i; a negative scale negates (forgets) a task.

    Example: rlmerge task-vector apply base tau_a.safetensors tau_b.safetensors -o out --scale 1,-0.5
    """
    with boundary():
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        scales = parse_floats(scale, "--scale")
        report(ops.apply_task_vectors(base, task_vectors, output, scales, opts), quiet, json)


def inspect(
    model: Annotated[str, typer.Argument(help="A model dir, .safetensors file or hub id.")],
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Show architecture, parameter count, dtypes, shards and size (headers only).

    Example: rlmerge inspect ./sft --json
    """
    with boundary():
        info = analysis.inspect_model(model, allow_pickle)
        if json:
            print_json(info)
            return
        table = Table(title=f"{model}", show_header=False)
        for key in (
            "architecture",
            "model_type",
            "layers",
            "hidden_size",
            "vocab_size",
            "tied_embeddings",
            "tensors",
        ):
            table.add_row(key, str(info[key]))
        table.add_row("parameters", f"{info['parameters']:,}")
        table.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
        table.add_row("shards", f"{len(info['shards'])}: {', '.join(info['shards'][:4])}")
        table.add_row("size", f"{info['bytes'] / 1e6:.1f} MB")
        console.print(table)


def diff(
    a: Annotated[str, typer.Argument(help="First model.")],
    b: Annotated[str, typer.Argument(help="Second model.")],
    base: Annotated[
        str | None, typer.Option(help="A common base: adds task-vector norms, cosine, conflicts.")
    ] = None,
    per_tensor: Annotated[bool, typer.Option(help="Show every tensor, not only layers.")] = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Compare two models: relative L2 distance and cosine per layer (and per tensor).

    Example: rlmerge diff sft rlhf --base base
    """
    with boundary():
        result = analysis.diff_models(a, b, base, allow_pickle)
        if json:
            print_json(result)
            return
        rows = result["tensors"] if per_tensor else result["layers"]
        key = "tensor" if per_tensor else "group"
        cols = ["rel_l2", "cosine"]
        if base is not None:
            cols += ["tv_norm_a", "tv_norm_b", "tv_cosine", "sign_conflict"]
        table = Table(title=f"{a} vs {b}" + (f" (base {base})" if base else ""))
        table.add_column(key)
        for c in cols:
            table.add_column(c, justify="right")
        for row in rows:
            table.add_row(row[key], *(f"{row[c]:.4g}" for c in cols))
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(soup)
    app.command()(interpolate)
    app.add_typer(task_vector_app, name="task-vector")
    app.command()(inspect)
    app.command()(diff)
