"""Commands on whole models: soup, interpolate, task-vector, inspect, diff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl import analysis, ops
from mergekit_rl.errors import UsageError
from mergekit_rl.recipe.checks import same_ref

from .common import (
    AllowPickle,
    Device,
    Dtype,
    Force,
    Json,
    MaxShardSize,
    Output,
    Quiet,
    TokenizerSource,
    emit_json,
    parse_floats,
    print_table,
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
    tokenizer_source: TokenizerSource = None,
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
    with boundary("soup", json):
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        w = parse_floats(weights, "--weights")
        tok = tokenizer_index(tokenizer_source, models)
        notes = ""
        if greedy:
            from .lab import greedy_weights

            w, notes = greedy_weights(models, w, eval_prompts, reward, device, output, force)
        report("soup", ops.soup(models, output, w, opts, tok, notes), quiet, json)


def tokenizer_index(value: str | None, models: list[str]) -> int:
    """--tokenizer-source: a model as given on the command line (like the recipe key
    tokenizer_source), or its position among the inputs (the older spelling)."""
    if value is None:
        return 0
    for i, ref in enumerate(models):
        if same_ref(value, ref):
            return i
    if value.isdigit() and int(value) < len(models):
        return int(value)
    raise UsageError(
        f"--tokenizer-source '{value}' is not one of the inputs ({', '.join(models)}) nor a "
        f"position 0 to {len(models) - 1}."
    )


def interpolate(
    sft: Annotated[str, typer.Argument(help="The SFT model (alpha = 0).")],
    rlhf: Annotated[str, typer.Argument(help="The RLHF model (alpha = 1).")],
    output: Output,
    alpha: Annotated[
        str, typer.Option(help="One alpha, or a list (0,0.5,1) written to OUT/alpha-<a> each.")
    ] = "0.5",
    method: Annotated[str, typer.Option(help="lerp or slerp.")] = "lerp",
    tokenizer_source: TokenizerSource = None,
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
    with boundary("interpolate", json):
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        alphas = parse_floats(alpha, "--alpha") or []
        tok = tokenizer_index(tokenizer_source, [sft, rlhf])
        summary = ops.interpolate(sft, rlhf, output, alphas, method, opts, tokenizer_source=tok)
        report("interpolate", summary, quiet, json)


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

    Stored wide by default (float32 for bf16/fp16 models, float64 for float32 ones), so that
    applying tau at scale 1 gives the fine-tuned model back bit for bit (except weights over
    2^16 times smaller than the base's: --dtype float64 is exact there). --dtype bfloat16
    stores it smaller, rounded.

    Example: rlmerge task-vector extract base sft -o tau_sft.safetensors
    """
    with boundary("task-vector extract", json):
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        report(
            "task-vector extract",
            ops.extract_task_vector(base, finetuned, output, opts),
            quiet,
            json,
        )


@task_vector_app.command("apply")
def tv_apply(
    base: Annotated[str, typer.Argument(help="The model to add the task vectors to.")],
    task_vectors: Annotated[list[str], typer.Argument(help="One or more task vectors.")],
    output: Output,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "--scale",
            help="Comma-separated weights (scales), one per task vector, not normalised "
            "(default 1 each). --scale is the older spelling.",
        ),
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

    The output's config and tokenizer are the base model's (task vectors carry none).

    Example: rlmerge task-vector apply base tau_a.safetensors tau_b.safetensors -o out --weights 1,-0.5
    """
    with boundary("task-vector apply", json):
        opts = write_options(device, dtype, max_shard_size, force, quiet, json, allow_pickle)
        scales = parse_floats(weights, "--weights")
        summary = ops.apply_task_vectors(base, task_vectors, output, scales, opts)
        report("task-vector apply", summary, quiet, json)


def inspect(
    model: Annotated[str, typer.Argument(help="A model dir, .safetensors file or hub id.")],
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Show architecture, parameter count, dtypes, shards and size (headers only).

    Example: rlmerge inspect ./sft --json
    """
    with boundary("inspect", json):
        info = analysis.inspect_model(model, allow_pickle)
        if json:
            emit_json("inspect", **info)
            return
        rows = []
        for key in (
            "architecture",
            "model_type",
            "layers",
            "hidden_size",
            "vocab_size",
            "tied_embeddings",
            "tensors",
        ):
            rows.append((key, str(info[key])))
        rows.append(("parameters", f"{info['parameters']:,}"))
        rows.append(("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())))
        rows.append(("shards", f"{len(info['shards'])}: {', '.join(info['shards'])}"))
        rows.append(("size", f"{info['bytes'] / 1e6:.1f} MB"))
        print_table(("key", "value"), rows, title=model)


def diff(
    a: Annotated[str, typer.Argument(help="First model.")],
    b: Annotated[str, typer.Argument(help="Second model.")],
    base: Annotated[
        str | None, typer.Option(help="A common base: adds task-vector norms, cosine, conflicts.")
    ] = None,
    per_tensor: Annotated[
        bool, typer.Option("--per-tensor", help="Show every tensor, not only layers.")
    ] = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Compare two models: relative L2 distance and cosine per layer (and per tensor).

    Example: rlmerge diff sft rlhf --base base
    """
    with boundary("diff", json):
        result = analysis.diff_models(a, b, base, allow_pickle)
        if json:
            emit_json("diff", **result)
            return
        rows = result["tensors"] if per_tensor else result["layers"]
        key = "tensor" if per_tensor else "group"
        cols = ["rel_l2", "cosine"]
        if base is not None:
            cols += ["tv_norm_a", "tv_norm_b", "tv_cosine", "sign_conflict"]
        title = f"{a} vs {b}" + (f" (base {base})" if base else "")
        cells = [(row[key], *(f"{row[c]:.4g}" for c in cols)) for row in rows]
        print_table((key, *cols), cells, title=title)


def register(app: typer.Typer) -> None:
    app.command()(soup)
    app.command()(interpolate)
    app.add_typer(task_vector_app, name="task-vector")
    app.command()(inspect)
    app.command()(diff)
