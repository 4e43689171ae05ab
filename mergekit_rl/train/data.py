"""Training and held-out data for `rlmerge train`: local files or hub datasets, checked up front.

Column formats (TRL's standard, non-conversational ones):
    dpo:        prompt, chosen, rejected
    kto:        prompt, completion, label (bool: desirable or not)
    grpo, rloo: prompt (any other column is passed to the reward functions)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, UsageError
from .recipe import DatasetSpec

COLUMNS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "grpo": ("prompt",),
    "rloo": ("prompt",),
}
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_train_dataset(spec: DatasetSpec, algorithm: str) -> Any:
    """The `datasets.Dataset` a recipe names, with its columns renamed and checked."""
    ds = _load(spec)
    if spec.columns:
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise UsageError(
                f"dataset.columns renames {missing} but {spec.path} has only {ds.column_names}."
            )
        ds = ds.rename_columns(dict(spec.columns))
    need = COLUMNS[algorithm]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise UsageError(
            f"dataset {spec.path} lacks column(s) {missing} that {algorithm} needs (it has "
            f"{ds.column_names}); rename them with dataset.columns: {{their_name: {missing[0]}}}."
        )
    if len(ds) == 0:
        raise UsageError(f"dataset {spec.path} (split {spec.split}) has no examples.")
    if spec.max_examples is not None:
        ds = ds.select(range(min(spec.max_examples, len(ds))))
    return ds


def _load(spec: DatasetSpec) -> Any:
    import datasets

    path = Path(spec.path)
    try:
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UsageError(
                    f"dataset.path {spec.path}: unknown file type '{path.suffix}'; use .json, "
                    ".jsonl, .parquet or .csv."
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), spec.subset, split=spec.split)
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise InputNotFoundError(
            f"dataset.path '{spec.path}' is neither a local file nor a reachable hub dataset "
            f"({e}). Check the path (relative to the working directory)."
        ) from e
    except ValueError as e:  # an unknown split, or a file that does not parse
        raise UsageError(f"dataset.path '{spec.path}': {e}") from e


def truncate_prompts(ds: Any, tokenizer: Any, max_tokens: int) -> Any:
    """Keep the last `max_tokens` tokens of each prompt (the end is next to the answer)."""

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return {}
        return {"prompt": tokenizer.decode(ids[-max_tokens:])}

    return ds.map(cut)


def read_lines(
    path: str | Path, what: str, key: str = "prompt", limit: int | None = None
) -> list[str]:
    """Held-out texts: a .jsonl file's `key` field, or the non-empty lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} '{path}' not found; check the path.")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                texts.append(str(json.loads(line)[key]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(
                    f"{what} {path} line {n}: expected JSON with '{key}' ({e})."
                ) from e
        else:
            texts.append(line)
    if not texts:
        raise UsageError(f"{what} {path} holds no text.")
    return texts[:limit]
