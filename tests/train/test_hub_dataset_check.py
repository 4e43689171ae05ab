"""`rlmerge train` resolves a hub dataset id before anything is loaded, offline-aware: a dataset
in the local datasets cache passes, any other id exits 2 naming dataset.path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

DPO = {
    "algorithm": "dpo",
    "policy": "models/sft1",
    "dataset": {"path": "trl-lib/ultrafeedback_binarized"},
    "training": {"output_dir": "runs/d", "learning_rate": 1e-5},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(family["base"].parent, target_is_directory=True)
    return tmp_path


def _train(recipe: dict, path: Path, *args: str) -> tuple[int, str, str]:
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), *args])
    return result.exit_code, result.stdout, result.stderr


def _cache_hub_dataset(repo_id: str, rows: Path) -> None:
    """Put `rows` in the datasets cache as load_dataset(repo_id) leaves it after an online
    load (HF_DATASETS_CACHE/org___name/config/version/hash), which an offline load reads."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    build = rows.parent / "build"
    name = repo_id.rpartition("/")[2]  # the arrow files are named after it
    builder = Json(data_files={"train": str(rows)}, dataset_name=name, cache_dir=str(build))
    builder.download_and_prepare()
    cache = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    shutil.copytree(builder.cache_dir, cache / "default" / "0.0.0" / "0123abcd")


def test_hub_dataset_not_in_the_cache_fails_the_dry_run(workdir: Path) -> None:
    # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: no network, as on the machine
    code, out, err = _train(DPO, workdir / "r.yaml", "--dry-run")
    assert code == 2 and out == ""
    assert "dataset.path" in err and "trl-lib/ultrafeedback_binarized" in err
    assert "not in the local datasets cache" in err
    assert not (workdir / "runs").exists()


def test_hub_dataset_in_the_local_cache_passes_offline(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workdir / "datasets_cache")
    rows = workdir / "rows.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    _cache_hub_dataset("org/prefs", rows)
    recipe = {**DPO, "dataset": {"path": "org/prefs"}}
    code, out, err = _train(recipe, workdir / "r.yaml", "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)["dataset"]["path"] == "org/prefs"
    # and the real run's loader reads the same cache (what the check promised)
    assert datasets.load_dataset("org/prefs", split="train")[0]["chosen"] == "b"
