"""The streaming engine: compute output tensors one at a time and write them as they come.

A run is a list of `TensorJob`s (which input tensors each output tensor needs) and one
`compute` function mapping those inputs to one tensor per output. Inputs are read one tensor
at a time in input storage order, the math runs in float32 on `device`, and each result is
appended to its atomic writer. Peak memory is about (inputs + outputs + 1) x the largest tensor
in float32, whatever the model size.

Tensors larger than `RunOptions.block_elems` entries (a 256k-vocabulary embedding) go through
in row blocks when the compute says how (`compute.blocked`, see `rowwise`): inputs are read a
block of rows at a time and each block's result is written as it comes, so peak memory follows
the block size, not the vocabulary. Results equal the whole-tensor ones bit for bit. Every
built-in method streams (all but nuslerp over columns, and a union vocabulary's remapped rows):
cuts, L1 norms, slerp angles and Gram matrices come from first passes over the blocks
(`merge.blocks`).

Each input's read, its compute copy and each output's cast go into buffers the run reuses
(`BufferPool`), so a job does not fault in fresh pages for them.

Row-local blends (soups, lerp, task vectors applied or extracted, and the linear,
task_arithmetic and slerp recipes) declare their math as `blend.Elementwise`s
(`rowwise(compute, fused)`): on the host, the engine hands the stored bf16/float32 inputs to
`blend.blend_into`, one C pass per block that converts, checks, merges and casts into the
output buffer, with torch's bits. Everything else (accelerators, other dtypes, no compiler,
RLMERGE_NATIVE=0) takes the float32 path below.

On CUDA, safetensors inputs are read as one row range into pinned host buffers and copied
asynchronously in their stored dtype; the cast to float32 runs on the device. Every read, whole,
in blocks or for the device, goes through the Checkpoint (`read` / `read_rows`), which merges a
BASE+ADAPTER's update: the device changes the speed, never the values
(`RunOptions.device_reads` runs the device's read path on the CPU, for tests).

Outputs are checked for NaN and Inf after the cast to the output dtype, so that a value that
overflows it (1e5 in float16) is an error naming the tensor, and nothing is written.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import RunError, UsageError
from .io.card import write_aux_files
from .io.reader import Checkpoint, all_finite, warn_non_finite
from .io.safetensors_format import DTYPE_NAMES, TensorInfo
from .io.writer import DEFAULT_MAX_SHARD, CheckpointWriter, Deferred, Entry
from .merge import blend
from .progress import make_reporter


@dataclass(frozen=True)
class TensorJob:
    name: str  # output tensor name
    sources: tuple[tuple[int, str], ...]  # (input index, input tensor name), in compute order
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the (first) input: the default output dtype


# compute(job, inputs) -> one tensor per output; inputs are float32 on the run's device
Compute = Callable[[TensorJob, list[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class Block:
    start: int  # first row (along dim 0) of the block
    stop: int  # one past its last row
    offset: int  # flat index of the block's first entry in the whole tensor


# A job's inputs in row blocks: each call yields (block, float32 inputs on the device), in order.
BlockStream = Callable[[], Iterator[tuple[Block, list[Tensor]]]]
# compute.blocked(job, stream, n_blocks) -> an iterator of results (one tensor per output, the
# rows of that block) per block of stream() (n_blocks of them), or None when this job must be
# computed whole. It may call stream() more than once (a pass for a global threshold first).
Blocked = Callable[[TensorJob, BlockStream, int], Iterator[list[Tensor]] | None]
# compute.fused(job, pieces) -> one blend.Elementwise per output when the job's merge is a
# row-local blend, else None (decided before reading anything). pieces() yields the job's
# inputs as stored (whole, or row blocks in order) for a first pass: slerp's angle.
Pieces = Callable[[], Iterator[list[Tensor]]]
Fused = Callable[[TensorJob, Pieces], list[blend.Elementwise] | None]

# tensors with more entries than this go through in row blocks of about this many entries
# (64 MB in float32), when the compute supports it
DEFAULT_BLOCK_ELEMS = 1 << 24


class BufferPool:
    """Reusable buffers owned by one run: a flat byte buffer per slot (input k's float32 copy,
    output k's cast), grown to the largest request and handed out as views.

    A fresh tensor costs the kernel a zeroed page per 4 KiB on first touch and an unmap when
    freed, several times the conversion that fills it; a slot's pages are faulted in once per
    run. Peak memory does not grow: a slot holds one tensor of its role, which the run held
    anyway at its largest job. On accelerators the same calls reuse device buffers (the
    caching allocator would too). A view is valid until its slot is taken again: callers
    consume it (merge it, write it) before the next job or block is read.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, int, torch.device], Tensor] = {}

    def take(
        self, role: str, k: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """An uninitialised tensor of shape and dtype on device, in slot (role, k)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        key = (role, k, torch.device(device))
        buf = self._slots.get(key)
        if buf is None or buf.numel() < nbytes:
            self._slots.pop(key, None)  # free the smaller buffer before the larger one
            buf = self._slots[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def cast(self, t: Tensor, dtype: torch.dtype, k: int) -> Tensor:
        """t as dtype: t itself when it has it, else a copy in slot ("out", k)."""
        if t.dtype == dtype:
            return t
        return self.take("out", k, t.shape, dtype, t.device).copy_(t)


def rowwise(compute: Compute, fused: Fused | None = None) -> Compute:
    """Mark `compute` as row-local: each row of a result depends only on the same row of the
    inputs (elementwise math: soups, lerp, task arithmetic), so the engine may run it on row
    blocks of large tensors and concatenate. `fused`: the same math as `blend.Elementwise`s,
    which the engine runs in one pass over the stored inputs where the host kernel serves
    them. Returns compute, with `blocked` (and `fused`) set."""

    def blocked(job: TensorJob, stream: BlockStream, n_blocks: int) -> Iterator[list[Tensor]]:
        return (compute(job, xs) for _, xs in stream())

    compute.blocked = blocked  # type: ignore[attr-defined]
    if fused is not None:
        compute.fused = fused  # type: ignore[attr-defined]
    return compute


@dataclass
class OutputSpec:
    path: Path
    dtype: torch.dtype | None = None  # None: the inputs' dtype
    single_file: bool = False  # write one .safetensors file instead of a checkpoint directory
    aux_from: Checkpoint | None = None  # config / tokenizer source
    config_updates: dict[str, Any] = field(default_factory=dict)
    card: str | None = None  # README.md model card
    extra_files: dict[str, str] = field(default_factory=dict)
    tokenizer_files: dict[str, bytes] | None = None  # written instead of aux_from's tokenizer
    metadata: dict[str, str | Deferred] = field(default_factory=dict)  # Deferred: at commit


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    max_shard_size: int = DEFAULT_MAX_SHARD
    force: bool = False
    progress: str = "auto"  # auto | plain | none
    block_elems: int = DEFAULT_BLOCK_ELEMS  # row-block larger tensors (see `rowwise`)
    # read whole tensors as one row range, as for CUDA (pinned there): None = on CUDA only;
    # True runs that read path on the CPU (tests), False never
    device_reads: bool | None = None


@dataclass
class RunSummary:
    outputs: list[str]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / 'float16' / 'fp16' / 'float32' / 'fp32' / 'float64' -> torch dtype."""
    if name is None:
        return None
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float64": torch.float64,  # for task vectors that must round-trip exactly
        "fp64": torch.float64,
        "double": torch.float64,
    }
    if name.lower() not in table:
        raise UsageError(f"unknown dtype '{name}': use one of bfloat16, float16, float32, float64.")
    return table[name.lower()]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown device '{device}' (use cpu, cuda or cuda:N).") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine.")
    return dev


def identity_jobs(first: Checkpoint, names: Sequence[str], n_inputs: int) -> list[TensorJob]:
    """One job per tensor name, reading that name from every input."""
    jobs = []
    for name in names:
        info = first.info(name)
        jobs.append(
            TensorJob(name, tuple((i, name) for i in range(n_inputs)), info.shape, info.dtype)
        )
    return jobs


def out_dtype(job: TensorJob, spec: OutputSpec) -> torch.dtype:
    if not job.dtype.is_floating_point:
        return job.dtype  # integer buffers pass through unchanged
    return spec.dtype or job.dtype


def run_jobs(
    inputs: Sequence[Checkpoint],
    jobs: Sequence[TensorJob],
    compute: Compute,
    outputs: Sequence[OutputSpec],
    options: RunOptions = RunOptions(),
    label: str = "merging",
) -> RunSummary:
    """Stream every job through `compute` into the outputs; atomic, all or nothing."""
    device = check_device(options.device)
    t0 = time.time()
    reporter = make_reporter(options.progress)
    total = sum(inputs[i].info(n).nbytes for j in jobs for i, n in j.sources)
    bytes_read = 0
    pool = BufferPool()  # conversion and cast buffers, reused by every job
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(_writer(spec, jobs, options)) for spec in outputs]
        reporter.start(len(jobs), total, label)
        try:
            for job in jobs:
                nbytes = _fused(inputs, job, compute, outputs, writers, device, options, pool)
                if nbytes is not None:  # one pass over the stored inputs: done
                    bytes_read += nbytes
                    reporter.advance(nbytes)
                    continue
                blocked = _blocked(inputs, job, compute, device, options.block_elems, pool)
                if blocked is not None:
                    _write_blocks(job, blocked, outputs, writers, pool)
                    nbytes = sum(inputs[i].info(n).nbytes for i, n in job.sources)
                    bytes_read += nbytes
                    reporter.advance(nbytes)
                    continue
                # read then compute, in one thread: a read-ahead thread was measured slower on
                # 2 cores (contention with torch's own threads) and raised the peak RSS
                rows = device_reads(device, options)
                tensors, nbytes = _read_compute(inputs, job, device, rows, pool)
                bytes_read += nbytes
                results = _compute(job, tensors, compute, len(outputs))
                for k, (spec, writer, result) in enumerate(
                    zip(outputs, writers, results, strict=True)
                ):
                    writer.add(
                        job.name, _cast_checked(result, out_dtype(job, spec), job, spec, pool, k)
                    )
                del tensors, results  # free before the next job is read
                reporter.advance(nbytes)
        finally:
            reporter.finish()
        for spec, writer in zip(outputs, writers, strict=True):
            _write_aux(writer, spec)
    return RunSummary(
        outputs=[str(s.path) for s in outputs],
        tensors=len(jobs),
        bytes_read=bytes_read,
        bytes_written=sum(w.bytes_written for w in writers),
        seconds=round(time.time() - t0, 3),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


def _writer(spec: OutputSpec, jobs: Sequence[TensorJob], options: RunOptions) -> CheckpointWriter:
    entries: list[Entry] = [(j.name, j.shape, out_dtype(j, spec)) for j in jobs]
    return CheckpointWriter(
        spec.path,
        entries,
        metadata=spec.metadata,
        max_shard_size=options.max_shard_size,
        single_file=spec.single_file,
        force=options.force,
    )


def pinned_reads(device: torch.device) -> bool:
    """Read into page-locked host memory (and copy without blocking) for this device?"""
    return device.type == "cuda"


def device_reads(device: torch.device, options: RunOptions) -> bool:
    """Read whole tensors as one row range (the device's read path; pinned on CUDA)?"""
    return pinned_reads(device) if options.device_reads is None else options.device_reads


def _rows_readable(ckpt: Checkpoint, name: str) -> bool:
    info = ckpt.info(name)
    return not ckpt.source.pickle and info.offset >= 0 and len(info.shape) >= 1


def _read_raw(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    device: torch.device,
    rows: bool,
    pool: BufferPool | None = None,
) -> list[Tensor]:
    """The job's inputs as stored (adapter merged in), each in its pooled slot ("raw", k):
    all are alive together; `rows`: as one row range, straight into pinned buffers on CUDA."""
    return [
        _read_one(inputs, job, k, device, rows, _raw_buffer(pool, k, inputs[i].info(n), device))
        for k, (i, n) in enumerate(job.sources)
    ]


def _read_one(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    k: int,
    device: torch.device,
    rows: bool,
    out: Tensor | None,
) -> Tensor:
    """Input k of a job as stored, into out when given; `rows`: as one row range (pinned on
    CUDA), else a whole read."""
    i, n = job.sources[k]
    if rows and _rows_readable(inputs[i], n):
        return inputs[i].read_rows(
            n, 0, inputs[i].info(n).shape[0], pin=pinned_reads(device), out=out
        )
    return inputs[i].read(n, out=out)


def _read_compute(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    device: torch.device,
    rows: bool,
    pool: BufferPool | None = None,
) -> tuple[list[Tensor], int]:
    """The job's inputs as compute tensors (`to_device`), read and converted one at a time,
    and the bytes read. A read that stays the compute tensor (float32 in a float32 job,
    integers) takes its slot ("raw", k); one converted (bf16) is read into the one staging slot
    ("stage", 0) and converted into its slot ("in", k) before the next read: no fresh pages
    for either, and only one stored copy alive beside the compute tensors, as before."""
    compute_dtype = _compute_dtype(inputs, job)
    tensors, nbytes = [], 0
    for k, (i, name) in enumerate(job.sources):
        out = _read_slot(pool, k, inputs[i].info(name), device, compute_dtype)
        t = _read_one(inputs, job, k, device, rows, out)
        nbytes += t.numel() * t.element_size()
        if t.is_floating_point():
            warn_non_finite(t, name, inputs[i].source.ref)
        tensors.append(to_device(t, device, compute_dtype, _slot(pool, k, device)))
        del t
    return tensors, nbytes


def _raw_buffer(
    pool: BufferPool | None,
    k: int,
    info: TensorInfo,
    device: torch.device,
    rows: tuple[int, int] | None = None,
    role: str = "raw",
) -> Tensor | None:
    """Host slot (role, k) for input k's read (of `rows` only, when given), or None for a new
    tensor: no pool, or a pinned read (CUDA keeps its own page-locked buffers). A float32 read
    is its own compute tensor (`to_device` returns it), so its "raw" slot is not taken again
    before the job (or block) is done; the "stage" slot holds a read until it is converted."""
    if pool is None or pinned_reads(device):
        return None
    shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    stage = 0 if role == "stage" else k  # one staging slot: each read is converted at once
    return pool.take(role, stage, shape, info.dtype, torch.device("cpu"))


def _read_slot(
    pool: BufferPool | None,
    k: int,
    info: TensorInfo,
    device: torch.device,
    compute_dtype: torch.dtype,
    rows: tuple[int, int] | None = None,
) -> Tensor | None:
    """Where input k's read goes when it is converted at once (`_read_compute`, `_blocked`):
    its slot ("raw", k) when the read stays the compute tensor (float32 in a float32 job,
    integers), else the one staging slot, free again once the read is converted."""
    kept = info.dtype == compute_dtype or not info.dtype.is_floating_point
    return _raw_buffer(pool, k, info, device, rows, "raw" if kept else "stage")


def _compute_dtype(inputs: Sequence[Checkpoint], job: TensorJob) -> torch.dtype:
    """float64 when an input is stored that wide (a lossless task vector), else float32."""
    wide = any(inputs[i].info(n).dtype == torch.float64 for i, n in job.sources)
    return torch.float64 if wide else torch.float32


def to_device(
    t: Tensor,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    out: Callable[[Sequence[int], torch.dtype], Tensor] | None = None,
) -> Tensor:
    """A raw host tensor as compute_dtype (integers unchanged) on `device`. Copied in its stored
    dtype (half the bytes of float32 for bf16) and cast there; asynchronous from pinned memory.
    `out(shape, dtype)`: where the cast goes (a pooled buffer), instead of a new tensor."""
    moved = t.to(device, non_blocking=t.is_pinned()) if t.device != device else t
    if not t.is_floating_point() or moved.dtype == compute_dtype:
        return moved
    if out is None:
        return moved.to(compute_dtype)
    return out(moved.shape, compute_dtype).copy_(moved)


def _slot(
    pool: BufferPool | None, k: int, device: torch.device
) -> Callable[[Sequence[int], torch.dtype], Tensor] | None:
    """Where input k's compute copy goes: its pool slot (None: a new tensor)."""
    if pool is None:
        return None
    return lambda shape, dtype: pool.take("in", k, shape, dtype, device)


def _blocked(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    compute: Compute,
    device: torch.device,
    block_elems: int,
    pool: BufferPool | None = None,
) -> Iterator[list[Tensor]] | None:
    """The compute's per-block results for a large job, or None to compute it whole."""
    blocked_fn: Blocked | None = getattr(compute, "blocked", None)
    if blocked_fn is None or not job.dtype.is_floating_point:
        return None
    parts = [p for p in _row_parts(inputs, job, block_elems) if p is not None]
    if not parts:  # read whole
        return None
    row = math.prod(job.shape) // job.shape[0]
    pin = pinned_reads(device)
    # as _read_compute: a float64 input (a lossless task vector) makes the job compute in float64
    compute_dtype = _compute_dtype(inputs, job)

    checked: set[tuple[int, int]] = set()  # (input position, first row): blocks checked
    warned: set[int] = set()  # input positions warned about

    def stream() -> Iterator[tuple[Block, list[Tensor]]]:
        for start, stop in parts:
            xs = []
            for k, (i, name) in enumerate(job.sources):
                info = inputs[i].info(name)
                out = _read_slot(pool, k, info, device, compute_dtype, (start, stop))
                raw = inputs[i].read_rows(name, start, stop, pin=pin, out=out)
                # each block checked once, though a merge may stream the blocks several times
                if raw.is_floating_point() and (k, start) not in checked:
                    checked.add((k, start))
                    if k not in warned and not all_finite(raw):
                        warned.add(k)  # one warning per input tensor
                        warn_non_finite(raw, name, inputs[i].source.ref)
                xs.append(to_device(raw, device, compute_dtype, _slot(pool, k, device)))
                del raw
            yield Block(start, stop, start * row), xs

    return blocked_fn(job, stream, len(parts))


def _fused(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    compute: Compute,
    outputs: Sequence[OutputSpec],
    writers: Sequence[CheckpointWriter],
    device: torch.device,
    options: RunOptions,
    pool: BufferPool,
) -> int | None:
    """Run a job whose compute declares row-local blends (`rowwise(..., fused)`) in one pass
    per block over the stored inputs: read into the pooled "raw" slots, converted, merged,
    checked and cast into the "out" slots by `blend.blend_into`, without float32 copies or
    separate finiteness passes. Returns the bytes read, or None when the job takes the other
    paths (no declaration, an accelerator, dtypes the kernel does not take, no kernel)."""
    fused_fn: Fused | None = getattr(compute, "fused", None)
    if fused_fn is None or device.type != "cpu" or not _fusable(inputs, job, outputs):
        return None
    parts = _row_parts(inputs, job, options.block_elems)
    cached: list[list[Tensor]] = []  # a whole job's inputs, read once for both passes

    def read(rows: tuple[int, int] | None) -> list[Tensor]:
        if rows is not None:
            return _read_rows_pooled(inputs, job, rows, pool)
        if not cached:
            cached.append(_read_raw(inputs, job, device, device_reads(device, options), pool))
        return cached[0]

    specs = fused_fn(job, lambda: (read(rows) for rows in parts))
    if specs is None:
        return None
    if len(specs) != len(outputs):
        raise RunError(f"internal: {len(specs)} blends for {len(outputs)} outputs.")
    if parts != [None]:
        for spec, writer in zip(outputs, writers, strict=True):
            writer.begin_tensor(job.name, out_dtype(job, spec))
    warned: set[int] = set()
    for rows in parts:
        results = _blend_part(inputs, job, specs, read(rows), rows, outputs, pool, warned)
        for writer, out in zip(writers, results, strict=True):
            if rows is None:
                writer.add(job.name, out)
            else:
                writer.write_part(out)
    return sum(inputs[i].info(n).nbytes for i, n in job.sources)


def _blend_part(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    specs: Sequence[blend.Elementwise],
    raws: list[Tensor],
    rows: tuple[int, int] | None,
    outputs: Sequence[OutputSpec],
    pool: BufferPool,
    warned: set[int],
) -> list[Tensor]:
    """Output k's blend of one part (rows, or None: whole) of a job's stored inputs, in its
    slot ("out", k). Warns about non-finite inputs (once per input of the job) and raises the
    torch path's RunError for a non-finite output, before anything of it is written."""
    shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    results = []
    for k, (spec_k, out_spec) in enumerate(zip(specs, outputs, strict=True)):
        out = pool.take("out", k, shape, out_dtype(job, out_spec), torch.device("cpu"))
        bad, out_bad = blend.blend_into(spec_k, raws, out)
        _warn_inputs(inputs, job, raws, bad, warned)
        if out_bad:  # the torch path's message: NaN/Inf, or the peak past the dtype's range
            result = blend.elementwise(spec_k, [r.float() for r in raws])
            _cast_checked(result, out.dtype, job, out_spec)
            raise RunError(f"internal: the fused blend of '{job.name}' is not finite.")
        results.append(out)
    return results


def _fusable(inputs: Sequence[Checkpoint], job: TensorJob, outputs: Sequence[OutputSpec]) -> bool:
    """A non-empty float job whose stored dtypes and output dtypes `blend.blend_into` takes."""
    if not job.dtype.is_floating_point or math.prod(job.shape) == 0:
        return False
    dtypes = [inputs[i].info(n).dtype for i, n in job.sources]
    return all(blend.fused_serves(dtypes, out_dtype(job, spec)) for spec in outputs)


def _row_parts(
    inputs: Sequence[Checkpoint], job: TensorJob, block_elems: int
) -> list[tuple[int, int] | None]:
    """A job's row ranges for the blocked and fused paths (blocks of about block_elems
    entries), or [None]: read whole (small, one row, or not readable in rows)."""
    numel = math.prod(job.shape)
    if numel <= block_elems or len(job.shape) < 1 or job.shape[0] < 2:
        return [None]
    if not all(_rows_readable(inputs[i], name) for i, name in job.sources):
        return [None]
    step = max(1, block_elems // (numel // job.shape[0]))
    return [(s, min(job.shape[0], s + step)) for s in range(0, job.shape[0], step)]


def _read_rows_pooled(
    inputs: Sequence[Checkpoint], job: TensorJob, rows: tuple[int, int], pool: BufferPool
) -> list[Tensor]:
    """Rows [start, stop) of every input as stored, each in its slot ("raw", k)."""
    raws = []
    for k, (i, name) in enumerate(job.sources):
        info = inputs[i].info(name)
        out = _raw_buffer(pool, k, info, torch.device("cpu"), rows)
        raws.append(inputs[i].read_rows(name, rows[0], rows[1], out=out))
    return raws


def _warn_inputs(
    inputs: Sequence[Checkpoint],
    job: TensorJob,
    raws: Sequence[Tensor],
    bad: Sequence[bool],
    warned: set[int],
) -> None:
    """The non-finite input warning of the other paths, once per input of a job."""
    for k, ((i, name), raw, flagged) in enumerate(zip(job.sources, raws, bad, strict=True)):
        if flagged and k not in warned:
            warned.add(k)
            warn_non_finite(raw, name, inputs[i].source.ref)


def _write_blocks(
    job: TensorJob,
    results: Iterator[list[Tensor]],
    outputs: Sequence[OutputSpec],
    writers: Sequence[CheckpointWriter],
    pool: BufferPool | None = None,
) -> None:
    """Write the per-block results of one job to every output, block by block."""
    for spec, writer in zip(outputs, writers, strict=True):
        writer.begin_tensor(job.name, out_dtype(job, spec))
    rows = 0
    for parts in results:
        if len(parts) != len(outputs):
            raise RunError(f"internal: {len(parts)} results for {len(outputs)} outputs.")
        for k, (spec, writer, part) in enumerate(zip(outputs, writers, parts, strict=True)):
            if tuple(part.shape[1:]) != job.shape[1:]:
                raise RunError(
                    f"tensor '{job.name}': the merge produced rows of shape "
                    f"{list(part.shape[1:])}, expected {list(job.shape[1:])}."
                )
            writer.write_part(_cast_checked(part, out_dtype(job, spec), job, spec, pool, k))
        rows += parts[0].shape[0]
        del parts
    if rows != job.shape[0]:
        raise RunError(f"internal: tensor '{job.name}' got {rows} rows of {job.shape[0]}.")


def _compute(job: TensorJob, tensors: list[Tensor], compute: Compute, n_out: int) -> list[Tensor]:
    if not job.dtype.is_floating_point:  # integer buffers: copied from the first input
        return [tensors[0]] * n_out
    results = compute(job, tensors)
    if len(results) != n_out:
        raise RunError(f"internal: {len(results)} results for {n_out} outputs at '{job.name}'.")
    for r in results:
        if tuple(r.shape) != job.shape:
            raise RunError(
                f"tensor '{job.name}': the merge produced shape {list(r.shape)}, "
                f"expected {list(job.shape)}."
            )
    return results


def _cast_checked(
    t: Tensor,
    dtype: torch.dtype,
    job: TensorJob,
    spec: OutputSpec,
    pool: BufferPool | None = None,
    k: int = 0,
) -> Tensor:
    """t cast to the output dtype (into output k's pooled buffer), checked there: what is
    written must be finite, and a finite result can overflow a narrower dtype (1e5 is inf in
    float16). Raises RunError, so the writer removes everything (nothing half-written is left)."""
    out = t.to(dtype) if pool is None else pool.cast(t, dtype, k)
    if all_finite(out) and not (dtype in SATURATING and _past_range(t, dtype)):
        return out
    if not all_finite(t):
        raise RunError(
            f"output tensor '{job.name}' for {spec.path} contains NaN or Inf; nothing was "
            "written. Check the inputs (a warning names any non-finite input tensor) and the "
            "merge parameters."
        )
    peak, name = float(t.abs().max()), str(dtype).removeprefix("torch.")
    raise RunError(
        f"output tensor '{job.name}' for {spec.path} does not fit in {name}: it reaches "
        f"{peak:.4g}, past the largest {name} value ({torch.finfo(dtype).max:.4g}), so the cast "
        "would write Inf (or clamp); nothing was written. Write a wider dtype (--dtype "
        "float32) or use smaller weights or scales."
    )


# dtypes without Inf, whose casts clamp out-of-range values to their largest one silently
SATURATING = {torch.float8_e4m3fn}


def _past_range(t: Tensor, dtype: torch.dtype) -> bool:
    """Does t hold a value that rounds past dtype's largest (beyond half its last ulp)?"""
    if t.numel() == 0 or not t.is_floating_point():
        return False
    big = torch.finfo(dtype).max
    limit = big + 2.0 ** math.floor(math.log2(big)) * torch.finfo(dtype).eps / 2
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) > limit


def _write_aux(writer: CheckpointWriter, spec: OutputSpec) -> None:
    if spec.single_file:
        return
    write_aux_files(writer, spec.aux_from, spec.dtype, spec.config_updates, spec.tokenizer_files)
    if spec.card is not None:
        writer.add_file("README.md", spec.card)
    for relpath, content in spec.extra_files.items():
        writer.add_file(relpath, content)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))
