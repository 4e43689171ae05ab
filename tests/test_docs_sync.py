"""docs/training.md's key reference is the one generated from the train recipe schema."""

from __future__ import annotations

from pathlib import Path

from mergekit_rl.cli import recipe_docs

from mergekit_rl.train.recipe import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_schema_key_is_described_and_no_description_is_stale() -> None:
    keys = recipe_docs.schema_keys()
    assert {"reward.function.call", "reward.model.path", "optimizer.tau_l1_rescale"} <= set(keys)
    assert "reward.keyword.case_sensitive" in keys
    missing = [k for k in keys if k not in recipe_docs.KEY_DOCS]
    assert not missing, f"describe these keys in cli/recipe_docs.py KEY_DOCS: {missing}"
    stale = sorted(set(recipe_docs.KEY_DOCS) - set(keys))
    assert not stale, f"KEY_DOCS describes keys the schema does not have: {stale}"


def test_training_md_key_reference_is_generated_from_the_schema() -> None:
    doc = (ROOT / "docs" / "training.md").read_text()
    assert doc == recipe_docs.render(doc), (
        "docs/training.md's key reference is out of date: run python -m mergekit_rl.cli.recipe_docs"
    )
    for key in recipe_docs.schema_keys():
        assert f"| `{key}` |" in doc, key
    # defaults come from the schema itself
    reserve = TrainRecipe.model_fields["optimizer"].default.reserve_p
    assert f"| `optimizer.reserve_p` | number | `{reserve}` |" in doc


def test_docs_do_not_point_outside_the_repository() -> None:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in path.read_text(), path
