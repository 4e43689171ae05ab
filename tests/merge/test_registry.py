"""The merge-method registry: lookup, strict parameter models, entry-point plug-ins, docs."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mergekit_rl.errors import UsageError
from mergekit_rl.merge import registry
from mergekit_rl.merge.methods import BUILTINS
from mergekit_rl.merge.registry import (
    ENTRY_POINT_GROUP,
    MethodParams,
    NoParams,
    TensorContext,
    get_method,
    list_methods,
)

BUILTIN_NAMES = {
    "linear",
    "slerp",
    "nuslerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "karcher",
    "passthrough",
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


@pytest.fixture(autouse=True)
def _fresh_table() -> Iterator[None]:
    """Each test sees a freshly loaded table, and leaves none behind."""
    registry._reset()
    yield
    registry._reset()


def test_the_fourteen_builtins_are_registered() -> None:
    assert {m.name for m in list_methods()} == BUILTIN_NAMES
    for m in list_methods():
        assert m.description and (m.min_models >= 1)
        assert m.max_models is None or m.max_models >= m.min_models


def test_unknown_method_suggests_the_closest_name() -> None:
    with pytest.raises(UsageError, match=r"unknown merge_method 'tie'\. Did you mean 'ties'\?"):
        get_method("tie")
    with pytest.raises(UsageError, match="Known methods: breadcrumbs, "):
        get_method("zzz")


def _ctx(n: int) -> TensorContext:
    return TensorContext("model.norm.weight", tuple(f"m{i}" for i in range(n)))


def test_unknown_model_parameter_is_an_error_with_a_hint() -> None:
    xs, base = [torch.ones(3), torch.ones(3) * 2], torch.zeros(3)
    with pytest.raises(UsageError) as e:
        get_method("ties").run(_ctx(2), xs, base, [{"desnity": 0.5}, {}], {})
    msg = str(e.value)
    assert "model 'm0': unknown parameter 'desnity' (did you mean 'density'?)" in msg
    assert "tensor 'model.norm.weight'" in msg


def test_unknown_global_parameter_and_bad_values_are_all_reported() -> None:
    xs, base = [torch.ones(3), torch.ones(3) * 2], torch.zeros(3)
    with pytest.raises(UsageError) as e:
        get_method("ties").run(
            _ctx(2), xs, base, [{"density": 1.5}, {"weight": "x"}], {"normalise": True}
        )
    msg = str(e.value)
    assert "unknown parameter 'normalise' (did you mean 'normalize'?)" in msg
    assert "parameter 'density' = 1.5" in msg
    assert "parameter 'weight' = 'x'" in msg


def test_required_parameter_and_model_count_are_checked() -> None:
    x, base = torch.ones(3), torch.zeros(3)
    with pytest.raises(UsageError, match="parameter 't' is required"):
        get_method("slerp").run(_ctx(1), [x], base, [{}], {})
    with pytest.raises(UsageError, match="needs a base_model"):
        get_method("ties").run(_ctx(1), [x], None, [{}], {})
    with pytest.raises(UsageError, match="exactly 2 models"):
        get_method("nuslerp").run(_ctx(1), [x], None, [{}], {})
    with pytest.raises(UsageError, match="input shapes differ"):
        get_method("linear").run(_ctx(2), [x, torch.ones(4)], None, [{}, {}], {})


# ---- plug-ins -------------------------------------------------------------------------------


class ScaleParams(MethodParams):
    factor: float = 2.0


def _scaled_first(
    ctx: TensorContext, tensors: list[Tensor], base: Tensor | None, mps: list, gp: ScaleParams
) -> Tensor:
    return tensors[0] * gp.factor


# a plug-in built from a built-in's metadata (no base, one model or more)
PLUGIN = dataclasses.replace(
    next(m for m in BUILTINS if m.name == "linear"),
    name="scaled_first",
    fn=_scaled_first,
    global_params=ScaleParams,
    model_params=NoParams,
    description="the first model times a factor (test plug-in)",
)
CLASHING = dataclasses.replace(PLUGIN, name="ties")
NOT_A_METHOD = object()


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    eps = [
        importlib.metadata.EntryPoint(name=t, value=f"{__name__}:{t}", group=ENTRY_POINT_GROUP)
        for t in targets
    ]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return eps if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_point_plugin_is_registered_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(monkeypatch, "PLUGIN")
    method = get_method("scaled_first")
    assert method is PLUGIN
    assert {m.name for m in list_methods()} == BUILTIN_NAMES | {"scaled_first"}
    got = method.run(_ctx(1), [torch.tensor([1.0, -2.0])], None, [{}], {"factor": 3.0})
    assert torch.equal(got, torch.tensor([3.0, -6.0]))
    with pytest.raises(UsageError, match="did you mean 'factor'"):
        method.run(_ctx(1), [torch.ones(2)], None, [{}], {"facter": 3.0})


@pytest.mark.parametrize(
    "target,message",
    [
        ("CLASHING", "'ties' is registered twice"),
        ("NOT_A_METHOD", "is a object, not a mergekit_rl.merge.registry.MergeMethod"),
        ("MISSING", "plug-in 'MISSING' .* failed to load"),
    ],
)
def test_bad_plugins_name_themselves(
    monkeypatch: pytest.MonkeyPatch, target: str, message: str
) -> None:
    _fake_entry_points(monkeypatch, target)
    with pytest.raises(UsageError, match=message):
        get_method("linear")


# ---- docs/methods.md stays in sync with the parameter models ------------------------------------


def test_every_method_and_parameter_is_documented_with_its_default() -> None:
    text = DOCS.read_text()
    for m in list_methods():
        section = re.search(rf"^## `{m.name}`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert section, f"docs/methods.md has no '## `{m.name}`' section"
        body = section.group(1)
        for model in (m.model_params, m.global_params):
            for field_name, field in model.model_fields.items():
                yaml_name = field.alias or field_name
                assert f"`{yaml_name}`" in body, f"{m.name}: parameter {yaml_name} not documented"
                if not field.is_required():
                    default = str(field.default).lower()
                    row = re.search(rf"`{yaml_name}`[^\n]*", body)
                    assert row and default in row.group(0).lower(), (
                        f"{m.name}: default of {yaml_name} ({default}) not on its docs line"
                    )
