"""`rlmerge train` through the CLI: help, dry runs, and refusals with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from tests.cli.envelope import check

runner = CliRunner()

GRPO = {
    "algorithm": "grpo",
    "policy": "models/sft1",
    "dataset": {"path": "prompts.jsonl"},
    "reward": {"length": {"target": 8}},
    "training": {"output_dir": "runs/g", "batch_size": 4},
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]) -> None:
    """Run from tmp_path, where the recipes' dataset file and models/ exist (relative paths)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "models").symlink_to(family["base"].parent, target_is_directory=True)


def rl(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_help_has_an_example() -> None:
    code, out, _ = rl("train", "--help")
    assert code == 0
    for words in ("Example: rlmerge", "--resume", "--max-steps", "--dry-run", "--allow-code"):
        assert words in out, words


def test_dry_run_prints_the_resolved_recipe(tmp_path: Path) -> None:
    code, out, _ = rl("train", write(tmp_path, GRPO), "--dry-run", "--max-steps", 3)
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["training"]["max_steps"] == 3
    assert resolved["optimizer"]["name"] == "adamw"  # a default, filled in
    assert resolved["reward"]["length"] == {"target": 8, "penalty": 1.0, "weight": 1.0}
    code, out, _ = rl("train", write(tmp_path, GRPO), "--dry-run", "--json")
    assert code == 0 and check(out, "train")["recipe"]["training"]["num_generations"] == 4
    assert not (tmp_path / "runs").exists()


def test_bad_recipe_exits_2_with_every_path(tmp_path: Path) -> None:
    doc = {**GRPO, "reward": None, "optimizer": {"name": "ondare", "reserve_p": 0}}
    doc["training"] = {**GRPO["training"], "lerning_rate": 1e-6}
    code, _, err = rl("train", write(tmp_path, doc), "--dry-run")
    assert code == 2
    assert "invalid recipe" in err and "3 problems" not in err
    for path in (
        "optimizer.reserve_p",
        "training.lerning_rate",
        "did you mean learning_rate",
        "reward:",
        "base:",
    ):
        assert path in err, path


def test_python_reward_needs_allow_code(tmp_path: Path) -> None:
    doc = {**GRPO, "reward": {"function": {"call": "math:fsum"}}}
    code, _, err = rl("train", write(tmp_path, doc), "--dry-run")
    assert code == 2 and "reward.function" in err and "--allow-code" in err
    code, _, _ = rl("train", write(tmp_path, doc), "--dry-run", "--allow-code")
    assert code == 0


def test_missing_recipe_and_deepspeed_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = rl("train", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err
    doc = {**GRPO, "elastic_reset": {"reset_every": 4}}
    doc["training"] = {**GRPO["training"], "deepspeed": "ds.json"}
    code, _, err = rl("train", write(tmp_path, doc))
    assert code == 2 and "training.deepspeed" in err and "DeepSpeed ZeRO" in err
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, _, err = rl("train", write(tmp_path, {**GRPO, "elastic_reset": {"reset_every": 4}}))
    assert code == 2 and "ACCELERATE_USE_DEEPSPEED" in err


DATA = Path(__file__).resolve().parents[2] / "recipes" / "train" / "data"


def test_every_missing_path_is_reported_at_once_and_nothing_is_written(tmp_path: Path) -> None:
    doc = {
        **GRPO,
        "policy": "models/sft3",  # a typo: looks like a hub id too
        "optimizer": {"name": "ondare"},
        "base": "./models/nope",
        "reference": {"soup": ["models/sft1", "models/sft9"]},
        "dataset": {"path": "missing.jsonl"},
        "evaluation": {"prompts": "held/prompts.jsonl"},
        "training": {**GRPO["training"], "beta": 0.04, "lerning_rate": 1.0},
    }
    for extra in ([], ["--dry-run"], ["--json"]):
        code, out, err = rl("train", write(tmp_path, doc), *extra)
        assert code == 2, extra
        assert "6 problems" in err, err
        for key in (
            "policy: model 'models/sft3' not found: not a local path",
            "base: model './models/nope' not found",
            "reference.soup[1]: model 'models/sft9'",
            "dataset.path: file 'missing.jsonl' not found",
            "evaluation.prompts: file 'held/prompts.jsonl' not found",
            "training.lerning_rate: unknown key (did you mean learning_rate?)",
        ):
            assert key in err, key
        if extra == ["--json"]:
            assert check(out, "train", ok=False)["error"]["exit_code"] == 2
        assert not (tmp_path / "runs").exists()  # no metrics.jsonl, no reference soup


def test_only_a_bad_base_writes_nothing(tmp_path: Path) -> None:
    doc = {**GRPO, "optimizer": {"name": "ondare"}, "base": "models/base-typo"}
    code, _, err = rl("train", write(tmp_path, doc))
    assert code == 2 and "base: model 'models/base-typo' not found" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_after_a_finished_run_replaces_its_final_model(tmp_path: Path) -> None:
    doc = {
        "algorithm": "dpo",
        "policy": "models/sft1",
        "dataset": {"path": str(DATA / "prefs.jsonl")},
        "training": {
            "output_dir": "runs/d",
            "max_steps": 1,
            "save_steps": 1,
            "batch_size": 2,
            "max_length": 32,
        },
    }
    recipe = write(tmp_path, doc)
    code, out, err = rl("train", recipe, "--json", "-q")
    data = check(out, "train")
    assert code == 0 and data["outputs"] == ["runs/d/final", "runs/d/metrics.jsonl"], err
    assert err == ""  # --quiet / --json: no per-step lines
    final = tmp_path / "runs" / "d" / "final"
    (final / "stale.txt").write_text("from the finished run")
    code, _, err = rl("train", recipe)  # no --resume: refused, the run exists
    assert code == 2 and "--resume" in err
    code, _, err = rl("train", recipe, "--resume")
    assert code == 0, err
    assert not (final / "stale.txt").exists() and (final / "rlmerge_recipe.yaml").is_file()
