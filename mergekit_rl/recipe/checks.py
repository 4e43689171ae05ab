"""Recipe validation: every problem, with its YAML path, before any model is opened.

`load_pipeline(text, source)` parses the YAML documents, checks each against the schema and
the merge method it names (parameter names and values, base model, model counts, layer ranges,
dtypes, stage names) and returns the stages, or raises one RecipeError listing every problem.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..engine import parse_dtype
from ..errors import RecipeError, UsageError
from ..io.reference import split_adapter_ref
from ..io.writer import parse_size
from ..merge.registry import MergeMethod, get_method
from ..merge.vocab import chat_template_problem
from .params import Params, leaf_values, parse_setting
from .schema import Recipe, load_documents, parse_recipe

# Methods whose function ignores the base tensor: for them a base model listed among `models`
# is merged like any other model (mergekit's linear and karcher do the same). Every other method
# takes the base apart from the models.
BASE_AS_MODEL = frozenset({"linear", "karcher", "passthrough"})
# ... and for these, a `models:` recipe's base_model that is not listed is merged in as the last
# model, with the slice/global parameters (mergekit 0.1.5's planner does the same).
BASE_MERGED_IN = frozenset({"linear", "karcher"})
STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Source:
    """One input model of one slice."""

    ref: str  # as written (a path, hub id or stage name)
    layer_range: tuple[int, int] | None  # None: every layer (a `models:` recipe)
    params: Params
    path: str  # YAML path of the entry, e.g. "models[1]"


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[Source, ...]  # the models merged (the base excluded when taken apart)
    base: Source | None
    params: Params
    path: str


@dataclass(frozen=True)
class Stage:
    recipe: Recipe
    method: MergeMethod
    slices: tuple[SliceSpec, ...]
    sliced: bool  # written with `slices:` (layers renumbered, config rewritten)
    global_params: Params
    label: str  # "" for a one-stage recipe, else "[stage 2 'name'] " (message prefix)
    max_shard_size: int | None

    @property
    def name(self) -> str | None:
        return self.recipe.name

    def merged_refs(self) -> list[str]:
        """Every merged model reference, base first, in order of appearance, without repeats."""
        out: list[str] = []
        for s in self.slices:
            for src in ([s.base] if s.base else []) + list(s.sources):
                if src.ref not in out:
                    out.append(src.ref)
        return out

    def refs(self) -> list[str]:
        """Every reference the stage opens: the merged models, then the base_model when it is
        not merged (config and tokenizer may still come from it)."""
        out = self.merged_refs()
        base = self.recipe.base_model
        if base is not None and not any(same_ref(base, r) for r in out):
            out.append(base)
        return out

    def ref_paths(self) -> dict[str, list[str]]:
        """reference -> the YAML paths that use it (for error messages)."""
        out: dict[str, list[str]] = {}
        for s in self.slices:
            for src in ([s.base] if s.base else []) + list(s.sources):
                out.setdefault(src.ref, [])
                if src.path not in out[src.ref]:
                    out[src.ref].append(src.path)
        base = self.recipe.base_model
        if base is not None and not any(same_ref(base, r) for r in out):
            out[base] = ["base_model"]
        return out


def same_ref(a: str, b: str) -> bool:
    return a == b or os.path.normpath(a) == os.path.normpath(b)


# ---- the pipeline ------------------------------------------------------------------------------


def load_pipeline(text: str, source: str) -> list[Stage]:
    """Validate a recipe file's text: the stages, or one RecipeError with every problem."""
    docs, problems = load_documents(text, source)
    stages: list[Stage] = []
    names: list[str | None] = []
    for i, doc in enumerate(docs):
        label = _label(i, doc, len(docs))
        recipe, more = parse_recipe(doc)
        if recipe is not None:
            stage, checked = check_recipe(recipe, label)
            more += checked
            more += _check_stage_name(recipe, i, len(docs), names)
            more += _check_stage_refs(recipe, stage, names, docs)
            if stage is not None:
                stages.append(stage)
            names.append(recipe.name)
        else:
            names.append(_doc_name(doc))
        problems += [(label + path if path else label.rstrip(), msg) for path, msg in more]
    if problems:
        raise RecipeError(source, problems)
    return stages


def _doc_name(doc: Any) -> str | None:
    """A document's stage name when it is a string (a broken one may hold any YAML value)."""
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def _label(i: int, doc: Any, n: int) -> str:
    if n == 1:
        return ""
    name = doc.get("name") if isinstance(doc, dict) else None
    return f"[stage {i + 1}{f' {name!r}' if isinstance(name, str) else ''}] "


def _check_stage_name(recipe: Recipe, i: int, n: int, earlier: list[str | None]) -> Problems:
    name = recipe.name
    if name is None:
        return [("name", "every stage but the last needs a name")] if i < n - 1 else []
    if not STAGE_NAME.fullmatch(name):
        return [("name", f"{name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")]
    if name in earlier:
        return [("name", f"{name!r} names two stages")]
    return []


def _check_stage_refs(
    recipe: Recipe, stage: Stage | None, earlier: list[str | None], docs: list[Any]
) -> Problems:
    if stage is None:
        return []
    later = {_doc_name(d) for d in docs} - set(earlier)
    problems = []
    for ref, paths in stage.ref_paths().items():
        if ref == recipe.name:
            problems.append((paths[0], f"stage {ref!r} cannot use its own output"))
        elif ref in later:
            problems.append((paths[0], f"stage {ref!r} comes later in the file; reorder stages"))
    return problems


# ---- one recipe --------------------------------------------------------------------------------


def check_recipe(recipe: Recipe, label: str = "") -> tuple[Stage | None, Problems]:
    """Every problem of one recipe (paths relative to the document) and, if none, its Stage."""
    try:
        method = get_method(recipe.merge_method)
    except UsageError as e:
        return None, [("merge_method", str(e))]
    problems: Problems = []
    global_params = _check_params(recipe.parameters, "parameters", method, per_model=False)
    problems += global_params[1]
    problems += _check_options(recipe, method)
    slices, more = _build_slices(recipe, method)
    problems += more
    problems += _zero_weight_sums(slices, global_params[0], method)
    if problems:
        return None, problems
    size = parse_size(recipe.max_shard_size) if recipe.max_shard_size is not None else None
    stage = Stage(
        recipe=recipe,
        method=method,
        slices=tuple(slices),
        sliced=recipe.slices is not None,
        global_params=global_params[0],
        label=label,
        max_shard_size=size,
    )
    return stage, []


def _check_options(recipe: Recipe, method: MergeMethod) -> Problems:
    problems: Problems = []
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        try:
            parse_dtype(value)
        except UsageError:
            problems.append((key, f"unknown dtype {value!r}: use bfloat16, float16 or float32"))
    if recipe.max_shard_size is not None:
        try:
            parse_size(recipe.max_shard_size)
        except ValueError as e:
            problems.append(("max_shard_size", str(e)))
    if method.needs_base and recipe.base_model is None:
        problems.append(("base_model", f"{method.name} needs a base_model; add `base_model:`"))
    problems += _check_tokenizer(recipe)
    for path, ref in _ref_entries(recipe):
        try:  # BASE+ADAPTER is a model with a LoRA adapter merged in (io/adapter.py)
            split_adapter_ref(ref)
        except UsageError as e:
            problems.append((path, str(e)))
    if (recipe.models is None) == (recipe.slices is None):
        problems.append(("models", "give exactly one of `models:` and `slices:`"))
    return problems


def _check_tokenizer(recipe: Recipe) -> Problems:
    key = "tokenizer.source" if recipe.tokenizer_source is None else "tokenizer_source"
    tok = recipe.token_source
    problems: Problems = []
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        problems.append(("tokenizer", "give tokenizer_source or tokenizer.source, not both"))
    for extra in sorted(set(recipe.tokenizer or {}) - {"source", "pad_to_multiple_of"}):
        problems.append(
            (
                f"tokenizer.{extra}",
                "not supported yet; only tokenizer.source and tokenizer.pad_to_multiple_of are "
                "(no per-token embedding sources)",
            )
        )
    if "pad_to_multiple_of" in (recipe.tokenizer or {}):
        pad = (recipe.tokenizer or {})["pad_to_multiple_of"]
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 1:
            problems.append(("tokenizer.pad_to_multiple_of", f"a positive integer, got {pad!r}"))
        elif tok != "union":
            problems.append(
                ("tokenizer.pad_to_multiple_of", "needs `source: union` (it pads the union)")
            )
    if recipe.chat_template is not None:
        why = chat_template_problem(recipe.chat_template)
        if why is not None:
            problems.append(("chat_template", why))
    if tok == "base" and recipe.base_model is None:
        problems.append((key, "'base' needs a base_model"))
    elif tok not in (None, "base", "union") and not any(
        same_ref(tok, r) for r in _all_refs(recipe)
    ):
        problems.append(
            (key, f"{tok!r} is not a model of this recipe; use 'base', 'union' or a model")
        )
    elif recipe.tokenizer is not None and tok is None:
        problems.append(("tokenizer.source", "required key is missing"))
    return problems


def _ref_entries(recipe: Recipe) -> list[tuple[str, str]]:
    out = [("base_model", recipe.base_model)] if recipe.base_model else []
    for i, m in enumerate(recipe.models or []):
        out.append((f"models[{i}].model", m.model))
    for i, s in enumerate(recipe.slices or []):
        for j, src in enumerate(s.sources):
            out.append((f"slices[{i}].sources[{j}].model", src.model))
    return out


def _all_refs(recipe: Recipe) -> list[str]:
    return [ref for _, ref in _ref_entries(recipe)]


# ---- models and slices -------------------------------------------------------------------------


def _build_slices(recipe: Recipe, method: MergeMethod) -> tuple[list[SliceSpec], Problems]:
    base = recipe.base_model
    apart = base is not None and method.name not in BASE_AS_MODEL
    problems: Problems = []
    if recipe.models is not None:
        sources, base_src = [], None
        for i, m in enumerate(recipe.models):
            params, more = _check_params(m.parameters, f"models[{i}].parameters", method, True)
            problems += more
            src = Source(m.model, None, params, f"models[{i}].model")
            if apart and same_ref(m.model, base):  # type: ignore[arg-type]
                base_src = base_src or src
            else:
                sources.append(src)
        if apart and base_src is None:
            base_src = Source(base, None, {}, "base_model")  # type: ignore[arg-type]
        listed = any(same_ref(m.model, base) for m in recipe.models) if base else True
        if method.name in BASE_MERGED_IN and not listed:
            sources.append(Source(base, None, {}, "base_model"))  # type: ignore[arg-type]
        problems += _check_count(method, len(sources), "models")
        return [SliceSpec(tuple(sources), base_src if apart else None, {}, "models")], problems
    slices = []
    for i, s in enumerate(recipe.slices or []):
        spec, more = _build_slice(s, i, base if apart else None, method)
        slices.append(spec)
        problems += more
    return slices, problems


def _build_slice(
    s: Any, i: int, base: str | None, method: MergeMethod
) -> tuple[SliceSpec, Problems]:
    path = f"slices[{i}]"
    params, problems = _check_params(s.parameters, f"{path}.parameters", method, per_model=False)
    sources, base_src = [], None
    for j, src in enumerate(s.sources):
        where = f"{path}.sources[{j}]"
        sp, more = _check_params(src.parameters, f"{where}.parameters", method, per_model=True)
        problems += more
        start, end = src.layer_range
        if not 0 <= start < end:
            problems.append((f"{where}.layer_range", f"[{start}, {end}] is empty or negative"))
        entry = Source(src.model, (start, end), sp, f"{where}.model")
        if base is not None and same_ref(src.model, base):
            base_src = base_src or entry
        else:
            sources.append(entry)
    lengths = {b - a for a, b in (x.layer_range for x in s.sources)}
    if len(lengths) > 1:
        problems.append(
            (f"{path}.sources", f"layer ranges differ in length {sorted(lengths)}; make them equal")
        )
    if base is not None and base_src is None and sources:
        # the base, when not listed in the slice, contributes the first source's layers
        base_src = Source(base, sources[0].layer_range, {}, "base_model")
    problems += _check_count(method, len(sources), f"{path}.sources")
    return SliceSpec(tuple(sources), base_src, params, path), problems


def _check_count(method: MergeMethod, n: int, path: str) -> Problems:
    lo, hi = method.min_models, method.max_models
    if n >= lo and (hi is None or n <= hi):
        return []
    want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
    besides = " besides the base model" if method.name not in BASE_AS_MODEL else ""
    return [(path, f"{method.name} takes {want} model(s){besides}; the recipe gives {n}")]


def _divides_by_weight_sum(method: MergeMethod) -> bool:
    """linear, and the task-vector methods without sign election, divide by sum_i w_i when
    normalize is on (methods with election divide per entry, where 0 becomes 1)."""
    if method.name == "linear":
        return True
    return (getattr(method.fn, "keywords", None) or {}).get("elect") is False


def _zero_weight_sums(
    slices: list[SliceSpec], global_params: Params, method: MergeMethod
) -> Problems:
    """Scalar weights that sum to zero under normalize: found here, before any tensor is read,
    rather than at the first tensor (gradient and filtered weights are still checked there)."""
    if not _divides_by_weight_sum(method):
        return []

    def default(model: type[BaseModel], name: str) -> Any:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == name), None)
        return None if field is None or field.is_required() else field.default

    problems: Problems = []
    for s in slices:
        normalize = s.params.get("normalize", global_params.get("normalize"))
        if normalize is None:
            normalize = default(method.global_params, "normalize")
        fallback = s.params.get("weight", global_params.get("weight"))
        if fallback is None:
            fallback = default(method.model_params, "weight")
        weights = [src.params.get("weight", fallback) for src in s.sources]
        numbers = all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
        if normalize is True and numbers and weights and abs(sum(weights)) < 1e-8:
            problems.append(
                (
                    s.path,
                    f"the model weights {weights} sum to 0, and normalize: true divides by "
                    "their sum; change the weights or set normalize: false",
                )
            )
    return problems


# ---- parameters --------------------------------------------------------------------------------


def _check_params(
    raw: dict[str, Any] | None, path: str, method: MergeMethod, per_model: bool
) -> tuple[dict[str, Any], Problems]:
    """Parse one level of parameters; check names against the method and values against the
    method's field types (each value on its own: cross-field checks run per tensor)."""
    if not raw:
        return {}, []
    model_names, global_names = method.model_param_names(), method.global_param_names()
    allowed = model_names if per_model else model_names | global_names
    parsed: dict[str, Any] = {}
    problems: Problems = []
    for name, value in raw.items():
        where = f"{path}.{name}"
        if name not in allowed:
            problems.append((where, _unknown_param(name, method, per_model)))
            continue
        setting, more = parse_setting(value, where)
        problems += more
        if setting is None:
            continue
        owner = method.model_params if name in model_names else method.global_params
        for leaf in leaf_values(setting):
            msg = check_value(owner, name, leaf)
            if msg:
                problems.append((where, msg))
                break
        parsed[name] = setting
    return parsed, problems


def _unknown_param(name: str, method: MergeMethod, per_model: bool) -> str:
    if per_model and name in method.global_param_names():
        return (
            f"'{name}' is a global parameter of {method.name}: set it under `parameters:` "
            "(of the recipe or of a slice), not per model"
        )
    known = sorted(
        method.model_param_names() | (set() if per_model else method.global_param_names())
    )
    hint = difflib.get_close_matches(name, known, n=1)
    more = f" (did you mean {hint[0]}?)" if hint else ""
    listed = ", ".join(known) if known else "none"
    return f"unknown parameter for {method.name}{more}; known: {listed}"


_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def check_value(model: type[BaseModel], yaml_name: str, value: Any) -> str | None:
    """None if `value` fits the field `yaml_name` of a method's parameter model."""
    for fname, field in model.model_fields.items():
        if (field.alias or fname) != yaml_name:
            continue
        annotated = (
            Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        )
        try:
            TypeAdapter(annotated, config=_STRICT).validate_python(value)
        except ValidationError as e:
            return f"{value!r}: {e.errors()[0]['msg']}"
        return None
    return None
