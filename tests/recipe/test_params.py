"""Parameter values: scalars, gradients over depth, filter lists, precedence."""

from __future__ import annotations

import pytest

from mergekit_rl.recipe.params import (
    Conditional,
    Gradient,
    eval_gradient,
    evaluate,
    leaf_values,
    parse_setting,
    resolve,
)


def test_parse_scalars_gradients_and_filters() -> None:
    assert parse_setting(0.5, "p") == (0.5, [])
    assert parse_setting(True, "p") == (True, [])
    assert parse_setting([0, 0.5, 1], "p") == (Gradient((0, 0.5, 1)), [])
    got, problems = parse_setting([{"filter": "mlp", "value": [0, 1]}, {"value": 0.3}], "p")
    assert problems == []
    assert got == (Conditional("mlp", Gradient((0, 1))), Conditional(None, 0.3))


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([], "p"),
        ([1, {"value": 2}], "p"),
        ({"filter": "mlp"}, "p.value"),
        ([{"value": 1, "flter": "x"}], "p[0].flter"),
        ([{"filter": 3, "value": 1}], "p[0].filter"),
        ({"value": {"a": 1}}, "p.value"),
    ],
)
def test_bad_values_name_their_path(raw, path) -> None:
    got, problems = parse_setting(raw, "p")
    assert got is None
    assert [p for p, _ in problems] == [path]


def test_gradient_interpolates_linearly_over_depth() -> None:
    values = (0.0, 1.0, 0.0)
    assert [eval_gradient(values, t) for t in (0, 0.25, 0.5, 0.75, 1)] == [0, 0.5, 1, 0.5, 0]
    assert eval_gradient((0.2, 0.8), 1 / 3) == pytest.approx(0.4)
    assert eval_gradient((7,), 0.6) == 7.0
    assert eval_gradient((True, False), 0.4) is True  # non-numbers: the entry at or below t


def test_filters_first_match_wins_and_fall_through() -> None:
    setting = (Conditional("self_attn", 1.0), Conditional("mlp", Gradient((0.0, 2.0))))
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 1.0
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 1.0
    assert evaluate(setting, "model.norm.weight", 0.5) is None
    assert leaf_values(setting) == [1.0, 0.0, 2.0]


def test_precedence_model_then_slice_then_global() -> None:
    model = {"weight": (Conditional("mlp", 3.0),)}
    slice_ = {"weight": 2.0, "density": 0.4}
    glob = {"weight": 1.0, "density": Gradient((0.2, 1.0)), "normalize": False}
    levels = [model, slice_, glob]
    assert resolve(["weight", "density"], levels, "x.mlp.w", 0.5) == {"weight": 3.0, "density": 0.4}
    assert resolve(["weight"], levels, "x.attn.w", 0.5) == {"weight": 2.0}  # filter missed
    assert resolve(["density", "lambda"], [None, {}, glob], "x", 0.5) == {"density": 0.6}
