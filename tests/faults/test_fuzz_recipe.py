"""The recipe loader on random and mutated YAML (hypothesis): every case either validates or
raises RecipeError naming the file and listing problems by YAML path (exit 2 in the CLI);
never another exception. Mutations start from every shipped recipe in recipes/.
RLMERGE_FUZZ_EXAMPLES sets the cases per test (bench/faults.py runs more)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.errors import RecipeError
from mergekit_rl.merge.registry import list_methods
from mergekit_rl.recipe.checks import load_pipeline
from mergekit_rl.recipe.run import load_recipe

EXAMPLES = int(os.environ.get("RLMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SHIPPED = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
SOURCE = "fuzz.yaml"

KEYS = [
    "merge_method", "base_model", "models", "model", "parameters", "weight", "density",
    "epsilon", "lambda", "normalize", "int8_mask", "t", "slices", "sources", "layer_range",
    "filter", "value", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "source",
    "chat_template", "name", "seed", "max_shard_size", "gamma", "select_topk", "rescale",
]  # fmt: skip
NAMES = st.sampled_from(KEYS + [m.name for m in list_methods()]) | st.text(max_size=6)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | NAMES
    | st.sampled_from(["5GB", "-1MB", "bfloat16", "base", "[0, 2]", "1e400"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=5),
    max_leaves=25,
)


def check(text: str) -> None:
    try:
        stages = load_pipeline(text, SOURCE)
    except RecipeError as e:
        assert str(e).startswith(SOURCE) and e.problems
        assert all(isinstance(p, str) and isinstance(m, str) for p, m in e.problems)
        return
    assert stages


@FUZZ
@given(docs=st.lists(VALUES, min_size=1, max_size=3))
def test_fuzz_random_documents(docs: list[Any]) -> None:
    check(yaml.safe_dump_all(docs))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}, \n\t'\"&*!|>%@#0.")), max_size=80))
def test_fuzz_random_yaml_text(text: str) -> None:
    check(text)


def mutate(doc: Any, data: st.DataObject) -> Any:
    """Drop, replace or add one thing at a random place of a parsed recipe."""
    if isinstance(doc, dict) and doc and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(doc, key=str)))
        action = data.draw(st.sampled_from(["drop", "replace", "descend", "add"]))
        if action == "drop":
            doc.pop(key)
        elif action == "replace":
            doc[key] = data.draw(VALUES)
        elif action == "add":
            doc[data.draw(NAMES)] = data.draw(VALUES)
        else:
            doc[key] = mutate(doc[key], data)
        return doc
    if isinstance(doc, list) and doc:
        i = data.draw(st.integers(0, len(doc) - 1))
        action = data.draw(st.sampled_from(["drop", "duplicate", "descend", "replace"]))
        if action == "drop":
            doc.pop(i)
        elif action == "duplicate":
            doc.append(doc[i])
        elif action == "replace":
            doc[i] = data.draw(VALUES)
        else:
            doc[i] = mutate(doc[i], data)
        return doc
    return data.draw(VALUES)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_shipped_recipes(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(SHIPPED))
    docs = list(yaml.safe_load_all(path.read_text()))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(docs) - 1))
        docs[i] = mutate(docs[i], data)
    check(yaml.safe_dump_all(docs))


@pytest.mark.parametrize("blob", [b"\xff\xfe\x00garbage", b"merge_method: \x80linear\n"])
def test_recipe_file_that_is_not_text(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(blob)
    with pytest.raises(RecipeError, match="r.yaml"):
        load_recipe(path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "r.yaml" in result.stderr
