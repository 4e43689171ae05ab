"""The merge-method registry: one table of methods, filled by built-ins and plug-ins alike.

A method is a pure function over one output tensor plus two pydantic models that are its schema:
`model_params` (per input model, e.g. weight, density) and `global_params` (e.g. normalize,
lambda, t). Both forbid unknown keys, so a misspelled recipe key is an error instead of being
silently ignored.

The table is filled lazily on first use: the built-ins, then every entry point of the group
`mergekit_rl.methods` (each loads one `MergeMethod`). Both go through `register`, which refuses a
second method with the same name. The built-ins are handed in by methods.py (`set_builtins`),
which the package `mergekit_rl.merge` imports first: this module imports no method, so the
methods can import its types.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from ..errors import UsageError

ENTRY_POINT_GROUP = "mergekit_rl.methods"


class MethodParams(BaseModel):
    """Base of every parameter model (built-in or plug-in): unknown keys are errors, values are
    strictly typed (no "0.5" strings or booleans for numbers) and finite."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False
    )


class NoParams(MethodParams):
    pass


@dataclass(frozen=True)
class TensorContext:
    name: str  # output tensor name, e.g. "model.layers.3.mlp.up_proj.weight"
    model_ids: tuple[str, ...]  # one id per non-base input tensor (seeds random masks)
    seed: int = 0  # recipe seed
    # set when the tensors are one row block of the output tensor (engine row blocks):
    offset: int = 0  # flat index of the block's first entry in the whole tensor (mask hashes)
    cuts: tuple[Any, ...] | None = None  # per-model selection.MagnitudeCut of the whole tensor
    # per-model L1 rescale factor of the whole tensor (blend.l1_factor; None: nothing kept)
    l1_factors: tuple[float | None, ...] | None = None
    slerp: Any = None  # blend.SlerpWeights of the whole tensor (slerp's angle)
    # float64 [n, n] Gram matrix of the method's vectors over the whole tensor (karcher's
    # inputs, model_stock's task vectors): blend.gram_sums
    gram: Any = None
    # per-model bool keep mask of this block, recorded by an earlier pass over the blocks (the
    # random sparsifiers need not draw it again): kept = delta * mask
    keep_masks: tuple[Any, ...] | None = None
    min_keep: int = 1  # TIES keeps at least this many entries when density > 0 (mergekit: 1)


# fn(ctx, tensors, base, model_params, global_params) -> merged tensor
MethodFn = Callable[[TensorContext, list[Tensor], Tensor | None, list[Any], Any], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    global_params: type[BaseModel]  # extra="forbid", frozen
    model_params: type[BaseModel]  # per input model, extra="forbid"
    needs_base: bool
    min_models: int  # non-base models
    max_models: int | None
    paper: str | None  # link
    description: str  # one line

    def model_param_names(self) -> set[str]:
        """Per-model parameter names as written in YAML (aliases, e.g. "lambda")."""
        return _yaml_names(self.model_params)

    def global_param_names(self) -> set[str]:
        """Global parameter names as written in YAML."""
        return _yaml_names(self.global_params)

    def param_names(self) -> set[str]:
        return self.model_param_names() | self.global_param_names()

    def run(
        self,
        ctx: TensorContext,
        tensors: list[Tensor],
        base: Tensor | None,
        model_params: list[dict[str, Any]],
        global_params: dict[str, Any],
    ) -> Tensor:
        """Validate the parameters and the inputs, then merge one tensor.

        tensors: float32, one per non-base model, all the shape of base (if any), on any device.
        Returns a new float32 tensor of that shape on that device; inputs are never modified.
        """
        self._check_inputs(ctx, tensors, base, model_params)
        gp, problems = _validate(self.global_params, global_params, "global parameters")
        mps = []
        for p, mid in zip(model_params, _ids(ctx, len(tensors)), strict=True):
            mp, more = _validate(self.model_params, p, f"model '{mid}'")
            mps.append(mp)
            problems += more
        if problems:
            raise UsageError(
                f"method '{self.name}', tensor '{ctx.name}': " + "; ".join(problems) + "."
            )
        return self.fn(ctx, tensors, base, mps, gp)

    def _check_inputs(
        self,
        ctx: TensorContext,
        tensors: list[Tensor],
        base: Tensor | None,
        model_params: list[dict[str, Any]],
    ) -> None:
        where = f"method '{self.name}', tensor '{ctx.name}'"
        n = len(tensors)
        if self.needs_base and base is None:
            raise UsageError(f"{where}: needs a base_model; set `base_model:` in the recipe.")
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            raise UsageError(
                f"{where}: takes {_count_text(self.min_models, self.max_models)} "
                f"(besides the base model), got {n}. Change the models listed in the recipe."
            )
        if len(model_params) != n:
            raise UsageError(f"{where}: got {len(model_params)} parameter sets for {n} models.")
        shapes = {tuple(x.shape) for x in [*tensors, *([base] if base is not None else [])]}
        if len(shapes) > 1:
            raise UsageError(f"{where}: input shapes differ: {sorted(shapes)}.")


def _ids(ctx: TensorContext, n: int) -> tuple[str, ...]:
    # model_ids may be shorter in hand-written calls; fall back to positions for messages
    return ctx.model_ids if len(ctx.model_ids) == n else tuple(str(i) for i in range(n))


def _count_text(lo: int, hi: int | None) -> str:
    if hi == lo:
        return f"exactly {lo} model{'s' if lo != 1 else ''}"
    if hi is None:
        return f"at least {lo} model{'s' if lo != 1 else ''}"
    return f"{lo} to {hi} models"


def _yaml_names(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _validate(model: type[BaseModel], values: dict[str, Any], who: str) -> tuple[Any, list[str]]:
    """Pydantic validation: (the parsed model or None, one message per bad parameter)."""
    try:
        return model.model_validate(values), []
    except ValidationError as e:
        known = sorted(_yaml_names(model))
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                hint = difflib.get_close_matches(key, known, n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else ""
                problems.append(
                    f"{who}: unknown parameter '{key}'{more}; known: {', '.join(known)}"
                )
            elif err["type"] == "missing":
                problems.append(f"{who}: parameter '{key}' is required")
            elif not key:  # a check across fields (model validator): its message names them
                problems.append(f"{who}: {err.get('ctx', {}).get('error', err['msg'])}")
            else:
                problems.append(f"{who}: parameter '{key}' = {err.get('input')!r}: {err['msg']}")
        return None, problems


# ---- the table -------------------------------------------------------------------------------

_methods: dict[str, MergeMethod] | None = None  # filled on first use by _load()
_builtin_names: frozenset[str] = frozenset()
_builtins: tuple[MergeMethod, ...] = ()  # methods.BUILTINS, handed in by set_builtins()


def set_builtins(methods: tuple[MergeMethod, ...]) -> None:
    """The built-in methods the table starts from (called once, by methods.py); a table loaded
    before is forgotten, so the next use reloads it with them."""
    global _builtins
    _builtins = tuple(methods)
    _reset()


def _table() -> dict[str, MergeMethod]:
    if _methods is None:
        _load()
    assert _methods is not None
    return _methods


def _load() -> None:
    global _methods, _builtin_names
    _methods = {}
    for method in _builtins:
        register(method)
    _builtin_names = frozenset(_methods)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            method = ep.load()
        except Exception as e:  # a broken plug-in must name itself
            raise UsageError(
                f"merge-method plug-in '{ep.name}' ({ep.value}) failed to load: {e}. "
                "Fix or uninstall the package that provides it."
            ) from e
        if not isinstance(method, MergeMethod):
            raise UsageError(
                f"merge-method plug-in '{ep.name}' ({ep.value}) is a {type(method).__name__}, "
                "not a mergekit_rl.merge.registry.MergeMethod."
            )
        register(method)


def register(method: MergeMethod) -> None:
    """Add a method to the table (built-ins and plug-ins alike). Names must be unique."""
    table = _table()
    if method.name in table:
        kind = "built-in" if method.name in _builtin_names else "already registered"
        raise UsageError(
            f"merge method '{method.name}' is registered twice ({kind} name); "
            "a plug-in must pick a name of its own."
        )
    table[method.name] = method


def get_method(name: str) -> MergeMethod:
    table = _table()
    if name in table:
        return table[name]
    hint = difflib.get_close_matches(name, list(table), n=1)
    more = f" Did you mean '{hint[0]}'?" if hint else ""
    raise UsageError(
        f"unknown merge_method '{name}'.{more} Known methods: {', '.join(sorted(table))}."
    )


def list_methods() -> list[MergeMethod]:
    return sorted(_table().values(), key=lambda m: m.name)


def _reset() -> None:
    """Forget the table so the next call reloads it (tests)."""
    global _methods, _builtin_names
    _methods, _builtin_names = None, frozenset()
