"""Run a recipe file: one merge, or a pipeline of merges, on the streaming engine.

Where things are read and written:
- A model reference is the name of an earlier pipeline stage (its output is used), else a local
  path (relative to the current working directory, like mergekit) or a hub id
  `org/name[@revision]`. Every reference is resolved before anything is written; a missing one
  is reported with its YAML path.
- A one-document recipe writes OUT.
- A pipeline (documents separated by `---`) writes each intermediate stage to `OUT/<name>` and
  the last stage to OUT itself, beside those folders. A stage whose output already exists and
  is complete is skipped and its output reused; `force` reruns every stage.
- Every output holds `rlmerge_recipe.yaml` (the stage's recipe with defaults filled in and
  the resolved inputs) and a model card quoting it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .. import __version__
from ..engine import (
    BlockStream,
    Compute,
    OutputSpec,
    Pieces,
    RunSummary,
    TensorJob,
    dtype_name,
    out_dtype,
    parse_dtype,
    run_jobs,
)
from ..errors import InputNotFoundError, OutputExistsError, RecipeError, UsageError
from ..io.card import output_is_complete
from ..io.reader import Checkpoint
from ..io.reference import ModelSource, resolve
from ..io.safetensors_format import TensorInfo
from ..io.writer import DEFAULT_MAX_SHARD, check_output_path, plan_shards
from ..merge.blend import Elementwise
from ..merge.blocks import elementwise_form, merge_blocks
from ..merge.registry import TensorContext
from ..merge.vocab import CHAT_TEMPLATES, remap_rows, tokenizer_files
from ..ops import WriteOptions, output_spec
from .checks import Stage, load_pipeline
from .plan import StagePlan, plan_stage

RECIPE_FILE = "rlmerge_recipe.yaml"
FINAL_STAGING = ".rlmerge-final"  # the last pipeline stage is written here, then moved into OUT


@dataclass(frozen=True)
class MergeOptions:
    write: WriteOptions = WriteOptions()  # engine options, output dtype (overrides the recipe)
    max_shard_size: int | None = None  # None: the recipe's max_shard_size, else 5 GB


@dataclass
class StageResult:
    name: str | None
    output: str
    status: str  # "merged" or "skipped" (output already complete)
    summary: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: str | Path) -> list[Stage]:
    """Read and validate a recipe file (RecipeError lists every problem)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"recipe file '{path}' does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecipeError(str(path), [("", f"cannot be read ({e.strerror or e})")]) from e
    except UnicodeDecodeError as e:
        where = f"byte {e.start}"
        raise RecipeError(str(path), [(where, "not UTF-8 text (is this a YAML recipe?)")]) from e
    return load_pipeline(text, str(path))


def stage_outputs(stages: Sequence[Stage], out: Path) -> list[Path]:
    """OUT for a single recipe; OUT/<name> for intermediate stages and OUT for the last one."""
    last = len(stages) - 1
    return [out / str(s.name) if i < last else out for i, s in enumerate(stages)]


# ---- resolving inputs --------------------------------------------------------------------------


def resolve_inputs(
    stages: Sequence[Stage], source: str, allow_pickle: bool, headers_only: bool = False
) -> dict[str, ModelSource]:
    """Every reference that is not a stage name -> its files; RecipeError naming each missing
    one with its YAML path (nothing has been written yet). headers_only (a dry run): hub models
    are planned from their safetensors headers, fetched with range requests."""
    found: dict[str, ModelSource] = {}
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    for stage in stages:
        for ref, paths in stage.ref_paths().items():
            if ref in names or ref in found:
                continue
            try:
                found[ref] = resolve(ref, allow_pickle=allow_pickle, headers_only=headers_only)
            except UsageError as e:
                problems += [(stage.label + p, str(e)) for p in paths]
        if stage.name:
            names.add(stage.name)
    if problems:
        raise RecipeError(source, problems)
    return found


class PlannedCheckpoint(Checkpoint):
    """Headers of a stage output that a dry run has planned but not written."""

    def __init__(self, plan: StagePlan, path: Path, dtype: torch.dtype | None):
        self.source = ModelSource(str(path), path, ())
        base_config = (plan.aux_from.config if plan.aux_from else None) or {}
        self.config = {**base_config, **plan.config_updates}
        self.metadata = {}
        self._files, self._pickled = {}, {}
        self._infos = {}
        for p in plan.tensors:
            dt = out_dtype(p.job, OutputSpec(path, dtype))
            nbytes = math.prod(p.job.shape) * torch.empty((), dtype=dt).element_size()
            self._infos[p.job.name] = TensorInfo(p.job.name, p.job.shape, dt, path, 0, nbytes)
        if self.config.get("tie_word_embeddings") and "lm_head.weight" in self._infos:
            self.config["tie_word_embeddings"] = False
        # a later stage's union vocabulary or chat_template: auto reads this stage's tokenizer
        self.planned_tokenizer = plan.tokenizer.tokenizer if plan.tokenizer else None
        if self.planned_tokenizer is None and plan.aux_from is not None:
            self.planned_tokenizer = getattr(plan.aux_from, "planned_tokenizer", None)


# ---- one stage ---------------------------------------------------------------------------------


def make_compute(plan: StagePlan, seed: int) -> Compute:
    """compute(job, xs) for the engine: xs are the job's sources, base first when it has one."""
    by_name = {p.job.name: p for p in plan.tensors}
    method = plan.method
    min_keep = 0 if plan.stage.recipe.topk_count == "floor" else 1  # mergekit's: at least one
    remaps = vocab_remaps(plan)

    def compute(job: TensorJob, xs: list[Tensor]) -> list[Tensor]:
        p = by_name[job.name]
        if job.name in remaps:  # each input's rows -> one row per union token
            perms, base_at = remaps[job.name]
            xs = remap_rows(xs, perms, base_at, job.shape[0])
        base, models = (xs[0], xs[1:]) if p.has_base else (None, xs)
        ctx = TensorContext(job.name, p.model_ids, seed, min_keep=min_keep)
        return [method.run(ctx, models, base, list(p.model_params), p.global_params)]

    def blocked(job: TensorJob, stream: BlockStream, n: int) -> Iterator[list[Tensor]] | None:
        if job.name in remaps:
            return None  # a union vocabulary gathers rows from anywhere: whole tensors
        p = by_name[job.name]
        ctx = TensorContext(job.name, p.model_ids, seed, min_keep=min_keep)
        mps, gps = list(p.model_params), p.global_params
        return merge_blocks(method, ctx, job.shape, stream, p.has_base, mps, gps, n)

    def fused(job: TensorJob, pieces: Pieces) -> list[Elementwise] | None:
        if job.name in remaps:
            return None
        p = by_name[job.name]
        mps, gps = list(p.model_params), p.global_params
        spec = elementwise_form(method, p.has_base, mps, gps, pieces)
        return None if spec is None else [spec]

    compute.blocked = blocked  # type: ignore[attr-defined]  # large tensors in row blocks
    compute.fused = fused  # type: ignore[attr-defined]  # row-local blends in one pass
    return compute


def vocab_remaps(plan: StagePlan) -> dict[str, tuple[list[Tensor], int | None]]:
    """Vocabulary tensor name -> (each source's permutation, the base's position in the
    sources or None) for a union vocabulary; empty otherwise."""
    tok = plan.tokenizer
    if tok is None or tok.size is None:
        return {}
    out = {}
    for p in plan.tensors:
        if p.job.name in tok.vocab_names:
            refs = [plan.refs[i] for i, _ in p.job.sources]
            base_at = next((k for k, r in enumerate(refs) if r == tok.base_ref), None)
            out[p.job.name] = ([tok.permutations[r] for r in refs], base_at)
    return out


def stage_dtype(stage: Stage, opts: MergeOptions) -> torch.dtype | None:
    """--dtype, else the recipe's out_dtype, else its dtype, else the inputs' dtype."""
    return opts.write.dtype or parse_dtype(stage.recipe.out_dtype or stage.recipe.dtype)


def shard_size(stage: Stage, opts: MergeOptions) -> int:
    return opts.max_shard_size or stage.max_shard_size or DEFAULT_MAX_SHARD


def resolved_recipe(stage: Stage, plan: StagePlan) -> str:
    """The stage's recipe as YAML (defaults filled in), with the resolved inputs as comments."""
    lines = [f"# resolved by rlmerge {__version__}; inputs:"]
    for ref, ckpt in zip(plan.refs, plan.inputs, strict=True):
        lines.append(f"#   {ref} -> {ckpt.source.identity}")
    return "\n".join(lines) + "\n" + recipe_body(stage)


def recipe_body(stage: Stage) -> str:
    data = stage.recipe.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)


def run_stage(plan: StagePlan, target: Path, opts: MergeOptions, force: bool) -> RunSummary:
    stage = plan.stage
    dtype = stage_dtype(stage, opts)
    wopts = replace(opts.write, dtype=dtype)
    names = [p.job.name for p in plan.tensors]
    title = f"{stage.method.name} merge" + (f" ({stage.name})" if stage.name else "")
    recipe = resolved_recipe(stage, plan)
    spec = output_spec(target, plan.inputs, plan.aux_from, wopts, title, names, recipe=recipe)
    spec.config_updates.update(plan.config_updates)
    if plan.tokenizer is not None:
        spec.tokenizer_files = tokenizer_files(plan.tokenizer.tokenizer)
    spec.metadata["rlmerge_recipe"] = recipe  # in the weights too: a single file has no folder
    run = replace(opts.write.run, max_shard_size=shard_size(stage, opts), force=force)
    compute = make_compute(plan, stage.recipe.seed)
    label = f"merging {stage.name}" if stage.name else "merging"
    return run_jobs(plan.inputs, plan.jobs(), compute, [spec], run, label)


# ---- the pipeline ------------------------------------------------------------------------------


@contextmanager
def _opened(
    stage: Stage,
    sources: dict[str, ModelSource],
    planned: dict[str, Checkpoint],
) -> Iterator[dict[str, Checkpoint]]:
    """Reference -> checkpoint for one stage: earlier stage outputs first, then files."""
    with ExitStack() as stack:
        ckpts: dict[str, Checkpoint] = {}
        for ref in stage.refs():
            if ref in planned:
                ckpts[ref] = planned[ref]
            else:
                ckpts[ref] = stack.enter_context(Checkpoint(sources[ref]))
        yield ckpts


def _check_outputs(
    stages: Sequence[Stage], outs: Sequence[Path], sources: dict[str, ModelSource], force: bool
) -> None:
    files = list(sources.values())
    if len(stages) == 1:
        check_output_path(outs[0], files, force)
        return
    for p in outs:  # a pipeline owns OUT and its stage folders: only overlaps are refused
        check_output_path(p, files, force=True)
    root = outs[-1]
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"output '{root}' is a file; a pipeline writes a folder.")
    if root.is_dir() and not force and any(root.iterdir()):
        # an earlier run of a pipeline left its recipe or a stage folder there; else refuse
        ours = (root / RECIPE_FILE).is_file() or any((root / str(s.name)).is_dir() for s in stages)
        if not ours:
            raise OutputExistsError(
                f"output '{root}' exists and was not written by an rlmerge pipeline. Pass "
                "--force to replace it, or choose another path."
            )


def reusable(stage: Stage, out: Path, pipeline: bool, force: bool, remade: set[str]) -> bool:
    """A pipeline stage's existing output is reused when it is complete, was made by the same
    recipe (its saved rlmerge_recipe.yaml), and no stage it reads is being merged again."""
    if not pipeline or force or not output_is_complete(out) or remade & set(stage.refs()):
        return False
    saved = out / RECIPE_FILE
    return saved.is_file() and _body(saved.read_text()) == recipe_body(stage)


def _body(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def prepare(
    recipe_path: str | Path, out: Path, opts: MergeOptions, headers_only: bool = False
) -> tuple[list[Stage], list[Path], dict[str, ModelSource]]:
    """Validate the recipe, resolve every input and check the outputs, before any writing."""
    stages = load_recipe(recipe_path)
    sources = resolve_inputs(stages, str(recipe_path), opts.write.allow_pickle, headers_only)
    outs = stage_outputs(stages, out)
    _check_outputs(stages, outs, sources, opts.write.run.force)
    return stages, outs, sources


def merge_file(recipe_path: str | Path, out: Path, opts: MergeOptions) -> list[StageResult]:
    """Run every stage of a recipe file; return what each stage did."""
    stages, outs, sources = prepare(recipe_path, Path(out), opts)
    source, force = str(recipe_path), opts.write.run.force
    results: list[StageResult] = []
    done: dict[str, Checkpoint] = {}
    remade: set[str] = set()  # stages merged in this run: the stages reading them rerun too
    pipeline = len(stages) > 1
    with ExitStack() as stack:
        for i, (stage, path) in enumerate(zip(stages, outs, strict=True)):
            last = i == len(stages) - 1
            if reusable(stage, path, pipeline, force, remade):
                results.append(StageResult(stage.name, str(path), "skipped"))
            else:
                remade.add(stage.name or "")
                with _opened(stage, sources, done) as ckpts:
                    plan = plan_stage(stage, ckpts, source)
                    target = path / FINAL_STAGING if last and pipeline else path
                    summary = run_stage(plan, target, opts, force or pipeline)
                if target != path:
                    publish(target, path)
                results.append(StageResult(stage.name, str(path), "merged", summary.to_dict()))
            if stage.name and not last:
                done[stage.name] = stack.enter_context(Checkpoint(resolve(str(path))))
    return results


def publish(staging: Path, out: Path) -> None:
    """Move a finished output from `staging` into `out` (which holds the stage folders):
    weights last, so that `out` counts as complete only once everything is in place."""
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.index.json")):
        old.unlink()
    items = sorted(staging.iterdir(), key=lambda p: (p.suffix == ".safetensors", "index" in p.name))
    for item in items:
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staging.rmdir()


# ---- dry run -----------------------------------------------------------------------------------


def plan_file(recipe_path: str | Path, out: Path, opts: MergeOptions) -> dict[str, Any]:
    """What `merge_file` would do, as a JSON-able dict; reads headers only, writes nothing."""
    stages, outs, sources = prepare(recipe_path, Path(out), opts, headers_only=True)
    source, force = str(recipe_path), opts.write.run.force
    described: list[dict[str, Any]] = []
    done: dict[str, Checkpoint] = {}
    remade: set[str] = set()
    with ExitStack() as stack:
        for i, (stage, path) in enumerate(zip(stages, outs, strict=True)):
            skip = reusable(stage, path, len(stages) > 1, force, remade)
            if not skip:
                remade.add(stage.name or "")
            with _opened(stage, sources, done) as ckpts:
                plan = plan_stage(stage, ckpts, source)
                described.append(describe(plan, path, opts, "skip" if skip else "merge"))
            if stage.name and i < len(stages) - 1:
                if skip:
                    done[stage.name] = stack.enter_context(Checkpoint(resolve(str(path))))
                else:
                    done[stage.name] = PlannedCheckpoint(plan, path, stage_dtype(stage, opts))
    return {"recipe": source, "output": str(out), "stages": described}


def describe(plan: StagePlan, out: Path, opts: MergeOptions, action: str) -> dict[str, Any]:
    """One stage's plan: inputs, per-tensor method and values, shards, bytes, peak memory."""
    stage = plan.stage
    method = plan.method
    dtype = stage_dtype(stage, opts)
    spec = OutputSpec(out, dtype)
    tensors = []
    for p in plan.tensors:
        gp = method.global_params.model_validate(p.global_params).model_dump(by_alias=True)
        mps = [
            method.model_params.model_validate(m).model_dump(by_alias=True) for m in p.model_params
        ]
        tensors.append(
            {
                "name": p.job.name,
                "method": method.name,
                "shape": list(p.job.shape),
                "dtype": dtype_name(out_dtype(p.job, spec)),
                "depth": round(p.t, 6),
                "sources": [[plan.refs[i], name] for i, name in p.job.sources],
                "base": p.has_base,
                "global_params": gp,
                "model_params": dict(zip(p.model_ids, mps, strict=True)),
            }
        )
    entries = [(p.job.name, p.job.shape, out_dtype(p.job, spec)) for p in plan.tensors]
    shards = plan_shards(entries, shard_size(stage, opts))
    return {
        "name": stage.name,
        "action": action,
        "output": str(out),
        "method": method.name,
        "seed": stage.recipe.seed,
        "dtype": dtype_name(dtype) if dtype else "as inputs",
        "inputs": [
            {"ref": r, "resolved": c.source.identity, "revision": c.source.revision}
            for r, c in zip(plan.refs, plan.inputs, strict=True)
        ],
        "config_from": plan.aux_from.source.ref if plan.aux_from else None,
        "config_updates": plan.config_updates,
        "tokenizer": describe_tokenizer(plan),
        "tensors": tensors,
        "shards": [
            {"file": s.filename, "tensors": len(s.entries), "bytes": s.nbytes} for s in shards
        ],
        "bytes": sum(s.nbytes for s in shards),
        "peak_memory_bytes": plan.peak_memory_bytes(),
    }


def describe_tokenizer(plan: StagePlan) -> dict[str, Any]:
    """Where the output tokenizer comes from; for a union: its size and the added tokens."""
    tok = plan.tokenizer
    if tok is None:
        return {"source": plan.aux_from.source.ref if plan.aux_from else None, "copied": True}
    template = tok.chat_template
    kind = template if template in (*CHAT_TEMPLATES, "auto", None) else "jinja"
    out: dict[str, Any] = {"source": tok.source, "copied": False, "chat_template": kind}
    if tok.size is not None:
        tokens = len(tok.permutations[tok.base_ref])
        base_rows = int((tok.permutations[tok.base_ref] >= 0).sum())
        out.update(vocab_size=tok.size, tokens=tokens, base=tok.base_ref)
        out.update(added_tokens=tokens - base_rows, padding_rows=tok.size - tokens)
    return out
