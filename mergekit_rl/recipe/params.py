"""Recipe parameter values: parse them once, evaluate them per tensor.

A parameter value in a recipe is one of (mergekit's format):
- a scalar: `density: 0.5`, `normalize: true`
- a gradient: `t: [0, 0.5, 1]`, interpolated linearly over depth
- a filter list: `t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]`; the first entry whose
  filter is a substring of the tensor name wins; an entry without filter (or `*`) matches all.
  When nothing matches, the lookup falls through to the next level.

Depth `t` of a tensor: `layer / (num_layers - 1)` within its slice (1 for a one-layer slice);
embeddings, the final norm and lm_head take t = 0, as in mergekit (the final norm and lm_head
take t = 1 with the recipe key `outer_depth: ends`).

Precedence, per tensor: per-model (slice source) > slice > global > the method's default (the
key is left out, so the method's pydantic model fills it in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

Scalar = Union[float, int, bool, str]  # noqa: UP007 - used at runtime in isinstance


@dataclass(frozen=True)
class Gradient:
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Conditional:
    filter: str | None  # substring of the tensor name; None or "*" matches every tensor
    value: Scalar | Gradient


Setting = Union[Scalar, Gradient, tuple[Conditional, ...]]  # noqa: UP007
Params = Mapping[str, Setting]  # one level: a model's, a slice's or the global parameters

_SCALARS = (bool, int, float, str)


def parse_setting(raw: Any, path: str) -> tuple[Setting | None, list[tuple[str, str]]]:
    """YAML value -> Setting, or (None, problems) naming `path`."""
    if isinstance(raw, _SCALARS):
        return raw, []
    if isinstance(raw, Mapping):
        cond, problems = _parse_conditional(raw, path)
        return ((cond,) if cond else None), problems
    if isinstance(raw, list) and raw:
        if all(isinstance(v, _SCALARS) for v in raw):
            return Gradient(tuple(raw)), []
        if all(isinstance(v, Mapping) for v in raw):
            conds, problems = [], []
            for i, item in enumerate(raw):
                cond, more = _parse_conditional(item, f"{path}[{i}]")
                problems += more
                if cond:
                    conds.append(cond)
            return (tuple(conds) if not problems else None), problems
    return None, [
        (
            path,
            f"{raw!r} is not a parameter value: use a number, a list of numbers (a gradient over "
            "layers) or a list of {filter, value} entries",
        )
    ]


def _parse_conditional(raw: Mapping, path: str) -> tuple[Conditional | None, list[tuple[str, str]]]:
    extra = sorted(set(raw) - {"filter", "value"})
    if extra:
        return None, [(f"{path}.{extra[0]}", "unknown key in a filter entry (use filter, value)")]
    if "value" not in raw:
        return None, [(f"{path}.value", "a filter entry needs a value")]
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        return None, [(f"{path}.filter", f"{flt!r} is not a string (a tensor-name substring)")]
    value = raw["value"]
    if isinstance(value, _SCALARS):
        return Conditional(flt, value), []
    if isinstance(value, list) and value and all(isinstance(v, _SCALARS) for v in value):
        return Conditional(flt, Gradient(tuple(value))), []
    return None, [(f"{path}.value", f"{value!r} is not a number or a list of numbers")]


def leaf_values(setting: Setting) -> list[Scalar]:
    """Every scalar a setting can evaluate to (for checks before any tensor is known)."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, tuple):
        out: list[Scalar] = []
        for cond in setting:
            out += leaf_values(cond.value)
        return out
    return [setting]


def eval_gradient(values: Sequence[Scalar], t: float) -> Scalar:
    """Piecewise-linear interpolation of `values` at depth t in [0, 1]; non-numeric lists
    (e.g. booleans) take the entry at or below t."""
    n = len(values)
    pos = t * (n - 1)
    i0 = min(int(pos), n - 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[i0]
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    return (1.0 - frac) * float(values[i0]) + frac * float(values[i1])


def evaluate(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of a setting for one tensor at depth t; None when no filter matches."""
    if isinstance(setting, Gradient):
        return eval_gradient(setting.values, t)
    if isinstance(setting, tuple):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t)
        return None
    return setting


def lookup(name: str, levels: Sequence[Params | None], tensor_name: str, t: float) -> Any:
    """First level (highest precedence first) whose setting for `name` matches the tensor."""
    for level in levels:
        if level and name in level:
            value = evaluate(level[name], tensor_name, t)
            if value is not None:
                return value
    return None


def resolve(
    names: Sequence[str], levels: Sequence[Params | None], tensor_name: str, t: float
) -> dict[str, Any]:
    """{name: value} for every parameter set at some level; unset ones are left out so the
    method's own default applies."""
    out = {}
    for name in names:
        value = lookup(name, levels, tensor_name, t)
        if value is not None:
            out[name] = value
    return out
