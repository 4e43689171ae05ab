"""Training and held-out data for `rlmerge train`: local files or hub datasets, checked up front.

Column formats (TRL's standard ones; a prompt is a string, or a list of chat messages
`[{"role": ..., "content": ...}]` that TRL renders with the tokenizer's chat template):
    dpo:        prompt, chosen, rejected (or chosen, rejected that both start with the prompt:
                TRL's implicit-prompt format, split by split_implicit_prompts)
    kto:        prompt, completion, label (bool: desirable or not)
    grpo, rloo: prompt (any other column is passed to the reward functions)

The prompt tokens a trainer sees are `prompt_ids` below: the tokenizer's own special tokens for a
string, the chat template with its generation prompt for messages (what TRL 1.16 feeds).
`rlmerge eval` and training's held-out evaluation encode prompts and documents with the same
`prompt_ids` and `document_ids`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
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
    if algorithm == "dpo" and "prompt" not in ds.column_names:
        ds = split_implicit_prompts(ds, spec.path)
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


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from a pair that holds its prompt in both answers (TRL's
    "implicit prompt" preference format, e.g. trl-lib/ultrafeedback_binarized). Messages: the
    prompt is the leading messages both lists share. Text: the longest common prefix, cut back
    to a whitespace so that no word is split. ValueError when nothing is shared or nothing is
    left of an answer."""
    if is_conversational(chosen) and is_conversational(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise ValueError(
                "the two message lists share no leading messages, or one is all prompt"
            )
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1
        if cut == 0:
            raise ValueError("the two texts share no leading words")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise ValueError("chosen and rejected must both be text or both be message lists")


def split_implicit_prompts(ds: Any, path: str) -> Any:
    """A `prompt` column split off `chosen` / `rejected` (split_implicit_prompt); the dataset
    unchanged when it has no chosen / rejected pair (the column check then names what is
    missing)."""
    if not {"chosen", "rejected"} <= set(ds.column_names):
        return ds

    def split(row: dict[str, Any], i: int) -> dict[str, Any]:
        try:
            prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        except ValueError as e:
            raise UsageError(
                f"dataset {path} has no prompt column, and row {i} does not hold one in both "
                f"answers ({e}); give a prompt column (or rename one with dataset.columns)."
            ) from e
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return ds.map(split, with_indices=True)


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
            if not spec.split.startswith("train"):
                raise UsageError(
                    f"dataset.split '{spec.split}': a local file ({spec.path}) holds one split, "
                    "train; select part of it with a slice such as train[:90%] or train[100:]."
                )
            return datasets.load_dataset(builder, data_files=str(path), split=spec.split)
        if path.is_dir():
            return datasets.load_dataset(str(path), spec.subset, split=spec.split)
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise InputNotFoundError(
            f"dataset.path '{spec.path}' is neither a local file nor a reachable hub dataset "
            f"({e}). Check the path (relative to the working directory)."
        ) from e
    except ValueError as e:  # an unknown split, or a file that does not parse
        raise UsageError(f"dataset.path '{spec.path}' (split {spec.split}): {e}") from e


# -- prompts as tokens -----------------------------------------------------------------------


def is_conversational(prompt: Any) -> bool:
    """A list of chat messages (dicts with a role), as opposed to plain text."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(m, dict) and "role" in m for m in prompt)
    )


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """The tokens TRL 1.16 feeds for a prompt: `tokenizer(text)` (with the tokenizer's special
    tokens), or the chat template with its generation prompt for a list of messages."""
    if is_conversational(prompt):
        out = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    if not isinstance(prompt, str):
        raise UsageError(
            f"a prompt must be a string or a list of chat messages, got {prompt!r:.80}"
        )
    return list(tokenizer(prompt)["input_ids"])


def document_ids(tokenizer: Any, document: Any, what: str = "a document") -> list[int]:
    """The tokens of a held-out document, as training's held-out perplexity reads them: the
    tokenizer's own special tokens for text (BOS where it adds one), the chat template (no
    generation prompt) for a list of messages."""
    if is_conversational(document):
        out = tokenizer.apply_chat_template(document, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    if not isinstance(document, str):
        raise UsageError(f"{what} must be text or chat messages, got {document!r:.80}")
    return list(tokenizer(document)["input_ids"])


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """Token id lists -> (input_ids [B, T], attention_mask [B, T]) int64 tensors, left-padded
    with `pad_id` to the longest row (generation continues every row at its right end)."""
    import torch

    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _suffix_that_fits(text: str, tokenizer: Any, length: Callable[[str], int], limit: int) -> str:
    """The longest suffix of `text` that starts at one of its token boundaries and keeps
    `length(suffix) <= limit` (length: the tokens of the whole prompt built around it).

    Cutting the string at a token's character offset (not decoding a tail of token ids) never
    splits a character, and the length is measured by re-tokenizing, so it cannot overshoot.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = enc["input_ids"]
    if tokenizer.is_fast:
        starts = [a for a, _ in enc["offset_mapping"]]
    else:  # no offsets: where the decoded tail starts (approximate; the length check holds)
        starts = [len(text) - len(tokenizer.decode(ids[k:])) for k in range(len(ids))]
    overhead = length("")  # template and special tokens around the text
    first = max(0, len(ids) - (limit - overhead))
    for k in range(first, len(ids)):
        candidate = text[max(starts[k], 0) :]
        if length(candidate) <= limit:
            return candidate
    return ""


def truncate_prompt(
    prompt: Any, tokenizer: Any, max_tokens: int, what: str = "training.max_prompt_length"
) -> Any:
    """The prompt, cut so that `prompt_ids` has at most `max_tokens` tokens, keeping its end
    (next to the answer). Messages keep every turn and the template; only the content of the
    last user turn loses its beginning. UsageError (naming the limit, `what`) when even that
    cannot fit."""
    if len(prompt_ids(tokenizer, prompt)) <= max_tokens:
        return prompt
    if not is_conversational(prompt):
        cut = _suffix_that_fits(
            prompt, tokenizer, lambda s: len(prompt_ids(tokenizer, s)), max_tokens
        )
        if len(prompt_ids(tokenizer, cut)) > max_tokens:  # special tokens alone overshoot
            raise UsageError(f"{what} ({max_tokens} tokens) is shorter than the special tokens.")
        return cut
    users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
    if not users or not isinstance(prompt[users[-1]].get("content"), str):
        raise UsageError(
            f"a chat prompt over {what} ({max_tokens} tokens) has no user turn with "
            f"text content to shorten: {prompt!r:.120}"
        )
    last = users[-1]

    def with_content(content: str) -> list[dict[str, Any]]:
        return [{**m, "content": content} if i == last else m for i, m in enumerate(prompt)]

    def length(content: str) -> int:
        return len(prompt_ids(tokenizer, with_content(content)))

    if length("") > max_tokens:
        raise UsageError(
            f"a chat prompt's template and other turns take {length('')} tokens without the last "
            f"user turn's text, more than {what} ({max_tokens}): {prompt!r:.120}. "
            f"Raise {what} or shorten the earlier turns."
        )
    return with_content(_suffix_that_fits(prompt[last]["content"], tokenizer, length, max_tokens))


def truncate_prompts(ds: Any, tokenizer: Any, max_tokens: int) -> Any:
    """`truncate_prompt` on every example's prompt (text or messages)."""

    def cut(example: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": truncate_prompt(example["prompt"], tokenizer, max_tokens)}

    return ds.map(cut)


# -- held-out files --------------------------------------------------------------------------


def read_records(
    path: str | Path, what: str, key: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """Held-out examples, each a dict with at least `key`: the objects of a .jsonl file (one per
    line) or of a .json file (a list of objects, or JSON lines), or {key: line} for each
    non-empty line of any other file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} '{path}' not found; check the path.")
    text = path.read_text()
    if path.suffix.lower() not in (".json", ".jsonl"):
        rows = [(f"line {n}", {key: x}) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
    else:
        rows = _json_rows(text, f"{what} {path}")
    for where, record in rows:
        if not isinstance(record, dict) or key not in record:
            raise UsageError(f"{what} {path} {where}: expected an object with '{key}'.")
    if not rows:
        raise UsageError(f"{what} {path} holds no examples.")
    return [record for _, record in rows[:limit]]


# fields of a prompts record that are not passed to reward functions (TRL's rule)
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


def reward_columns(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The records' other fields, one list per field name, as TRL passes dataset columns to
    reward functions (None where a record lacks the field)."""
    names = sorted({k for r in records for k in r if k not in NOT_COLUMNS})
    return {k: [r.get(k) for r in records] for k in names}


def _json_rows(text: str, name: str) -> list[tuple[str, Any]]:
    """(where, value) for each item of a JSON list, or each line of JSON lines."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON lines (or broken JSON: reported line by line below)
    if isinstance(whole, list):
        return [(f"item {n}", x) for n, x in enumerate(whole, 1)]
    if whole is not None and len([x for x in text.splitlines() if x.strip()]) > 1:
        raise UsageError(f"{name}: expected a list of objects or JSON lines, got one object.")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{name} line {n}: not valid JSON ({e}).") from e
    return rows


def canonical(prompt: Any) -> str:
    """A comparable form of a prompt (text or messages), whitespace-insensitive at the ends."""
    if isinstance(prompt, str):
        return prompt.strip()
    return json.dumps(prompt, sort_keys=True)


def warn_overlap(eval_prompts: Sequence[Any], train_prompts: Sequence[Any], where: str) -> int:
    """Warn when held-out prompts are training prompts; returns how many are."""
    seen = {canonical(p) for p in train_prompts}
    shared = sum(canonical(p) in seen for p in eval_prompts)
    if shared:
        warnings.warn(
            f"evaluation.prompts: {shared} of {len(eval_prompts)} eval prompts are also training "
            f"prompts ({where}), so eval/kl and eval/reward partly measure training data; use "
            "held-out prompts.",
            stacklevel=2,
        )
    return shared
