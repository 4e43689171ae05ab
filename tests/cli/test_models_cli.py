"""The foundation commands through the CLI: exit codes, messages, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from tests.cli.envelope import check
from tests.conftest import assert_states_close, load_state

runner = CliRunner()


def rl(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_version_and_help_on_every_command() -> None:
    code, out, _ = rl("--version")
    assert code == 0 and out.startswith("rlmerge ")
    for cmd in (
        ["soup"],
        ["interpolate"],
        ["task-vector", "extract"],
        ["task-vector", "apply"],
        ["inspect"],
        ["diff"],
        ["demo"],
    ):
        code, out, _ = rl(*cmd, "--help")
        assert code == 0 and "Example: rlmerge" in out, cmd


def test_soup_json_summary(family: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = rl(
        "soup", family["sft1"], family["sft2"], "-o", tmp_path / "o", "--weights", "1,3", "--json"
    )
    assert code == 0, err
    summary = check(out, "soup")
    assert summary["outputs"] == [str(tmp_path / "o")] and summary["tensors"] == 21
    assert summary["bytes_written"] > 0 and summary["peak_rss_mb"] > 0
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    assert_states_close(load_state(tmp_path / "o"), {k: 0.25 * a[k] + 0.75 * b[k] for k in a})


def test_interpolate_sweep_and_task_vectors(family: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = rl(
        "interpolate",
        family["sft1"],
        family["rlhf"],
        "-o",
        tmp_path / "sweep",
        "--alpha",
        "0,0.5",
        "--quiet",
        "--dtype",
        "bf16",
    )
    assert code == 0, err
    assert (tmp_path / "sweep" / "alpha-0.5" / "config.json").exists()
    assert next(iter(load_state(tmp_path / "sweep" / "alpha-0").values())).dtype == torch.bfloat16
    tv = tmp_path / "tv.safetensors"
    assert rl("task-vector", "extract", family["base"], family["sft1"], "-o", tv, "-q")[0] == 0
    code, _, err = rl(
        "task-vector", "apply", family["base"], tv, "-o", tmp_path / "neg", "--scale", "-1", "-q"
    )
    assert code == 0, err
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    assert_states_close(load_state(tmp_path / "neg"), {k: 2 * base[k] - sft[k] for k in base})


def test_inspect_and_diff_json(family: dict[str, Path]) -> None:
    code, out, _ = rl("inspect", family["base"], "--json")
    info = check(out, "inspect")
    assert code == 0 and info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == sum(t.numel() for t in load_state(family["base"]).values())
    code, out, _ = rl("diff", family["sft1"], family["sft2"], "--base", family["base"], "--json")
    d = check(out, "diff")
    assert code == 0
    # sft1 and sft2 add independent noise to base: task vectors nearly orthogonal, ~50% conflicts
    for row in d["layers"]:
        assert abs(row["tv_cosine"]) < 0.1 and 0.4 < row["sign_conflict"] < 0.6
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    row = next(r for r in d["tensors"] if r["tensor"] == "model.norm.weight")
    x, y = a["model.norm.weight"].double(), b["model.norm.weight"].double()
    assert row["rel_l2"] == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-9)
    code, out, _ = rl("diff", family["sft1"], family["sft2"])
    assert code == 0 and "layer 0" in out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["soup", "{sft1}", "./missing-model", "-o", "{tmp}/o"], 2, "./missing-model"),
        (["soup", "{sft1}", "{sft2}", "-o", "{sft1}"], 2, "input"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--weights", "1,x"], 2, "--weights"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--dtype", "int4"], 2, "int4"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--device", "cuda:0"], 2, "CUDA"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--max-shard-size", "big"], 2, "big"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--max-shard-size", "1.2.3"], 2, "1.2.3"),
        (["soup", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--max-shard-size", "."], 2, "not a size"),
        (["interpolate", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--method", "cubic"], 2, "cubic"),
        (["soup", "{sft1}", "{sft2}", "--weights", "1,1"], 2, "--output"),
    ],
)
def test_error_paths(
    family: dict[str, Path], tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    subst = {"sft1": family["sft1"], "sft2": family["sft2"], "tmp": tmp_path}
    got, out, err = rl(*(a.format(**subst) for a in args))
    assert got == code
    assert needle in out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(family: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    code, _, err = rl("soup", family["sft1"], family["sft2"], "-o", tmp_path / "o")
    assert code == 2 and "--force" in err
    assert rl("soup", family["sft1"], family["sft2"], "-o", tmp_path / "o", "--force", "-q")[0] == 0
    assert (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.slow  # two interpreter starts; the same commands run in-process elsewhere
def test_console_script_exit_codes(family: dict[str, Path], tmp_path: Path) -> None:
    """The installed entry point, as a CI pipeline runs it."""
    exe = [sys.executable, "-m", "mergekit_rl.cli.app"]
    bad = subprocess.run([*exe, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(
        [*exe, "inspect", str(family["base"]), "--json"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["tensors"] == 21
