"""Files that travel with an output: config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from ..errors import RunError
from .reader import Checkpoint
from .reference import start_fingerprints
from .safetensors_format import DTYPE_NAMES
from .writer import CheckpointWriter, Deferred

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_TORCH_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def write_aux_files(
    writer: CheckpointWriter,
    source: Checkpoint | None,
    dtype: torch.dtype | None,
    config_updates: dict[str, Any] | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
) -> None:
    """Copy config.json (dtype and updates applied), generation config and tokenizer files
    (or write `tokenizer_files` instead: a union vocabulary, a new chat template).

    The config's dtype is the one the weights are written in (`dtype`, else the dtype holding
    most of the written floating bytes), whichever input the config comes from.
    """
    if source is None or source.source.is_file:
        return
    root = source.source.root
    dtype = dtype or written_dtype(writer.entries)
    if source.config is not None:
        config = dict(source.config)
        if dtype in _TORCH_DTYPE_NAMES:
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = _TORCH_DTYPE_NAMES[dtype]
        config.update(config_updates or {})
        writer.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = TOKENIZER_FILES if tokenizer_files is None else ()
    for name in ("generation_config.json", *copied):
        if (root / name).is_file():
            writer.copy_file(root / name)
    for name, content in (tokenizer_files or {}).items():
        writer.add_file(name, content)


def written_dtype(
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
) -> torch.dtype | None:
    """The floating dtype of most of the bytes in (name, shape, dtype) entries; None if none."""
    nbytes: dict[torch.dtype, int] = {}
    for _, shape, dt in entries:
        if dt.is_floating_point:
            nbytes[dt] = nbytes.get(dt, 0) + math.prod(shape) * dt.itemsize
    return max(nbytes, key=lambda d: nbytes[d]) if nbytes else None


def read_license(source: Checkpoint) -> str | None:
    """The `license:` of a model's README front matter (else of its config.json), if any."""
    readme = source.source.root / "README.md"
    if not source.source.is_file and readme.is_file():
        front = front_matter(readme.read_text(errors="replace"))
        if isinstance(front.get("license"), str):
            return front["license"]
    lic = (source.config or {}).get("license")
    return lic if isinstance(lic, str) else None


def front_matter(text: str) -> dict[str, Any]:
    """The YAML mapping between a card's leading `---` lines ({} when absent or not valid)."""
    m = re.match(r"^---\r?\n(.*?)\r?\n---", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def provenance(command: str, inputs: Sequence[Checkpoint]) -> dict[str, str | Deferred]:
    """String map stored in every output shard's safetensors __metadata__.

    The inputs' fingerprints start hashing here, in the background; `rlmerge_inputs` is a
    Deferred value that the writer fills in when it commits (its placeholder has the same
    length), so the hashing overlaps the merge instead of preceding it.
    """
    futures = start_fingerprints([c.source for c in inputs])
    blank = [FINGERPRINT_PLACEHOLDER] * len(inputs)
    return {
        "format": "pt",
        "rlmerge_version": __version__,
        "rlmerge_command": command,
        "rlmerge_inputs": Deferred(
            _inputs_json(inputs, blank), lambda: _inputs_json(inputs, _wait(inputs, futures))
        ),
        "rlmerge_cwd": os.getcwd(),  # relative paths in the command resolve from here (reproduce)
    }


# what a fingerprint looks like until it is known: "sha256:" and 64 hex digits, as long
FINGERPRINT_PLACEHOLDER = "sha256:" + "0" * 64


def _inputs_json(inputs: Sequence[Checkpoint], fingerprints: Sequence[str]) -> str:
    """The `rlmerge_inputs` record: what reproduce resolves and checks each input against."""
    return json.dumps(
        [
            {
                "ref": c.source.ref,
                "resolved": c.source.identity,
                "revision": c.source.revision,
                "fingerprint": f,  # reproduce checks the input is unchanged
            }
            for c, f in zip(inputs, fingerprints, strict=True)
        ]
    )


def _wait(inputs: Sequence[Checkpoint], futures: Sequence[Future[str]]) -> list[str]:
    """Each input's fingerprint; a failed hash is a RunError naming the input."""
    out = []
    for c, future in zip(inputs, futures, strict=True):
        try:
            out.append(future.result())
        except Exception as e:
            raise RunError(
                f"hashing the input '{c.source.ref}' ({c.source.identity}) for the output's "
                f"record failed: {e}. Nothing was written; check that the input's files are "
                "readable and were not changed or removed during the run."
            ) from e
    return out


def hub_name(c: Checkpoint) -> str:
    """How the Hub's `base_model` names an input: org/name for hub models (no @revision), the
    path as written for local ones (replace it with the model's hub id before uploading)."""
    if c.source.revision or c.source.remote_headers is not None:
        return c.source.ref.partition("@")[0]
    return c.source.ref


def card_metadata(
    inputs: Sequence[Checkpoint],
    relation: str,
    tags: Sequence[str],
    library: str = "transformers",
    base_models: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The Hub's model-card metadata: base_model (the inputs by default), base_model_relation
    (merge, finetune, adapter or quantized), library_name, tags, and the license when every
    input names the same one."""
    names = list(base_models) if base_models is not None else [hub_name(c) for c in inputs]
    meta: dict[str, Any] = {}
    licenses = {read_license(c) for c in inputs}
    if len(licenses) == 1 and None not in licenses:
        meta["license"] = licenses.pop()
    if names:
        meta["base_model"] = names[0] if len(names) == 1 else names
        meta["base_model_relation"] = relation
    meta["library_name"] = library
    meta["tags"] = ["rlmerge", *(t for t in tags if t != "rlmerge")]
    return meta


def model_card(
    title: str,
    command: str,
    inputs: Sequence[Checkpoint],
    dtype: torch.dtype | None,
    recipe: str | None = None,
    notes: str = "",
    *,
    relation: str = "merge",
    tags: Sequence[str] = ("merge",),
    library: str = "transformers",
    base_models: Sequence[str] | None = None,
) -> str:
    """README.md for an output: Hub metadata as YAML front matter (card_metadata), then how it
    was made and from what."""
    meta = card_metadata(inputs, relation, tags, library, base_models)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Made with [rlmerge](https://github.com/rlmerge/rlmerge) {__version__}.",
        "",
        "## Command",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Inputs",
        "",
    ]
    for c in inputs:
        rev = f" (revision `{c.source.revision}`)" if c.source.revision else ""
        lines.append(f"- `{c.source.ref}`{rev}")
    if dtype is not None:
        lines += ["", f"Output dtype: `{DTYPE_NAMES.get(dtype, str(dtype))}`."]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def output_is_complete(path: Path) -> bool:
    """A finished rlmerge output: weights present and every indexed shard on disk."""
    if path.is_file():
        return path.suffix == ".safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((path / s).is_file() for s in shards)
    return (path / "model.safetensors").is_file()
