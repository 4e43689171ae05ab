"""Recipe schema and validation: every problem at once, each with its YAML path."""

from __future__ import annotations

import pytest

from mergekit_rl.errors import RecipeError, UsageError
from mergekit_rl.recipe.checks import load_pipeline, parse_size
from mergekit_rl.recipe.schema import yaml_path


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as err:
        load_pipeline(text, "r.yaml")
    assert err.value.source == "r.yaml"
    return err.value.problems


def paths(text: str) -> list[str]:
    return [p for p, _ in problems(text)]


def test_yaml_path() -> None:
    assert yaml_path(("models", 1, "parameters", "density")) == "models[1].parameters.density"
    assert (
        yaml_path(("slices", 0, "sources", 2, "layer_range")) == "slices[0].sources[2].layer_range"
    )
    assert yaml_path(()) == ""


def test_valid_recipe_and_base_taken_apart() -> None:
    [stage] = load_pipeline(
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: b\n  - model: x\n"
        "    parameters: {density: [0.2, 0.8], weight: 0.5}\nparameters: {normalize: false}\n",
        "r.yaml",
    )
    [spec] = stage.slices
    assert spec.base is not None and spec.base.ref == "b"
    assert [s.ref for s in spec.sources] == ["x"]
    assert stage.refs() == ["b", "x"] and stage.recipe.seed == 0
    [linear] = load_pipeline("merge_method: linear\nbase_model: b\nmodels: [{model: b}]\n", "r")
    assert linear.slices[0].base is None and [s.ref for s in linear.slices[0].sources] == ["b"]


def test_every_problem_with_its_path() -> None:
    got = problems(
        """
merge_method: ties
models:
  - modle: a
  - model: b
    parameters: {desnity: 0.5, weight: "0.5", normalize: true}
parameters: {density: 1.5}
out_dtype: float8
tokenizer_source: c
"""
    )
    by_path = dict(got)
    assert "did you mean model?" in by_path["models[0].modle"]
    assert "did you mean density?" in by_path["models[1].parameters.desnity"]
    assert "models[1].parameters.weight" in by_path
    assert "global parameter" in by_path["models[1].parameters.normalize"]
    assert "1.5" in by_path["parameters.density"]
    assert "unknown dtype" in by_path["out_dtype"]
    assert "needs a base_model" in by_path["base_model"]
    assert "not a model of this recipe" in by_path["tokenizer_source"]


def test_counts_ranges_and_tokenizer() -> None:
    got = problems(
        """
merge_method: slerp
base_model: b
tokenizer_source: union
slices:
  - sources:
      - {model: x, layer_range: [0, 4]}
      - {model: y, layer_range: [2, 4]}
  - sources:
      - {model: x, layer_range: [3, 3]}
"""
    )
    at = [m for p, m in got if p == "slices[0].sources"]
    assert any("differ in length" in m for m in at)
    assert any("exactly 1 model" in m and "gives 2" in m for m in at)
    assert any(p == "slices[1].sources[0].layer_range" and "empty" in m for p, m in got)
    assert not any(p == "tokenizer_source" for p, _ in got)  # union is accepted


def test_layer_lengths_must_match() -> None:
    text = (
        "merge_method: linear\nslices:\n  - sources:\n"
        "      - {model: x, layer_range: [0, 4]}\n      - {model: y, layer_range: [2, 4]}\n"
    )
    [(path, msg)] = problems(text)
    assert path == "slices[0].sources" and "[2, 4]" in msg


def test_yaml_errors() -> None:
    [(path, msg)] = problems("merge_method: [linear\n")
    assert path.startswith("line ") and "not valid YAML" in msg
    assert "empty" in problems("")[0][1]
    assert "mapping" in problems("- a\n- b\n")[0][1]


def test_pipeline_names_and_references() -> None:
    got = problems(
        """
merge_method: linear
models: [{model: a}]
---
name: bad name
merge_method: linear
models: [{model: c}]
---
name: c
merge_method: linear
models: [{model: c}]
"""
    )
    assert ("[stage 1] name", "every stage but the last needs a name") in got
    assert any(p == "[stage 2 'bad name'] name" for p, _ in got)
    assert any(p == "[stage 2 'bad name'] models[0].model" and "later" in m for p, m in got)
    assert any(p == "[stage 3 'c'] models[0].model" and "own output" in m for p, m in got)


def test_pipeline_ok_refers_to_earlier_stage() -> None:
    stages = load_pipeline(
        "name: s1\nmerge_method: linear\nmodels: [{model: a}, {model: b}]\n---\n"
        "merge_method: slerp\nbase_model: a\nmodels: [{model: s1}]\nparameters: {t: 0.5}\n",
        "r",
    )
    assert [s.name for s in stages] == ["s1", None]
    assert stages[1].refs() == ["a", "s1"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        parse_size(0)
    assert parse_size("1.5 GiB") == 3 * 2**29 and parse_size(".5KB") == 500
    assert parse_size("2k") == 2000 and parse_size("3 TiB") == 3 * 2**40 and parse_size("7") == 7
    for bad in ("1.2.3", ".", "1..5MB", "5 XB", "5iB", "5i", "-1", True):
        with pytest.raises(UsageError, match="is not a size"):
            parse_size(bad)  # type: ignore[arg-type]
    got = dict(problems("merge_method: linear\nmodels: [{model: a}]\nmax_shard_size: 1.2.3\n"))
    assert "'1.2.3' is not a size" in got["max_shard_size"]


def test_mergekit_tokenizer_block() -> None:
    [stage] = load_pipeline(
        "merge_method: linear\nmodels: [{model: a}, {model: b}]\ntokenizer: {source: b}\n", "r"
    )
    assert stage.recipe.token_source == "b"
    got = problems(
        "merge_method: linear\nmodels: [{model: a}]\n"
        "tokenizer: {source: union, tokens: {x: 1}}\nchat_template: chatml\n"
    )
    assert [p for p, _ in got] == ["tokenizer.tokens"]
    assert "not supported yet" in got[0][1]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("chatml", True),
        ("llama3", True),
        ("alpaca", True),
        ("mistral", True),
        ("auto", True),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", True),
        ("chatlm", False),  # a mistyped name
        ("{{ short }}", False),  # shorter than any template
        ("a long value that holds no braces at all", False),
    ],
)
def test_chat_template_values(value: str, ok: bool) -> None:
    text = f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: {value!r}\n"
    if ok:
        [stage] = load_pipeline(text, "r.yaml")
        assert stage.recipe.chat_template == value
    else:
        [(path, msg)] = problems(text)
        assert path == "chat_template" and "unknown template" in msg and "chatml" in msg
