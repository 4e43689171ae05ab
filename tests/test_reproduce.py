"""`rlmerge reproduce`: the demo's outputs re-made bit for bit from their records alone; a changed
or missing input is named before any work; a changed output is reported (exit 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_rl.demo import run_demo
from mergekit_rl.errors import InputNotFoundError, UsageError
from mergekit_rl.reproduce import reproduce
from tests.cli.envelope import check


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repro") / "demo"
    run_demo(root, echo=lambda s: None)
    return root


# each re-runs its command in a subprocess: the soup stays in the fast subset
DEMO_OUTPUTS = [
    "salsa_ref",
    *(
        pytest.param(name, marks=pytest.mark.slow)
        for name in ("sweep/alpha-0.5", "slerp", "tau_rlhf.safetensors", "sft2_plus_rl")
    ),
]


@pytest.mark.parametrize("name", DEMO_OUTPUTS)
def test_demo_outputs_reproduce_bit_for_bit(demo: Path, name: str, tmp_path: Path) -> None:
    report = reproduce(demo / "outputs" / name, tmp_path / "new")
    assert report.identical and report.differing == [] and report.tensors > 0
    assert all(r["status"] == "unchanged" for r in report.inputs)
    assert (tmp_path / "new").exists()  # kept where -o said


def test_reproduce_from_another_directory_via_cli(demo: Path, tmp_path: Path) -> None:
    """The record holds the working directory, so relative paths in the command still resolve."""
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(app, ["reproduce", str(demo / "outputs" / "salsa_ref"), "--json"])
    finally:
        os.chdir(here)
    assert res.exit_code == 0, res.output
    report = check(res.stdout, "reproduce")  # the documented --json envelope
    assert report["ok"] and report["identical"]
    assert report["outputs"] == []  # a temporary folder, removed
    assert report["rerun"].startswith("rlmerge soup ")


def test_merge_recipe_output_reproduces(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {demo / 'models' / 'base'}\n"
        "models:\n"
        f"  - model: {demo / 'models' / 'sft1'}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {demo / 'models' / 'sft2'}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
        "dtype: float32\n"
    )
    args = ["merge", str(recipe), "-o", str(tmp_path / "ties"), "-q"]
    monkeypatch.setattr("sys.argv", ["rlmerge", *args])  # what the command line records
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recipe.unlink()  # reproduce uses the recipe recorded in the output, not the file
    report = reproduce(tmp_path / "ties")
    assert report.identical


def test_changed_input_is_named_before_any_work(demo: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo / "models", root / "models")
    from mergekit_rl import ops
    from mergekit_rl.engine import RunOptions

    quiet = ops.WriteOptions(run=RunOptions(progress="none"), command="")
    a, b = root / "models" / "sft1", root / "models" / "sft2"
    opts = ops.WriteOptions(run=quiet.run, command=f"rlmerge soup {a} {b} -o {root / 'soup'}")
    ops.soup([a, b], root / "soup", opts=opts)
    assert reproduce(root / "soup").identical

    # one element of sft2 changes: the fingerprint names it (exit 2 through the CLI)
    weights = b / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"][0] += 1.0
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"input '.*sft2' of .* has changed"):
        reproduce(root / "soup")
    res = CliRunner().invoke(app, ["reproduce", str(root / "soup")])
    assert res.exit_code == 2 and "has changed" in res.output

    # gone altogether
    shutil.rmtree(a)
    with pytest.raises(InputNotFoundError, match=r"input '.*sft1' .* cannot be found"):
        reproduce(root / "soup")


@pytest.mark.slow  # a subprocess re-run, then a second one on the changed output
def test_changed_output_is_reported_not_identical(demo: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "salsa_ref"
    shutil.copytree(demo / "outputs" / "salsa_ref", out)
    weights = out / "model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][3, 3] += 1e-3
    save_file(state, weights, metadata=meta)
    report = reproduce(out)
    assert not report.identical
    assert report.differing == ["model.layers.1.mlp.up_proj.weight"]
    res = CliRunner().invoke(app, ["reproduce", str(out)])
    assert res.exit_code == 1 and "not reproduced" in res.output


def test_refuses_what_it_cannot_rerun(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no rlmerge record"):
        reproduce(family["sft1"])  # written by transformers, not rlmerge
    with pytest.raises(InputNotFoundError):
        reproduce(tmp_path / "nothing")
    fake = tmp_path / "trained.safetensors"
    meta = {"rlmerge_command": "rlmerge train r.yaml", "rlmerge_inputs": "[]"}
    save_file({"w": torch.zeros(2)}, fake, metadata=meta)
    with pytest.raises(UsageError, match="training run is reproduced by running its"):
        reproduce(fake)


def test_hub_input_is_pinned_to_its_recorded_commit(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub input is re-resolved at the recorded commit, even after the repo's main moved on
    (offline, from a cache laid out as huggingface_hub writes it)."""
    import shutil

    from mergekit_rl import ops
    from mergekit_rl.engine import RunOptions

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sft"
    old, new = "a" * 40, "b" * 40
    shutil.copytree(family["sft2"], repo / "snapshots" / old)
    shutil.copytree(family["rlhf"], repo / "snapshots" / new)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    out = tmp_path / "soup"
    cmd = f"rlmerge soup {family['sft1']} someone/tiny-sft -o {out}"
    opts = ops.WriteOptions(run=RunOptions(progress="none"), command=cmd)
    ops.soup([family["sft1"], "someone/tiny-sft"], out, opts=opts)
    (repo / "refs" / "main").write_text(new)  # the repo moved on

    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}  # for the re-run subprocess
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    report = reproduce(out)
    assert report.identical
    assert f"someone/tiny-sft@{old}" in report.rerun and report.inputs[1]["status"] == "unchanged"


def _merge(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlmerge ARGS` in-process, recording ARGS as the command line (as the CLI would)."""
    monkeypatch.setattr("sys.argv", ["rlmerge", *args])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


def test_target_inside_or_equal_to_output_is_refused(demo: Path, tmp_path: Path) -> None:
    """-o OUTPUT --force would replace the output with its re-make and then compare the re-make
    with itself: refused (exit 2) before anything is touched."""
    import shutil

    out = tmp_path / "salsa_ref"
    shutil.copytree(demo / "outputs" / "salsa_ref", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for target in (out, out / "again", tmp_path):
        res = CliRunner().invoke(app, ["reproduce", str(out), "-o", str(target), "--force"])
        assert res.exit_code == 2 and "is, contains or is inside" in res.output, res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["salsa_ref"]


def test_merge_recipe_is_pinned_to_the_recorded_hub_commit(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe naming a hub model is re-run at the recorded commit after main moved on (the
    recorded recipe still says `someone/tiny-sft`), from a fake offline cache."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sft"
    old, new = "a" * 40, "b" * 40
    shutil.copytree(family["sft2"], repo / "snapshots" / old)
    shutil.copytree(family["rlhf"], repo / "snapshots" / new)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    for k, v in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)  # for the re-run subprocess
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - model: {family['sft1']}\n    parameters: {{weight: 0.5}}\n"
        "  - model: someone/tiny-sft\n    parameters: {weight: 0.5}\n"
        "dtype: float32\n"
    )
    _merge(["merge", str(recipe), "-o", str(tmp_path / "lin"), "-q"], monkeypatch)
    (repo / "refs" / "main").write_text(new)  # the repo moved on
    report = reproduce(tmp_path / "lin")
    assert report.identical and report.differing == [], report.differing
    assert report.inputs[1]["resolved"] == f"someone/tiny-sft@{old}"


def test_gone_working_directory_is_refused(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command with relative paths, whose recorded directory is gone, is not re-run in the
    caller's directory (where the same relative paths name other files)."""
    import shutil

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    for name in ("sft1", "sft2"):
        shutil.copytree(family[name], work / "models" / name)
    monkeypatch.chdir(work)
    out = tmp_path / "soup"
    _merge(["soup", "models/sft1", "models/sft2", "-o", str(out), "-q"], monkeypatch)
    elsewhere = tmp_path / "elsewhere"  # the same relative paths, other models
    (elsewhere / "models").mkdir(parents=True)
    for name, src in (("sft1", "rlhf"), ("sft2", "base")):
        shutil.copytree(family[src], elsewhere / "models" / name)
    monkeypatch.chdir(elsewhere)
    shutil.rmtree(work)
    with pytest.raises(InputNotFoundError, match="working directory recorded in .* no longer"):
        reproduce(out)
    res = CliRunner().invoke(app, ["reproduce", str(out)])
    assert res.exit_code == 2 and "no longer exists" in res.output


def test_pipeline_stages_and_output_equals_form_reproduce(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline's final output and its intermediate stage are each re-made from their own
    recorded stage recipe; a command written with `--output=PATH` is re-run too."""
    from tests.test_recipes import RECIPES

    monkeypatch.chdir(demo)
    out = tmp_path / "warp"
    args = ["merge", str(RECIPES / "warp-slerp-liti.yaml"), f"--output={out}", "-q"]
    _merge(args, monkeypatch)
    for made in (out, out / "warp_slerp"):
        report = reproduce(made, tmp_path / f"again-{made.name}")
        assert report.identical and report.tensors > 0, report.differing
        assert f"--output={tmp_path / f'again-{made.name}'}" in report.rerun
    # and a changed stage output is named, not silently re-made
    weights = out / "warp_slerp" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    state = load_file(weights)
    state["model.norm.weight"][0] += 1.0
    save_file(state, weights, metadata=meta)
    with pytest.raises(UsageError, match="warp_slerp' of .* has changed"):
        reproduce(out)
