"""Write checkpoints atomically, one tensor at a time.

Every output tensor's name, shape and dtype is known before any math runs, so the shard layout
and each shard's header are planned up front (`plan_shards`, a pure function); tensors are then
appended in plan order with no per-shard buffer.

What a crash can leave (kill -9 at any moment, disk full, two writers):
- Everything is written into `.NAME.rlmerge-tmp-PID` beside the output and put in place with one
  atomic rename (an atomic exchange when replacing with --force, so that the old output stays
  whole until the new one is complete). `NAME` is never half-written.
- A writer holds an exclusive lock, `.NAME.rlmerge-lock` (flock), from start to commit: a second
  writer to the same output is refused at once (OutputExistsError, exit 2), never mixed in.
- Under the lock, temp directories of earlier writers to the same output whose process is dead
  are removed; one owned by a live process is left alone and reported with the command that
  removes it.
- Symbolic links are never followed to delete: `--force` over a link (dangling or not) replaces
  the link itself and leaves its target alone.
- A write error (disk full, file-size limit, permissions) is a RunError (exit 1) naming the
  path; the temp directory is removed.

A metadata value may be `Deferred` (the inputs' fingerprints, hashed while the tensors are
written): shard headers hold its same-length placeholder until the commit, which waits for the
value and writes it over the placeholder in place, before the rename. A failed value fails the
commit like a write error: nothing appears at the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import torch
from torch import Tensor

from ..errors import OutputExistsError, RLMergeError, RunError, UsageError
from .reference import ModelSource
from .safetensors_format import build_header, tensor_nbytes

DEFAULT_MAX_SHARD = 5_000_000_000
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*((?:[KMGT]i?)?)B?\s*", re.I)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
TMP_MARK = ".rlmerge-tmp-"
LOCK_MARK = ".rlmerge-lock"

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype)


@dataclass(frozen=True)
class Deferred:
    """A metadata value known only at commit: shard headers hold `placeholder` (as long as
    the value will be, so no data offset moves) until the writer commits and writes `value()`
    over it. `value` may block (it waits for a background hash) and may raise to fail the run."""

    placeholder: str
    value: Callable[[], str]


Metadata = Mapping[str, str | Deferred]  # a shard header's __metadata__, some values late


def placeholders(metadata: Metadata) -> dict[str, str]:
    """The metadata as first written: each Deferred value's placeholder."""
    return {k: v.placeholder if isinstance(v, Deferred) else v for k, v in metadata.items()}


def resolved(metadata: Metadata) -> dict[str, str]:
    """The final metadata: each Deferred value computed (waiting for it if need be)."""
    return {k: v.value() if isinstance(v, Deferred) else v for k, v in metadata.items()}


def parse_size(value: int | str) -> int:
    """A shard size in bytes: an int, or text like 1234, 5GB, 500MB, 1.5GiB (UsageError else).

    The CLI options and the recipes' `max_shard_size` both read sizes here."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise UsageError(
            f"{value!r} is not a size: give bytes or a number with a unit (5GB, 500MB, 1.5GiB)."
        )
    if size <= 0:
        raise UsageError(f"{value!r} is not a size: it must be at least 1 byte.")
    return size


@dataclass(frozen=True)
class Shard:
    filename: str
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(s, d) for _, s, d in self.entries)


def plan_shards(entries: Sequence[Entry], max_shard_size: int = DEFAULT_MAX_SHARD) -> list[Shard]:
    """Greedy split into shards of at most max_shard_size bytes (a bigger tensor gets its own)."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = tensor_nbytes(e[1], e[2])
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    n = len(groups)
    if n == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    return [
        Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)
    ]


def _adapter_root(src: ModelSource) -> tuple[Path, ...]:
    """BASE+ADAPTER: the adapter's folder is an input too (io/adapter.py)."""
    return (src.adapter.root,) if getattr(src, "adapter", None) is not None else ()


def check_output_path(out: Path, inputs: Sequence[ModelSource], force: bool) -> None:
    """Refuse an output that exists (unless force) or that is, contains or is inside an input.

    A symbolic link counts as existing even when dangling; --force replaces the link itself.
    """
    given = Path(out).absolute()
    out = given.resolve()
    for src in inputs:
        # a bare file protects only itself; a checkpoint directory protects the whole folder
        guarded = (*(src.weight_files if src.is_file else (src.root,)), *_adapter_root(src))
        for p in (f.resolve() for f in guarded):
            if out == p or p in out.parents or out in p.parents:
                raise OutputExistsError(
                    f"output '{out}' is, contains or is inside the input '{src.ref}'; writing "
                    "there could destroy the input. Choose another output path."
                )
    if given.is_symlink() and not force:
        raise OutputExistsError(
            f"output '{given}' already exists as a symbolic link (to '{os.readlink(given)}'). "
            "Pass --force to replace the link itself (its target is left alone), or choose "
            "another path."
        )
    if given.exists() and not force:
        raise OutputExistsError(
            f"output '{given}' already exists. Pass --force to replace it, or choose another path."
        )


# ---- the pieces of an atomic output: lock, stale temp directories, the final rename -----------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_MARK}"


class OutputLock:
    """An exclusive, non-blocking flock on `.NAME.rlmerge-lock` beside the output `NAME`.

    The file holds the owner's PID (for the refusal message) and is removed on release. A
    writer that opened the file just before its previous owner removed it would lock an
    orphan inode, so after locking we check that the path still names the file we hold.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(100):  # each retry means another writer finished in between: rare
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputExistsError(
                    f"output '{self.out}' is being written by another rlmerge process "
                    f"({self._holder()}lock file '{self.path}'). Wait for it to finish, or "
                    "choose another path."
                ) from None
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise RunError(f"could not lock '{self.path}': it keeps being replaced.")

    def _holder(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return f"PID {int(self.path.read_text().split()[0])}, "
        return ""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: the next writer makes a fresh one
        os.close(self.fd)
        self.fd = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def temp_dirs(out: Path) -> list[tuple[Path, int]]:
    """Temporary outputs of writers to `out` (`.NAME.rlmerge-tmp-[old-]PID`), with their PIDs."""
    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}{TMP_MARK}*"):
        m = re.fullmatch(r"(?:old-)?(\d+)", p.name[len(out.name) + 1 + len(TMP_MARK) :])
        if m:
            found.append((p, int(m.group(1))))
    return found


def clean_stale(out: Path) -> list[Path]:
    """Remove temp directories left by dead writers to `out` (a kill -9, a power cut); warn
    about ones whose PID is alive (another process may own them). Returns what was removed.

    Called with the output's lock held, so no live rlmerge writer can own a removed one.
    """
    removed = []
    for path, pid in temp_dirs(out):
        if pid == os.getpid() or not pid_alive(pid):
            remove_path(path)
            removed.append(path)
        else:
            warnings.warn(
                f"'{path}' is a temporary output of process {pid}, which is still running, so "
                f"it was left alone. If that is not an rlmerge process, remove it with: "
                f"rm -rf '{path}'",
                stacklevel=2,
            )
    return removed


def remove_path(path: Path) -> None:
    """Remove a file, a symbolic link (never its target) or a directory tree."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def put_in_place(src: Path, out: Path, old: Path, force: bool) -> Path | None:
    """Move `src` to `out`. An existing `out` (file, folder or symbolic link) is replaced only
    with `force`, and ends at the returned path for the caller to remove: by an atomic
    exchange where the filesystem has one (`out` is never missing), else via `old`."""
    if not os.path.lexists(out):
        os.rename(src, out)
        return None
    if not force:
        raise OutputExistsError(f"output '{out}' appeared while running; not replaced.")
    if _exchange(src, out):
        return src
    os.rename(out, old)
    os.rename(src, out)
    return old


def commit_or_abort(failed: bool, commit: Callable[[], None], abort: Callable[[], None]) -> None:
    """A context exit for an atomic output: abort when the body failed; otherwise commit, and
    abort (then re-raise) when the commit itself fails, so nothing half-written is left."""
    if failed:
        abort()
        return
    try:
        commit()
    except BaseException:
        abort()
        raise


class AtomicDir:
    """A folder that appears at `out` complete or not at all: fill `tmp`, exit cleanly.

    Holds the output's lock from enter to exit and removes dead writers' temp directories.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
        self._old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{os.getpid()}"
        self._lock = OutputLock(self.out)

    @contextlib.contextmanager
    def io(self, path: Path | None = None) -> Iterator[None]:
        """OSError (disk full, file-size limit, permissions) -> RunError naming the path."""
        try:
            yield
        except RLMergeError:
            raise  # OutputExistsError is an OSError too, and already says what happened
        except OSError as e:
            where = getattr(e, "filename", None) or path or self.tmp
            raise RunError(
                f"writing the output '{self.out}' failed at '{where}': "
                f"{e.strerror or e}. Nothing was written (the temporary files were removed); "
                "check free disk space, quotas, `ulimit -f` and permissions."
            ) from e

    def open(self) -> None:
        with self.io(self.out.parent):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        try:
            with self.io():
                clean_stale(self.out)
                self.tmp.mkdir()
        except BaseException:
            self._lock.release()
            raise

    def commit(self, src: Path | None = None) -> None:
        """Put the finished `src` (default: `tmp`) at `out`, then drop the replaced output."""
        with self.io(self.out):
            replaced = put_in_place(src or self.tmp, self.out, self._old, self.force)
            for leftover in (replaced, self.tmp):
                if leftover is not None:
                    remove_path(leftover)
        self._lock.release()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            remove_path(self.tmp)
        self._lock.release()

    def __enter__(self) -> AtomicDir:
        self.open()
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        commit_or_abort(exc is not None, self.commit, self.abort)


@dataclass
class _OpenShard:
    shard: Shard
    handle: IO[bytes]
    next_index: int = 0


@dataclass
class CheckpointWriter:
    """Writes a checkpoint directory (or a single .safetensors file) atomically.

    Use as a context manager: `add` every tensor in plan order, `add_file` any extra files, and
    the output is renamed into place on a clean exit; on an exception the temporary directory is
    removed and nothing appears at `out` (see the module docstring for crashes and locks).
    """

    out: Path
    entries: Sequence[Entry]
    metadata: Metadata = field(default_factory=dict)
    max_shard_size: int = DEFAULT_MAX_SHARD
    single_file: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out).absolute()
        size = float("inf") if self.single_file else self.max_shard_size
        self.shards = plan_shards(self.entries, int(min(size, 2**62)))
        if self.single_file:
            self.shards = [Shard(self.out.name, self.shards[0].entries)]
        self._order = [e for s in self.shards for e in s.entries]
        self._next = 0
        self._open: _OpenShard | None = None
        self._shard_i = 0
        self._dir = AtomicDir(self.out, self.force)
        self.tmp = self._dir.tmp
        self.bytes_written = 0
        self._part_left = 0  # bytes still to come of a tensor written in parts

    def __enter__(self) -> CheckpointWriter:
        self._dir.open()
        return self

    def add(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor of the plan (names must come in plan order)."""
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RunError(
                f"internal: expected tensor '{want_name}' {list(shape)} {dtype}, got '{name}' "
                f"{list(tensor.shape)} {tensor.dtype}."
            )
        if self._open is None or self._open.next_index == len(self._open.shard.entries):
            self._start_shard()
        assert self._open is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            with self._dir.io(self.tmp / self._open.shard.filename):
                self._open.handle.write(data.view(torch.uint8).numpy().data)
        self._open.next_index += 1
        self._next += 1
        self.bytes_written += data.numel() * data.element_size()

    def begin_tensor(self, name: str, dtype: torch.dtype) -> None:
        """Start the next tensor of the plan, to be written in parts (row blocks, in order)
        with `write_part`; it counts as added once all its bytes were written."""
        want_name, shape, want_dtype = self._order[self._next]
        if name != want_name or dtype != want_dtype:
            raise RunError(
                f"internal: expected tensor '{want_name}' {want_dtype}, got '{name}' {dtype}."
            )
        if self._open is None or self._open.next_index == len(self._open.shard.entries):
            self._start_shard()
        self._part_left = tensor_nbytes(shape, dtype)
        if self._part_left == 0:
            self._end_tensor()

    def write_part(self, part: Tensor) -> None:
        """Append the next part of the tensor started by `begin_tensor`."""
        assert self._open is not None
        data = part.detach().to("cpu").contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if data.dtype != self._order[self._next][2] or nbytes > self._part_left:
            raise RunError(f"internal: a part of '{self._order[self._next][0]}' does not fit.")
        if nbytes:
            self._open.handle.write(data.view(torch.uint8).numpy().data)
        self.bytes_written += nbytes
        self._part_left -= nbytes
        if self._part_left == 0:
            self._end_tensor()

    def _end_tensor(self) -> None:
        assert self._open is not None
        self._open.next_index += 1
        self._next += 1

    def _start_shard(self) -> None:
        self._close_shard()
        shard = self.shards[self._shard_i]
        self._shard_i += 1
        path = self.tmp / shard.filename
        with self._dir.io(path):
            handle = open(path, "wb")  # noqa: SIM115 - closed by _close_shard/abort
            self._open = _OpenShard(shard, handle)
            handle.write(build_header(list(shard.entries), placeholders(self.metadata)))

    def _close_shard(self) -> None:
        if self._open is not None and not self._open.handle.closed:
            with self._dir.io(self.tmp / self._open.shard.filename):
                self._open.handle.close()  # flushes: a full disk can show up only here

    def add_file(self, relpath: str, content: str | bytes) -> None:
        path = self.tmp / relpath
        with self._dir.io(path):
            path.write_bytes(content.encode() if isinstance(content, str) else content)

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        dest = self.tmp / (relpath or src.name)
        with self._dir.io(dest):
            shutil.copy2(src, dest)

    def _finish(self, metadata: dict[str, str]) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            raise RunError(f"internal: output incomplete, tensor '{missing}' was never written.")
        self._close_shard()
        if not self._order:  # a model with no tensors still gets its (empty) file
            self.add_file(self.shards[0].filename, build_header([], metadata))
        else:
            self._rewrite_headers(metadata)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {n: s.filename for s in self.shards for n, _, _ in s.entries},
            }
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._open is not None:
            with contextlib.suppress(OSError):  # the flush that failed fails again
                self._open.handle.close()
        self._dir.abort()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        commit_or_abort(exc is not None, self._commit, self.abort)

    def _rewrite_headers(self, metadata: dict[str, str]) -> None:
        """Write each shard's final header over its placeholder header, in place.

        The two have the same length (a Deferred's placeholder is as long as its value), so
        no tensor moves; a length that differs is a bug, refused before anything is renamed."""
        if metadata == placeholders(self.metadata):
            return  # nothing was deferred
        for shard in self.shards:
            first = build_header(list(shard.entries), placeholders(self.metadata))
            final = build_header(list(shard.entries), metadata)
            if len(final) != len(first):
                raise RunError(
                    f"internal: the final header of '{shard.filename}' has {len(final)} bytes, "
                    f"its placeholder {len(first)}."
                )
            path = self.tmp / shard.filename
            with self._dir.io(path), open(path, "r+b") as f:
                f.write(final)

    def _commit(self) -> None:
        self._finish(resolved(self.metadata))  # waits for deferred values (input hashes)
        self._dir.commit(self.tmp / self.out.name if self.single_file else self.tmp)
