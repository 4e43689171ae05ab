"""Recipe commands: merge, validate, methods."""

from __future__ import annotations

import json as jsonlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_rl.errors import RecipeError, UsageError
from mergekit_rl.merge.registry import MergeMethod, list_methods
from mergekit_rl.recipe import run as recipe_run
from mergekit_rl.train.recipe import check_train_recipe, is_train_recipe

from .common import (
    AllowPickle,
    Dtype,
    Force,
    Json,
    Quiet,
    console,
    emit_json,
    err_console,
    json_envelope,
    parse_size,
    print_json,
    print_table,
    write_options,
)
from .errors import boundary, classify

Recipe = Annotated[str, typer.Argument(help="A recipe YAML file (mergekit format).")]
PositionalOut = Annotated[
    Path | None,
    typer.Argument(
        metavar="OUT",
        show_default=False,
        help="Output directory, as mergekit-yaml takes it (the same as -o OUT).",
    ),
]
OptionalOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output directory (or give OUT).")
]
MergeDevice = Annotated[
    str | None, typer.Option(help="Where the math runs: cpu (default), cuda or cuda:N.")
]
Cuda = Annotated[
    bool, typer.Option("--cuda", help="The same as --device cuda (mergekit-yaml's flag).")
]
RecipeShardSize = Annotated[
    str | None,
    typer.Option(help="Largest output shard, bytes or 5GB / 500MB (default: the recipe's, 5GB)."),
]


def merge(
    recipe: Recipe,
    out: PositionalOut = None,
    output: OptionalOutput = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (tensors, shards, memory); write nothing."),
    ] = False,
    device: MergeDevice = None,
    cuda: Cuda = False,
    dtype: Dtype = None,
    max_shard_size: RecipeShardSize = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Run a merge recipe (mergekit YAML) on the streaming engine.

    Model paths in the recipe are relative to the current directory. A recipe with several
    documents (separated by ---) is a pipeline: stage NAME is written to OUT/NAME, the last
    stage to OUT, and later stages use earlier ones by name. A stage whose output is complete
    and was made by the same recipe is skipped; --force reruns every stage. --dtype overrides
    the recipe's out_dtype/dtype. --dry-run resolves inputs and reads headers only.
    As with mergekit-yaml, the output may follow the recipe (`rlmerge merge r.yaml out`) and
    --cuda means --device cuda.

    Example: rlmerge merge recipes/ties-sft.yaml -o merged --dry-run
    """
    with boundary("merge", json):
        output = merge_output(out, output)
        device = merge_device(device, cuda)
        opts = write_options(device, dtype, "5GB", force, quiet, json, allow_pickle)
        shard = parse_size(max_shard_size) if max_shard_size else None
        mopts = recipe_run.MergeOptions(write=opts, max_shard_size=shard)
        if dry_run:
            plan = recipe_run.plan_file(recipe, output, mopts)
            if json:
                emit_json("merge", stages=plan.pop("stages"), dry_run=True, **plan)
            else:
                print_plan(plan)
            return
        results = recipe_run.merge_file(recipe, output, mopts)
        if json:
            stages = [
                {"name": r.name, "output": r.output, "status": r.status, **r.summary}
                for r in results
            ]
            seconds = sum(float(r.summary.get("seconds", 0.0)) for r in results)
            written = [r.output for r in results if r.status != "skipped"]
            emit_json("merge", outputs=written, stages=stages, recipe=recipe, seconds=seconds)
        elif not quiet:
            for r in results:
                s = r.summary
                what = (
                    f"{s['tensors']} tensors, {s['bytes_written'] / 1e6:.1f} MB in "
                    f"{s['seconds']:.2f}s (peak RSS {s['peak_rss_mb']:.0f} MB)"
                    if s
                    else "output already complete"
                )
                err_console.print(f"[green]{r.status}[/green] {r.output}: {what}")


def merge_output(positional: Path | None, option: Path | None) -> Path:
    """OUT after the recipe (mergekit-yaml's form) or -o/--output; both only when they agree."""
    if positional is not None and option is not None and positional.resolve() != option.resolve():
        raise UsageError(
            f"two outputs given: '{positional}' after the recipe and '{option}' as -o/--output; "
            "give one of them."
        )
    chosen = positional if positional is not None else option
    if chosen is None:
        raise UsageError(
            "no output given: name it after the recipe (rlmerge merge RECIPE OUT) or with -o OUT."
        )
    return chosen


def merge_device(device: str | None, cuda: bool) -> str:
    """--cuda is mergekit-yaml's spelling of --device cuda; a different --device with it is
    refused rather than silently overridden."""
    if cuda and device not in (None, "cuda"):
        raise UsageError(f"--cuda means --device cuda, but --device {device} was also given.")
    return "cuda" if cuda else device or "cpu"


def print_plan(plan: dict[str, Any]) -> None:
    """The dry-run plan as plain lines (one per tensor), readable in a terminal or a log."""
    for stage in plan["stages"]:
        name = f" {stage['name']!r}" if stage["name"] else ""
        _say(
            f"[bold]stage{name}[/bold]: {stage['method']} -> {stage['output']} "
            f"({stage['action']}; seed {stage['seed']}; dtype {stage['dtype']})"
        )
        for i in stage["inputs"]:
            rev = f" @ {i['revision']}" if i["revision"] else ""
            _say(f"  input {i['ref']} = {i['resolved']}{rev}")
        shared = _shared_globals(stage["tensors"])
        _say(f"  parameters: {_kv(shared) or '-'}; config from {stage['config_from']}")
        tok = stage["tokenizer"]
        if not tok["copied"]:
            _say(f"  tokenizer: {_tokenizer_line(tok)}")
        for t in stage["tensors"]:
            varying = {k: v for k, v in t["global_params"].items() if k not in shared}
            per_model = " | ".join(f"{m}: {_kv(p)}" for m, p in t["model_params"].items() if p)
            reads = [f"{ref}:{n}" for ref, n in t["sources"] if n != t["name"]]
            params = "  ".join(x for x in (per_model, _kv(varying)) if x)
            _say(
                f"  {t['name']} {t['shape']} {t['dtype']} depth={t['depth']:.3g}  {params}"
                + (f"  <- {', '.join(reads)}" if reads else "")
            )
        for s in stage["shards"]:
            _say(f"  shard {s['file']}: {s['tensors']} tensors, {s['bytes']:,} bytes")
        if stage["config_updates"]:
            _say(f"  config updates: {jsonlib.dumps(stage['config_updates'])}")
        _say(
            f"  output {stage['bytes'] / 1e6:.2f} MB; estimated peak memory "
            f"{stage['peak_memory_bytes'] / 2**20:.0f} MiB"
        )


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def _tokenizer_line(tok: dict[str, Any]) -> str:
    """e.g. 'union: 321 tokens (21 added to base) + 63 padding rows; chat template chatml'."""
    if tok["source"] == "union":
        pad = f" + {tok['padding_rows']} padding rows" if tok["padding_rows"] else ""
        text = f"union: {tok['tokens']} tokens ({tok['added_tokens']} added to {tok['base']}){pad}"
    else:
        text = f"from {tok['source']}"
    template = tok.get("chat_template")
    return text + (f"; chat template {template}" if template else "")


def _shared_globals(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """Global parameter values that every tensor shares (printed once)."""
    if not tensors:
        return {}
    first = tensors[0]["global_params"]
    return {k: v for k, v in first.items() if all(t["global_params"].get(k) == v for t in tensors)}


def _kv(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in d.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def validate(
    recipes: Annotated[list[str], typer.Argument(help="One or more recipe YAML files.")],
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Check merge and train recipes without opening a model or the network (for CI).

    Every problem is listed with its YAML path. Paths and hub ids are checked when a command
    runs (merge --dry-run, train --dry-run).

    The report goes to stdout: `ok FILE (N stages)` or `invalid FILE: ...` with one indented
    line per problem. Exits 0 when all are valid, 2 otherwise (and stderr names the invalid
    files). --quiet prints only the invalid ones. With --json, one object lists every recipe
    with its problems.

    Example: rlmerge validate recipes/*.yaml
    """
    with boundary("validate", json):
        checked = [_check_recipe_file(path, quiet, json) for path in recipes]
    bad = [e["recipe"] for e in checked if not e["ok"]]
    if json:
        message = f"{len(bad)} of {len(checked)} recipes are invalid"
        error = {"message": message, "exit_code": 2}
        print_json(
            json_envelope(
                "validate", ok=not bad, recipes=checked, **({"error": error} if bad else {})
            )
        )
    if bad:
        print(
            f"rlmerge: invalid recipe: {', '.join(bad)} ({len(bad)} of {len(checked)} invalid)",
            file=sys.stderr,
        )
        raise typer.Exit(2)


def _check_recipe_file(path: str, quiet: bool, as_json: bool) -> dict[str, Any]:
    """{recipe, ok, stages, problems: [{path, message}]}. The verdict is the command's result:
    stdout (problems always, ok lines unless --quiet); with --json stdout holds only the JSON,
    so the problems go to stderr."""
    entry: dict[str, Any] = {"recipe": path, "ok": True, "stages": 0, "problems": []}
    train = _is_train_recipe(path)
    try:
        if train:
            algorithm = check_train_recipe(path).algorithm
        else:
            entry["stages"] = len(recipe_run.load_recipe(path))
    except UsageError as exc:  # a RecipeError, or a missing file
        entry["ok"] = False
        problems = exc.problems if isinstance(exc, RecipeError) else [("", str(exc))]
        entry["problems"] = [{"path": p, "message": m} for p, m in problems]
        text = str(exc) if isinstance(exc, RecipeError) else f"{path}: {classify(exc)[1]}: {exc}"
        print(f"invalid {text}", file=sys.stderr if as_json else sys.stdout)
        return entry
    if not (quiet or as_json) and train:
        console.print(f"[green]ok[/green] {path} (train recipe, {algorithm})")
    elif not (quiet or as_json):
        n = entry["stages"]
        console.print(f"[green]ok[/green] {path} ({n} stage{'s' if n != 1 else ''})")
    return entry


def _is_train_recipe(path: str) -> bool:
    try:
        return is_train_recipe(Path(path).read_text())
    except (OSError, UnicodeDecodeError):
        return False  # the merge loader reports it


def methods(json: Json = False) -> None:
    """List the merge methods: base needed, model count, parameters with defaults, paper.

    Example: rlmerge methods --json
    """
    rows = [method_info(m) for m in list_methods()]
    if json:
        emit_json("methods", methods=rows)
        return
    cells = [
        (
            r["name"],
            "yes" if r["needs_base"] else "no",
            f"{r['min_models']}+" if r["max_models"] is None else _range(r),
            _defaults(r["model_params"]),
            _defaults(r["global_params"]),
            r["paper"] or "-",
        )
        for r in rows
    ]
    columns = ("method", "base", "models", "per-model parameters", "global parameters", "paper")
    print_table(columns, cells)


def _range(r: dict[str, Any]) -> str:
    lo, hi = r["min_models"], r["max_models"]
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _defaults(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "-"


def method_info(m: MergeMethod) -> dict[str, Any]:
    def fields(model: Any) -> dict[str, Any]:
        out = {}
        for name, f in model.model_fields.items():
            out[f.alias or name] = "required" if f.is_required() else f.default
        return out

    info = {
        "name": m.name,
        "description": m.description,
        "needs_base": m.needs_base,
        "min_models": m.min_models,
        "max_models": m.max_models,
        "model_params": fields(m.model_params),
        "global_params": fields(m.global_params),
        "paper": m.paper,
    }
    return info


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command()(validate)
    app.command()(methods)
