"""Every recipe in recipes/train runs for a few steps through the CLI on the tiny demo layout
(DIR/models/{base,sft1,sft2,rlhf}, recipes beside DIR) and writes a final model that loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from tests.conftest import load_state

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes" / "train").glob("*.yaml"))


@pytest.fixture
def demo_dir(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The layout `rlmerge demo DIR` makes, with the recipes at DIR/../recipes; cwd = DIR."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "models").symlink_to(family["base"].parent, target_is_directory=True)
    (tmp_path / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    monkeypatch.chdir(demo)
    return demo


def test_recipes_are_found() -> None:
    assert {p.stem for p in RECIPES} >= {
        "dpo-ondare",
        "dpo-onties",
        "kto-ondare",
        "grpo-elastic-reset",
        "grpo-salsa",
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_the_tiny_family(recipe: Path, demo_dir: Path, family: dict[str, Path]):
    from transformers import AutoModelForCausalLM

    result = CliRunner().invoke(
        app, ["train", f"../recipes/train/{recipe.name}", "--max-steps", "2", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2
    final = demo_dir / summary["final"]
    model = AutoModelForCausalLM.from_pretrained(final)
    start = load_state(family["sft1"])
    trained = model.state_dict()
    assert all(torch.isfinite(trained[k]).all() for k in start)
    assert (final / "rlmerge_recipe.yaml").read_text() == recipe.read_text()
    records = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    if "elastic_reset:" in recipe.read_text():  # reset_every: 2 in the shipped recipe
        assert [r.get("elastic/num_resets") for r in records if "loss" in r] == [0, 1]
    if "evaluation:" in recipe.read_text():
        assert any("eval/perplexity" in r and "eval/kl" in r for r in records)
