"""Whole-model weight operations: soups, interpolation sweeps and task vectors.

Each operation opens its inputs, checks them, builds one `compute` function out of the merge
method registry (the same functions `rlmerge merge` recipes use) and hands it to the streaming
engine. Nothing here does tensor math of its own.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .engine import (
    OutputSpec,
    RunOptions,
    RunSummary,
    TensorJob,
    identity_jobs,
    rowwise,
    run_jobs,
)
from .errors import UsageError
from .io.card import model_card, provenance
from .io.reader import TIED_PAIR, Checkpoint, check_compatible, open_checkpoint
from .io.writer import check_output_path
from .merge.registry import TensorContext, get_method

TV_KIND = "task_vector"


@dataclass(frozen=True)
class WriteOptions:
    """What every writing command shares: the engine options plus output choices."""

    run: RunOptions = RunOptions()
    dtype: torch.dtype | None = None
    allow_pickle: bool = False
    command: str = ""  # the exact command line or recipe, for the model card


@contextlib.contextmanager
def open_inputs(refs: Sequence[str | Path], allow_pickle: bool) -> Iterator[list[Checkpoint]]:
    ckpts: list[Checkpoint] = []
    try:
        for ref in refs:
            ckpts.append(open_checkpoint(ref, allow_pickle=allow_pickle))
        yield ckpts
    finally:
        for c in ckpts:
            c.close()


def output_spec(
    path: Path,
    inputs: Sequence[Checkpoint],
    aux_from: Checkpoint | None,
    opts: WriteOptions,
    title: str,
    names: Sequence[str],
    metadata: dict[str, str] | None = None,
    recipe: str | None = None,
) -> OutputSpec:
    """An output with config/tokenizer from `aux_from`, a model card and provenance metadata."""
    updates = {}
    if aux_from is not None and aux_from.tied_embeddings and TIED_PAIR[0] in names:
        updates["tie_word_embeddings"] = False  # an untied twin made the output store lm_head
    single = path.suffix == ".safetensors"
    return OutputSpec(
        path=path,
        dtype=opts.dtype,
        single_file=single,
        aux_from=aux_from,
        config_updates=updates,
        card=model_card(title, opts.command, inputs, opts.dtype, recipe=recipe),
        metadata={**provenance(opts.command, inputs), **(metadata or {})},
        extra_files={"rlmerge_recipe.yaml": recipe} if recipe else {},
    )


def _linear(weights: Sequence[float], normalize: bool):
    """compute(job, xs) for sum_i w_i x_i through the registry's linear method."""
    method = get_method("linear")
    per_model = [{"weight": float(w)} for w in weights]

    def compute(job: TensorJob, xs: list[Tensor]) -> list[Tensor]:
        ctx = TensorContext(job.name, tuple(str(i) for i in range(len(xs))))
        return [method.run(ctx, xs, None, per_model, {"normalize": normalize})]

    return rowwise(compute)  # elementwise: large tensors may go through in row blocks


def soup(
    models: Sequence[str | Path],
    out: Path,
    weights: Sequence[float] | None = None,
    opts: WriteOptions = WriteOptions(),
    tokenizer_source: int = 0,
) -> RunSummary:
    """Uniform or weighted (normalised) average of models: a model soup / SALSA reference."""
    if len(models) < 2:
        raise UsageError("a soup needs at least two models.")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise UsageError(f"--weights has {len(weights)} values for {len(models)} models.")
    if abs(sum(weights)) < 1e-12:
        raise UsageError(f"--weights {weights} sum to zero: the soup cannot be normalised.")
    with open_inputs(models, opts.allow_pickle) as ckpts:
        check_output_path(out, [c.source for c in ckpts], opts.run.force)
        names = check_compatible(ckpts)
        spec = output_spec(out, ckpts, ckpts[tokenizer_source], opts, "Model soup", names)
        jobs = identity_jobs(ckpts[0], names, len(ckpts))
        return run_jobs(ckpts, jobs, _linear(weights, normalize=True), [spec], opts.run, "soup")


def alpha_dirname(alpha: float) -> str:
    return f"alpha-{alpha:g}"


def interpolate(
    sft: str | Path,
    rlhf: str | Path,
    out: Path,
    alphas: Sequence[float],
    method: str = "lerp",
    opts: WriteOptions = WriteOptions(),
) -> RunSummary:
    """theta(a) = (1 - a) * SFT + a * RLHF (or slerp), every alpha in one read pass.

    One alpha writes OUT; several write OUT/alpha-<a> each.
    """
    if not alphas:
        raise UsageError("--alpha needs at least one value.")
    if method not in ("lerp", "slerp"):
        raise UsageError(f"--method '{method}' is unknown: use lerp or slerp.")
    if len(set(alphas)) != len(alphas):
        raise UsageError(f"--alpha lists a value twice: {list(alphas)}.")
    paths = [out] if len(alphas) == 1 else [out / alpha_dirname(a) for a in alphas]
    with open_inputs([sft, rlhf], opts.allow_pickle) as ckpts:
        for p in paths:
            check_output_path(p, [c.source for c in ckpts], opts.run.force)
        names = check_compatible(ckpts)
        specs = [
            output_spec(p, ckpts, ckpts[0], opts, f"Interpolation alpha={a:g} ({method})", names)
            for p, a in zip(paths, alphas, strict=True)
        ]
        compute = _interpolation(alphas, method)
        jobs = identity_jobs(ckpts[0], names, 2)
        return run_jobs(ckpts, jobs, compute, specs, opts.run, "interpolate")


def _interpolation(alphas: Sequence[float], method: str):
    if method == "lerp":
        lerps = [_linear([1.0 - a, a], normalize=False) for a in alphas]
        return rowwise(lambda job, xs: [f(job, xs)[0] for f in lerps])
    slerp = get_method("slerp")

    def compute(job: TensorJob, xs: list[Tensor]) -> list[Tensor]:
        ctx = TensorContext(job.name, ("rlhf",))
        return [slerp.run(ctx, [xs[1]], xs[0], [{}], {"t": a}) for a in alphas]

    return compute


def extract_task_vector(
    base: str | Path, finetuned: str | Path, out: Path, opts: WriteOptions = WriteOptions()
) -> RunSummary:
    """tau = finetuned - base, saved as safetensors whose metadata names the base."""
    with open_inputs([base, finetuned], opts.allow_pickle) as ckpts:
        check_output_path(out, [c.source for c in ckpts], opts.run.force)
        names = check_compatible(ckpts)
        meta = {
            "rlmerge_kind": TV_KIND,
            "rlmerge_base": ckpts[0].source.identity,
            "rlmerge_finetuned": ckpts[1].source.identity,
        }
        spec = output_spec(out, ckpts, None, opts, "Task vector", names, metadata=meta)
        jobs = identity_jobs(ckpts[0], names, 2)
        return run_jobs(ckpts, jobs, _linear([-1.0, 1.0], False), [spec], opts.run, "extract")


def apply_task_vectors(
    base: str | Path,
    task_vectors: Sequence[str | Path],
    out: Path,
    scales: Sequence[float] | None = None,
    opts: WriteOptions = WriteOptions(),
) -> RunSummary:
    """theta = base + sum_i scale_i * tau_i (a negative scale negates a task vector)."""
    if not task_vectors:
        raise UsageError("give at least one task vector.")
    scales = list(scales) if scales is not None else [1.0] * len(task_vectors)
    if len(scales) != len(task_vectors):
        raise UsageError(f"--scale has {len(scales)} values for {len(task_vectors)} task vectors.")
    with open_inputs([base, *task_vectors], opts.allow_pickle) as ckpts:
        check_output_path(out, [c.source for c in ckpts], opts.run.force)
        _warn_other_base(ckpts[0], ckpts[1:])
        names = check_compatible(ckpts)
        spec = output_spec(out, ckpts, ckpts[0], opts, "Base plus task vectors", names)
        jobs = identity_jobs(ckpts[0], names, len(ckpts))
        compute = _linear([1.0, *scales], normalize=False)
        return run_jobs(ckpts, jobs, compute, [spec], opts.run, "apply")


def _warn_other_base(base: Checkpoint, tvs: Sequence[Checkpoint]) -> None:
    for tv in tvs:
        recorded = tv.metadata.get("rlmerge_base")
        if tv.metadata.get("rlmerge_kind") != TV_KIND:
            warnings.warn(
                f"'{tv.source.ref}' has no task-vector metadata (not written by "
                "`rlmerge task-vector extract`); applying it as a task vector anyway.",
                stacklevel=3,
            )
        elif recorded != base.source.identity:
            warnings.warn(
                f"task vector '{tv.source.ref}' was extracted against base '{recorded}', but is "
                f"applied to '{base.source.ref}'.",
                stacklevel=3,
            )
