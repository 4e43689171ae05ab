"""The recipe schema (mergekit's YAML format plus a few keys of our own) and YAML loading.

One YAML document is one merge (`Recipe`). Several documents separated by `---` are a pipeline:
each stage has a `name:` and later stages use earlier names as model references.

Loading never runs code (`yaml.safe_load_all`) and never touches the disk beyond the recipe
file itself; problems are collected with their YAML path and raised together (checks.py).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# parameter values stay raw here (any YAML value); params.parse_setting checks them with paths
RawParams = dict[str, Any]


class ModelEntry(_Strict):
    model: str = Field(min_length=1)  # local path (relative to the working directory), hub id
    # org/name[@revision], or the name of an earlier pipeline stage
    parameters: RawParams | None = None


class SliceSource(_Strict):
    model: str = Field(min_length=1)
    layer_range: tuple[int, int]  # [start, end): end is excluded, like Python slices
    parameters: RawParams | None = None


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: RawParams | None = None


class Recipe(_Strict):
    """One merge, as written in YAML (mergekit keys, then ours)."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: RawParams | None = None
    dtype: str | None = None  # mergekit's load/compute dtype: we compute in float32 always and
    # use it as the output dtype when out_dtype is not set
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model reference
    tokenizer: dict[str, Any] | None = None  # mergekit's newer form: `source` and
    # `pad_to_multiple_of` (with source: union) are supported, `tokens` is not
    chat_template: str | None = None  # a built-in name, "auto" or a Jinja template
    # ours
    name: str | None = None  # pipeline stage name
    seed: int = 0  # seeds every random mask, with the model and the tensor name
    max_shard_size: int | str | None = None  # bytes, or "5GB" / "500MB"
    # where rlmerge's own rules differ from mergekit's (docs/methods.md, "mergekit-compatible
    # defaults"); unset means mergekit's, so a shared recipe gives mergekit's model
    topk_count: Literal["mergekit", "floor"] | None = None  # TIES: max(1, int(d*n)) | int(d*n)
    outer_depth: Literal["mergekit", "ends"] | None = None  # final norm / lm_head: t = 0 | t = 1

    @property
    def token_source(self) -> str | None:
        """Where config and tokenizer come from: tokenizer_source or `tokenizer: {source: ..}`."""
        if self.tokenizer_source is not None:
            return self.tokenizer_source
        source = (self.tokenizer or {}).get("source")
        return source if isinstance(source, str) else None

    @property
    def pad_to_multiple_of(self) -> int | None:
        """`tokenizer: {pad_to_multiple_of: N}`: the union vocabulary's rows rounded up to N."""
        value = (self.tokenizer or {}).get("pad_to_multiple_of")
        return value if isinstance(value, int) and value > 0 else None


def yaml_path(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """('models', 1, 'parameters', 'density') -> 'models[1].parameters.density'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MODEL_FIELDS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Recipe,
    ("models",): ModelEntry,
    ("slices",): Slice,
    ("slices", "sources"): SliceSource,
}


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Field names valid at the parent of `loc` (for did-you-mean hints)."""
    kind = tuple(p for p in loc[:-1] if isinstance(p, str))
    model = _MODEL_FIELDS.get(kind)
    return list(model.model_fields) if model else []


def schema_problems(err: ValidationError) -> list[tuple[str, str]]:
    """pydantic errors -> (yaml path, message), with did-you-mean hints for unknown keys."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = yaml_path(loc)
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
            more = f" (did you mean {hint[0]}?)" if hint else ""
            problems.append((path, f"unknown key{more}"))
        elif e["type"] == "missing":
            problems.append((path, "required key is missing"))
        else:
            problems.append((path, f"{e['msg']} (got {e.get('input')!r})"))
    return problems


def load_documents(text: str, source: str) -> tuple[list[Any], list[tuple[str, str]]]:
    """The YAML documents of a recipe file (empty documents dropped), or a parse problem."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        return [], [(where, f"not valid YAML: {getattr(e, 'problem', None) or e}")]
    if not docs:
        return [], [("", f"{source} holds no recipe (the file is empty)")]
    return docs, []


def parse_recipe(doc: Any) -> tuple[Recipe | None, list[tuple[str, str]]]:
    if not isinstance(doc, dict):
        return None, [
            ("", f"a recipe is a mapping of keys (merge_method, models, ...), got {doc!r}")
        ]
    try:
        return Recipe.model_validate(doc), []
    except ValidationError as e:
        problems = schema_problems(e)
        errors = [(tuple(err["loc"]), err["type"]) for err in e.errors()]
    # Repair a copy (drop bad keys, stand in for broken list items) and validate again, so
    # that the checks further on (methods, parameters) still report their problems in this
    # run. The repaired recipe is only used for checking; None if it cannot be repaired.
    repaired = copy.deepcopy(doc)
    for _ in range(3):
        for loc, kind in errors:
            _repair(repaired, loc, kind == "missing")
        try:
            return Recipe.model_validate(repaired), problems
        except ValidationError as e:
            errors = [(tuple(err["loc"]), err["type"]) for err in e.errors()]
    return None, problems


# stand-ins for a list item that misses a required key (keeps the indices of later items)
_STAND_INS: dict[str, dict[str, Any]] = {
    "models": {"model": "?"},
    "sources": {"model": "?", "layer_range": [0, 1]},
    "slices": {"sources": [{"model": "?", "layer_range": [0, 1]}]},
}


def _repair(doc: Any, loc: tuple[str | int, ...], missing: bool) -> None:
    """Drop the key at `loc`; for a missing key, replace the innermost list item on `loc` by
    a stand-in."""
    parent: Any = doc
    for i, part in enumerate(loc[:-1]):
        if (
            missing
            and isinstance(part, int)
            and isinstance(loc[i - 1], str)
            and loc[i - 1] in _STAND_INS
        ):
            inner = [p for p in loc[i + 1 :] if isinstance(p, int)]
            if not inner and isinstance(parent, list) and part < len(parent):
                parent[part] = copy.deepcopy(_STAND_INS[str(loc[i - 1])])
                return
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(parent, dict):
        parent.pop(loc[-1], None)
