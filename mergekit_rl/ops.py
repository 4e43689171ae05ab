"""Whole-model weight operations: soups, interpolation sweeps and task vectors.

Each operation opens its inputs, checks them, builds one `compute` function out of the merge
method registry (the same functions `rlmerge merge` recipes use) and hands it to the streaming
engine. Nothing here does tensor math of its own.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .engine import (
    Fused,
    OutputSpec,
    Pieces,
    RunOptions,
    RunSummary,
    TensorJob,
    identity_jobs,
    rowwise,
    run_jobs,
)
from .errors import RunError, UsageError
from .io.card import model_card, provenance
from .io.reader import TIED_METADATA_KEY, Checkpoint, check_compatible, open_checkpoint
from .io.writer import AtomicDir, check_output_path
from .merge.blend import Elementwise
from .merge.blocks import elementwise_form
from .merge.registry import MergeMethod, TensorContext, get_method

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
    notes: str = "",
) -> OutputSpec:
    """An output with config/tokenizer from `aux_from`, a model card and provenance metadata."""
    updates = {}
    if aux_from is not None and aux_from.tied_output_name in names:
        updates["tie_word_embeddings"] = False  # an untied twin made the output store lm_head
    tied = {c.tied_output_name for c in inputs} - {None}
    if aux_from is not None and not aux_from.tied_embeddings and tied and not tied & set(names):
        updates["tie_word_embeddings"] = True  # the config's source stores lm_head, we do not
    single = path.suffix == ".safetensors"
    return OutputSpec(
        path=path,
        dtype=opts.dtype,
        single_file=single,
        aux_from=aux_from,
        config_updates=updates,
        card=model_card(title, opts.command, inputs, opts.dtype, recipe=recipe, notes=notes),
        metadata={**provenance(opts.command, inputs), **(metadata or {})},
        extra_files={"rlmerge_recipe.yaml": recipe} if recipe else {},
    )


def _linear(weights: Sequence[float], normalize: bool):
    """compute(job, xs) for sum_i w_i x_i through the registry's linear method; the same
    blend declared for the engine's fused pass."""
    method = get_method("linear")
    per_model = [{"weight": float(w)} for w in weights]

    def compute(job: TensorJob, xs: list[Tensor]) -> list[Tensor]:
        ctx = TensorContext(job.name, tuple(str(i) for i in range(len(xs))))
        return [method.run(ctx, xs, None, per_model, {"normalize": normalize})]

    # elementwise: large tensors may go through in row blocks, or one fused pass
    return rowwise(compute, _linear_blend(method, per_model, normalize))


def _linear_blend(method: MergeMethod, per_model: list[dict[str, Any]], normalize: bool) -> Fused:
    """The fused form of a linear compute: one blend per job, None where the method would
    raise (weights summing to zero under normalize)."""

    def fused(job: TensorJob, pieces: Pieces) -> list[Elementwise] | None:
        spec = elementwise_form(method, False, per_model, {"normalize": normalize}, pieces)
        return None if spec is None else [spec]

    return fused


def soup(
    models: Sequence[str | Path],
    out: Path,
    weights: Sequence[float] | None = None,
    opts: WriteOptions = WriteOptions(),
    tokenizer_source: int = 0,
    notes: str = "",
) -> RunSummary:
    """Uniform or weighted (normalised) average of models: a model soup / SALSA reference.

    `notes`: markdown added to the model card (a greedy soup's selection record)."""
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
        spec = output_spec(
            out, ckpts, ckpts[tokenizer_source], opts, "Model soup", names, notes=notes
        )
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
    tokenizer_source: int = 0,
) -> RunSummary:
    """theta(a) = (1 - a) * SFT + a * RLHF (or slerp), every alpha in one read pass.

    One alpha writes OUT; several write OUT/alpha-<a> each, and OUT as a whole is one atomic
    output (all alphas or none; an existing OUT is replaced as a whole with --force). Config and
    tokenizer come from input `tokenizer_source` (0: SFT, 1: RLHF).
    """
    if not alphas:
        raise UsageError("--alpha needs at least one value.")
    if method not in ("lerp", "slerp"):
        raise UsageError(f"--method '{method}' is unknown: use lerp or slerp.")
    if len(set(alphas)) != len(alphas):
        raise UsageError(f"--alpha lists a value twice: {list(alphas)}.")
    folders: dict[str, float] = {}
    for a in alphas if len(alphas) > 1 else ():
        if (twin := folders.setdefault(alpha_dirname(a), a)) != a:
            raise UsageError(
                f"--alpha {twin!r} and {a!r} would both be written to "
                f"{out / alpha_dirname(a)} (folder names keep 6 significant digits); give "
                "alphas that differ within 6 digits."
            )
    with open_inputs([sft, rlhf], opts.allow_pickle) as ckpts:
        check_output_path(out, [c.source for c in ckpts], opts.run.force)
        names = check_compatible(ckpts)
        compute = _interpolation(alphas, method)
        jobs = identity_jobs(ckpts[0], names, 2)

        def specs(paths: Sequence[Path]) -> list[OutputSpec]:
            return [
                output_spec(
                    p,
                    ckpts,
                    ckpts[tokenizer_source],
                    opts,
                    f"Interpolation alpha={a:g} ({method})",
                    names,
                )
                for p, a in zip(paths, alphas, strict=True)
            ]

        if len(alphas) == 1:
            return run_jobs(ckpts, jobs, compute, specs([out]), opts.run, "interpolate")
        with AtomicDir(out, opts.run.force) as staging:  # alpha folders inside its temp dir
            inner = [staging.tmp / alpha_dirname(a) for a in alphas]
            try:
                summary = run_jobs(ckpts, jobs, compute, specs(inner), opts.run, "interpolate")
            except RunError as e:  # name the output the user asked for, not the temp folder
                raise RunError(str(e).replace(str(staging.tmp), str(staging.out))) from e
        summary.outputs = [str(out / alpha_dirname(a)) for a in alphas]
        return summary


def _interpolation(alphas: Sequence[float], method: str):
    if method == "lerp":
        lerps = [_linear([1.0 - a, a], normalize=False) for a in alphas]

        def fused(job: TensorJob, pieces: Pieces) -> list[Elementwise] | None:
            specs = [f.fused(job, pieces) for f in lerps]  # type: ignore[attr-defined]
            return None if None in specs else [s[0] for s in specs]

        return rowwise(lambda job, xs: [f(job, xs)[0] for f in lerps], fused)
    slerp = get_method("slerp")

    def compute(job: TensorJob, xs: list[Tensor]) -> list[Tensor]:
        ctx = TensorContext(job.name, ("rlhf",))
        return [slerp.run(ctx, [xs[1]], xs[0], [{}], {"t": a}) for a in alphas]

    return compute


def extract_task_vector(
    base: str | Path, finetuned: str | Path, out: Path, opts: WriteOptions = WriteOptions()
) -> RunSummary:
    """tau = finetuned - base, saved as safetensors whose metadata names the base.

    Lossless by default: tau is stored in float32 when the inputs are narrower (the difference
    of two bf16 or fp16 numbers needs more mantissa than they have), so that applying it at
    scale 1 gives the fine-tuned weights back bit for bit. `opts.dtype` picks another on purpose.
    The metadata records a tied embedding pair, since a bare .safetensors has no config.json.
    """
    with open_inputs([base, finetuned], opts.allow_pickle) as ckpts:
        check_output_path(out, [c.source for c in ckpts], opts.run.force)
        names = check_compatible(ckpts)
        meta = {
            "rlmerge_kind": TV_KIND,
            "rlmerge_base": ckpts[0].source.identity,
            "rlmerge_finetuned": ckpts[1].source.identity,
        }
        tied = ckpts[0].tied_pair
        if tied is not None and tied[0] not in names:  # both tied: tau has no lm_head either
            meta[TIED_METADATA_KEY] = json.dumps(list(tied))
        opts = replace(opts, dtype=opts.dtype or _lossless_dtype(ckpts, names))
        spec = output_spec(out, ckpts, None, opts, "Task vector", names, metadata=meta)
        jobs = identity_jobs(ckpts[0], names, 2)
        difference = _linear([-1.0, 1.0], False)
        if opts.dtype == torch.float64:  # float32 inputs: subtract in float64, exactly
            compute = lambda job, xs: difference(job, [x.double() for x in xs])  # noqa: E731
        else:
            compute = difference
        return run_jobs(ckpts, jobs, compute, [spec], opts.run, "extract")


def _lossless_dtype(ckpts: Sequence[Checkpoint], names: Sequence[str]) -> torch.dtype:
    """The narrowest float dtype that holds x - b exactly (in all but extreme cases): float32
    when every floating input is 16-bit or narrower, else float64.

    x - b of two bf16 (fp16) numbers is exact in float32 unless their exponents differ by more
    than 16 (13) binades; of two float32 numbers, in float64 unless they differ by more than 29.
    Where tau is exact, applying it to b gives x back bit for bit (the engine adds in the wider
    dtype). A larger gap (x far smaller than b: measured 1 entry in 107,200 of a tiny bf16
    family) can give x back only within float32 rounding of b; `--dtype float64` is exact there
    too (up to a 45-binade gap for bf16), at twice the size.
    """
    widths = {
        c.info(n).dtype.itemsize for c in ckpts for n in names if c.info(n).dtype.is_floating_point
    }
    return torch.float32 if widths and max(widths) <= 2 else torch.float64


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
