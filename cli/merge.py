"""Recipe commands: merge, validate, methods."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated, Any

import typer
from rich.table import Table

from mergekit_rl.merge.registry import MergeMethod, list_methods
from mergekit_rl.recipe import run as recipe_run

from .common import (
    AllowPickle,
    Device,
    Dtype,
    Force,
    Json,
    Output,
    Quiet,
    console,
    err_console,
    parse_size,
    print_json,
    write_options,
)
from .errors import boundary

Recipe = Annotated[str, typer.Argument(help="A recipe YAML file (mergekit format).")]
RecipeShardSize = Annotated[
    str | None,
    typer.Option(help="Largest output shard, bytes or 5GB / 500MB (default: the recipe's, 5GB)."),
]


def merge(
    recipe: Recipe,
    output: Output,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (tensors, shards, memory); write nothing."),
    ] = False,
    device: Device = "cpu",
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

    Example: rlmerge merge recipes/ties.yaml -o merged --dry-run
    """
    with boundary():
        opts = write_options(device, dtype, "5GB", force, quiet, json, allow_pickle)
        shard = parse_size(max_shard_size) if max_shard_size else None
        mopts = recipe_run.MergeOptions(write=opts, max_shard_size=shard)
        if dry_run:
            plan = recipe_run.plan_file(recipe, output, mopts)
            if json:
                print_json(plan)
            else:
                print_plan(plan)
            return
        results = recipe_run.merge_file(recipe, output, mopts)
        if json:
            print_json([vars(r) for r in results])
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
) -> None:
    """Check recipes without opening any model (for CI): every problem, with its YAML path.

    Exits 0 when all are valid, 2 otherwise.

    Example: rlmerge validate recipes/*.yaml
    """
    bad = 0
    for path in recipes:
        try:
            with boundary():
                stages = recipe_run.load_recipe(path)
        except typer.Exit:
            bad += 1
            continue
        if not quiet:
            n = len(stages)
            err_console.print(f"[green]ok[/green] {path} ({n} stage{'s' if n != 1 else ''})")
    if bad:
        raise typer.Exit(2)


def methods(json: Json = False) -> None:
    """List the merge methods: base needed, model count, parameters with defaults, paper.

    Example: rlmerge methods --json
    """
    rows = [method_info(m) for m in list_methods()]
    if json:
        print_json(rows)
        return
    table = Table("method", "base", "models", "per-model parameters", "global parameters")
    table.add_column("paper", overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            "yes" if r["needs_base"] else "no",
            f"{r['min_models']}+" if r["max_models"] is None else _range(r),
            _defaults(r["model_params"]),
            _defaults(r["global_params"]),
            r["paper"] or "-",
        )
    console.print(table)


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
