"""The recipe schema (mergekit's YAML format plus a few keys of our own) and YAML loading.

One YAML document is one merge (`Recipe`). Several documents separated by `---` are a pipeline:
each stage has a `name:` and later stages use earlier names as model references.

Loading never runs code (`yaml.safe_load_all`) and never touches the disk beyond the recipe
file itself; problems are collected with their YAML path and raised together (checks.py).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

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
    tokenizer_source: str | None = None  # "base", a model reference; "union" is not supported
    # ours
    name: str | None = None  # pipeline stage name
    seed: int = 0  # seeds every random mask, with the model and the tensor name
    max_shard_size: int | str | None = None  # bytes, or "5GB" / "500MB"


def yaml_path(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """('models', 1, 'parameters', 'density') -> 'models[1].parameters.density'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MODEL_FIELDS = {
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
        locs = [tuple(err["loc"]) for err in e.errors()]
    # Drop the offending keys and validate again, so that checks further on (methods,
    # parameters) still report their problems in the same run; None if that fails too.
    try:
        return Recipe.model_validate(_without(doc, locs)), problems
    except ValidationError:
        return None, problems


def _without(doc: dict[str, Any], locs: list[tuple[str | int, ...]]) -> dict[str, Any]:
    """A deep copy of `doc` without the mapping keys at `locs` (list items are kept)."""
    out = copy.deepcopy(doc)
    for loc in locs:
        parent: Any = out
        for part in loc[:-1]:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        if isinstance(parent, dict):
            parent.pop(loc[-1], None)
    return out
