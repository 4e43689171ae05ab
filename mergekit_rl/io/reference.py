"""Resolve a model reference to local weight files.

A reference is a local Hugging Face directory (config.json with model.safetensors, or shards
listed by model.safetensors.index.json), a single .safetensors file, or a hub id
`org/name[@revision]` fetched with huggingface_hub (safetensors, json and tokenizer files only;
HF_HUB_OFFLINE and the local cache are honoured). Pickle checkpoints are refused unless asked for.
`BASE+ADAPTER` is a base model with a PEFT adapter (a directory or a hub id), whose files are
found here too; io/adapter.py merges the adapter in as the base's tensors are read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputNotFoundError, PickleRefusedError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `root` holds config.json / tokenizer files when present."""

    ref: str  # as the user wrote it
    root: Path  # directory of the checkpoint (the parent directory for a bare file)
    weight_files: tuple[Path, ...]  # in shard order
    is_file: bool = False  # a bare .safetensors / pickle file, no config directory
    pickle: bool = False
    revision: str | None = None  # resolved commit hash for hub models
    # hub headers read with range requests (`resolve(headers_only=True)`): file name ->
    # (safetensors header JSON without __metadata__, its __metadata__); no weights on disk
    remote_headers: tuple[tuple[str, dict[str, Any], dict[str, str]], ...] | None = None
    adapter: AdapterSource | None = None  # BASE+ADAPTER: merged in as tensors are read

    @property
    def identity(self) -> str:
        """A stable name for provenance: repo@commit for hub models, the absolute path locally."""
        if self.adapter is not None:
            return f"{replace(self, adapter=None).identity}+{self.adapter.identity}"
        if self.revision:
            return f"{self.ref.partition('@')[0]}@{self.revision}"
        if self.remote_headers is not None:
            return self.ref  # headers only: no local files, no resolved commit
        return str((self.weight_files[0] if self.is_file else self.root).resolve())

    @property
    def display(self) -> str:
        if self.adapter is not None:
            base = replace(self, adapter=None, ref=self.ref.partition("+")[0]).display
            return f"{base}+{self.adapter.display}"
        return f"{self.ref}@{self.revision[:12]}" if self.revision else self.ref


def resolve(ref: str | Path, allow_pickle: bool = False, headers_only: bool = False) -> ModelSource:
    """Find the weight files of a model reference, downloading hub models if needed.

    headers_only (a dry run): a hub model's safetensors headers are read with range requests
    and nothing is downloaded; its config.json is used only if already in the local cache.
    Offline, the local cache is used as for a real run.
    """
    ref_str = str(ref)
    path = Path(ref_str).expanduser()
    if path.exists():
        return _resolve_local(ref_str, path.resolve(), allow_pickle)
    if "+" in ref_str:  # BASE+ADAPTER (io/adapter.py)
        return resolve_with_adapter(ref_str, allow_pickle)
    if _HUB_ID.match(ref_str) and not ref_str.startswith((".", "/", "~")):
        if headers_only:
            found = _hub_headers(ref_str)
            if found is not None:
                return found
        try:
            return _resolve_hub(ref_str, allow_pickle)
        except InputNotFoundError as e:
            if "@" in ref_str:  # a revision: clearly meant as a hub id
                raise
            # `models/sft3` looks like a hub id too: a mistyped local path is just as likely
            raise InputNotFoundError(
                f"model '{ref_str}' not found: not a local path ({path.absolute()} does not "
                f"exist), and not a cached hub model ({e})"
            ) from e
    raise InputNotFoundError(
        f"model '{ref_str}' not found: it is not an existing local path, nor a hub id of the form "
        "org/name[@revision]. Check the path."
    )


# -- BASE+ADAPTER: an adapter's files (merged in by io/adapter.py) ----------------------------


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's files are: `root` holds adapter_config.json and the weights."""

    ref: str
    root: Path
    revision: str | None = None  # resolved commit hash for hub adapters

    @property
    def identity(self) -> str:
        if self.revision:
            return f"{self.ref.partition('@')[0]}@{self.revision}"
        return str(self.root.resolve())

    @property
    def display(self) -> str:
        return f"{self.ref}@{self.revision[:12]}" if self.revision else self.ref


def split_adapter_ref(ref: str) -> tuple[str, str] | None:
    """'BASE+ADAPTER' -> (BASE, ADAPTER); None when there is no '+' or the path exists as is."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, _, adapter = ref.partition("+")
    if not base or not adapter or "+" in adapter:
        raise UsageError(
            f"'{ref}': a model with an adapter is written BASE+ADAPTER (one '+'), for example "
            "models/base+adapters/lora or org/base@rev+org/lora."
        )
    return base, adapter


def resolve_with_adapter(ref: str, allow_pickle: bool = False) -> ModelSource:
    """The ModelSource of BASE with the adapter's source attached (see Checkpoint.read)."""
    split = split_adapter_ref(ref)
    assert split is not None
    base = resolve(split[0], allow_pickle=allow_pickle)
    return replace(base, ref=ref, adapter=resolve_adapter(split[1]))


def resolve_adapter(ref: str) -> AdapterSource:
    """A local adapter directory, or a hub id `org/name[@revision]` (cache honoured offline)."""
    path = Path(ref).expanduser()
    revision = None
    if not path.exists():
        if not _HUB_ID.match(ref):
            raise InputNotFoundError(
                f"adapter '{ref}' not found: it is not an existing directory, nor a hub id "
                "org/name[@revision]."
            )
        try:
            path = hub_snapshot(ref, "adapter")
        except InputNotFoundError as e:
            raise InputNotFoundError(f"adapter '{ref}' is not an existing directory; {e}") from e
        revision = path.name
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise UsageError(
            f"adapter '{ref}' is not a PEFT adapter: expected {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} in {path}."
        )
    return AdapterSource(ref, path.resolve(), revision)


def _resolve_local(
    ref: str, path: Path, allow_pickle: bool, revision: str | None = None
) -> ModelSource:
    if path.is_file():
        if path.suffix == ".safetensors":
            return ModelSource(ref, path.parent, (path,), is_file=True, revision=revision)
        if path.suffix in PICKLE_SUFFIXES:
            _check_pickle(ref, path, allow_pickle)
            return ModelSource(ref, path.parent, (path,), is_file=True, pickle=True)
        raise UsageError(
            f"'{ref}' is not a checkpoint: expected a directory, a .safetensors file or a hub id."
        )
    index = path / "model.safetensors.index.json"
    if index.exists():
        return ModelSource(ref, path, _shards_from_index(index), revision=revision)
    single = path / "model.safetensors"
    if single.exists():
        return ModelSource(ref, path, (single,), revision=revision)
    others = sorted(path.glob("*.safetensors"))
    if others:
        return ModelSource(ref, path, tuple(others), revision=revision)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _check_pickle(ref, pickles[0], allow_pickle)
        pt_index = path / "pytorch_model.bin.index.json"
        files = _shards_from_index(pt_index) if pt_index.exists() else tuple(pickles)
        return ModelSource(ref, path, files, pickle=True, revision=revision)
    raise InputNotFoundError(
        f"'{ref}' holds no weights: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or another .safetensors file."
    )


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{index}: not a valid shard index ({e}).") from e
    names: list[str] = []
    for shard in weight_map.values():  # first-appearance order, then natural order
        if shard not in names:
            names.append(shard)
    files = tuple(index.parent / n for n in sorted(names, key=natural_key))
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InputNotFoundError(f"{index} lists shard files that do not exist: {missing[:3]}.")
    return files


def _check_pickle(ref: str, path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise PickleRefusedError(
            f"'{ref}' is a pickle checkpoint ({path.name}). Unpickling can run arbitrary code, so "
            "rlmerge refuses it by default. Convert it to safetensors, or pass --allow-pickle to "
            "load it with torch.load(weights_only=True)."
        )


def _resolve_hub(ref: str, allow_pickle: bool) -> ModelSource:
    local_path = hub_snapshot(ref, "model")
    # snapshot folders are named after the resolved commit hash
    return _resolve_local(ref, local_path, allow_pickle, revision=local_path.name)


def hub_snapshot(ref: str, what: str) -> Path:
    """The local snapshot folder of hub id `org/name[@revision]` (downloaded or from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = ref.partition("@")
    try:
        local = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise InputNotFoundError(f"hub {what} '{ref}' not found or not accessible: {e}") from e
    except LocalEntryNotFoundError as e:
        raise InputNotFoundError(
            f"hub {what} '{ref}' is not in the local cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network). Download it first or give a local path."
        ) from e
    return Path(local)


def _hub_headers(ref: str) -> ModelSource | None:
    """A header-only source from huggingface_hub's safetensors metadata call (HTTP range
    requests for each shard's header); None when the hub cannot be reached (use the cache)."""
    from huggingface_hub import get_safetensors_metadata, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = ref.partition("@")
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision or None)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise InputNotFoundError(f"hub model '{ref}' not found or not accessible: {e}") from e
    except NotASafetensorsRepoError as e:
        raise InputNotFoundError(
            f"hub model '{ref}' has no safetensors weights (a dry run reads only safetensors "
            f"headers): {e}"
        ) from e
    except (OfflineModeIsEnabled, *hub_network_errors()):
        return None  # no network: the local cache decides, with the real run's message
    headers = []
    for name in sorted(meta.files_metadata, key=natural_key):
        fm = meta.files_metadata[name]
        tensors = {
            t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
            for t, i in fm.tensors.items()
        }
        headers.append((name, tensors, dict(fm.metadata or {})))
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
    root = Path(config).parent if isinstance(config, str) else Path(repo_id)
    files = tuple(root / name for name, _, _ in headers)
    return ModelSource(ref, root, files, revision=None, remote_headers=tuple(headers))


def hub_network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub lets through when the hub cannot be reached: OSError (requests'
    errors are OSErrors) and its HTTP client's transport errors (httpx or httpx2, by version:
    connection refused, DNS failure, timeouts), which are not OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def natural_key(s: str) -> list[int | str]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


FINGERPRINT_WHOLE = 64 * 2**20  # files up to this size are hashed whole
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 64, 2**20  # larger ones: 64 evenly spaced 1 MiB blocks


def fingerprint(source: ModelSource) -> str:
    """See _hash_files; cached per file state, since every output of a command records it."""
    return start_fingerprints([source])[0].result()


def start_fingerprints(sources: Sequence[ModelSource]) -> list[Future[str]]:
    """Each source's fingerprint as a future, hashed in one background thread (in order).

    A run starts this before its first tensor and waits only when its writer commits, so the
    ~64 MiB of reads and SHA-256 per input overlap the merge (file reads and hashlib's large
    updates release the GIL). One thread, not one per input: on a small machine the merge's
    own threads need the cores. A file state already hashed or in flight is not hashed again;
    a failed one is retried by the next call.
    """
    futures, todo = [], []
    for source in sources:
        files = tuple(_fingerprint_files(source))
        stats = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        future = _fingerprint_future(files, stats)
        if future.done() and future.exception() is not None:
            future = Future()  # retry, uncached
        with _CLAIM:  # two callers must not both take a pending future
            claimed = _pending(future) and future.set_running_or_notify_cancel()
        if claimed:
            todo.append((files, future))
        futures.append(future)
    if todo:
        threading.Thread(target=_hash_into, args=(todo,), daemon=True).start()
    return futures


_CLAIM = threading.Lock()


def _pending(future: Future[str]) -> bool:
    return not future.running() and not future.done()


@functools.lru_cache(maxsize=64)
def _fingerprint_future(files: tuple[Path, ...], stats: tuple[tuple[int, int], ...]) -> Future[str]:
    """One future per file state (`stats`: each file's size and mtime), for start_fingerprints."""
    return Future()


def _hash_into(todo: list[tuple[tuple[Path, ...], Future[str]]]) -> None:
    """Background thread body: hash each file list into its future, errors included."""
    for files, future in todo:
        try:
            future.set_result(_hash_files(files))
        except BaseException as e:  # handed to whoever waits for the future
            future.set_exception(e)


def _fingerprint_files(source: ModelSource) -> list[Path]:
    files = list(source.weight_files)
    if source.adapter is not None:
        root = source.adapter.root
        files += sorted(p for p in root.iterdir() if p.suffix in (".json", ".safetensors"))
    return files


def _hash_files(files: Sequence[Path]) -> str:
    """A content hash of a model's weight files (and adapter), recorded in every output so that
    `rlmerge reproduce` can tell whether an input changed.

    Files up to 64 MiB are hashed whole; a larger file contributes its size and 64 evenly spaced
    1 MiB blocks (the first holds the safetensors header: every name, shape and offset). That
    costs ~64 MiB of reads per file, not a second pass over the model, and catches any retrained
    or replaced checkpoint; an edit of a few bytes between blocks is caught by reproduce's
    bit-for-bit comparison of the output instead. Reads go through one reused 1 MiB buffer, so
    hashing beside a merge adds 1 MiB to its memory, not a whole file.
    """
    h = hashlib.sha256()
    buf = memoryview(bytearray(FINGERPRINT_BLOCK))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb", buffering=0) as f:
            if size <= FINGERPRINT_WHOLE:
                _hash_range(f, 0, size, h, buf)
                continue
            step = (size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1)
            for i in range(FINGERPRINT_BLOCKS):
                _hash_range(f, i * step, FINGERPRINT_BLOCK, h, buf)
    return "sha256:" + h.hexdigest()


def _hash_range(f: BinaryIO, start: int, nbytes: int, h: Any, buf: memoryview) -> None:
    """Feed bytes start .. start + nbytes - 1 of f to h (fewer at the end of the file), through
    buf. Equal to h.update(f.read(nbytes)) after a seek: the digest does not change."""
    f.seek(start)
    while nbytes > 0:
        got = f.readinto(buf[: min(nbytes, len(buf))])
        if not got:
            return
        h.update(buf[:got])
        nbytes -= got
