"""Generated docs stay generated: training.md's key reference (from the train recipe schema),
cli.md's command table (from the Typer app) and its JSON schema (from cli/common.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_rl.cli import gendocs
from mergekit_rl.cli.common import JSON_SCHEMA

from mergekit_rl.train.recipe import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_schema_key_is_described_and_no_description_is_stale() -> None:
    keys = gendocs.schema_keys()
    assert {"reward.function.call", "reward.model.path", "optimizer.tau_l1_rescale"} <= set(keys)
    assert "reward.keyword.case_sensitive" in keys
    missing = [k for k in keys if k not in gendocs.KEY_DOCS]
    assert not missing, f"describe these keys in cli/gendocs.py KEY_DOCS: {missing}"
    stale = sorted(set(gendocs.KEY_DOCS) - set(keys))
    assert not stale, f"KEY_DOCS describes keys the schema does not have: {stale}"


def test_training_md_key_reference_is_generated_from_the_schema() -> None:
    doc = (ROOT / "docs" / "training.md").read_text()
    assert doc == gendocs.render(doc), (
        "docs/training.md's key reference is out of date: run python -m mergekit_rl.cli.gendocs"
    )
    for key in gendocs.schema_keys():
        assert f"| `{key}` |" in doc, key
    # defaults come from the schema itself
    reserve = TrainRecipe.model_fields["optimizer"].default.reserve_p
    assert f"| `optimizer.reserve_p` | number | `{reserve}` |" in doc


def test_docs_do_not_point_outside_the_repository() -> None:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in path.read_text(), path


def test_cli_md_command_table_and_json_schema_are_the_codes() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert doc == gendocs.render(doc, gendocs.COMMANDS_BLOCK), (
        "docs/cli.md's command table is out of date: run python -m mergekit_rl.cli.gendocs"
    )
    assert doc == gendocs.render(doc, gendocs.SCHEMA_BLOCK), (
        "docs/cli.md's JSON schema is out of date: run python -m mergekit_rl.cli.gendocs"
    )
    schema_block = doc.split("### JSON schema", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(schema_block) == JSON_SCHEMA
    # the schema appears once, inside its block, not pasted into the prose around it
    assert doc.count('"$schema"') == 1
    assert "(`mergekit_rl.cli.common.JSON_SCHEMA`)" in doc
