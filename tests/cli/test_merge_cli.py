"""`rlmerge merge / validate / methods` through the CLI: exit codes, messages, JSON."""

from __future__ import annotations

from pathlib import Path

from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from tests.cli.envelope import check
from tests.conftest import assert_states_close, load_state

runner = CliRunner()


def rl(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_help_has_examples() -> None:
    for cmd in ("merge", "validate", "methods"):
        code, out, _ = rl(cmd, "--help")
        assert code == 0 and "Example: rlmerge" in out, cmd
    code, out, _ = rl("merge", "--help")
    assert "OUT/NAME" in out and "current directory" in out


def test_merge_relative_paths_and_json(family, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(family["base"].parent)
    recipe = write(
        tmp_path / "soup.yaml",
        "merge_method: linear\nmodels: [{model: sft1}, {model: sft2}]\nout_dtype: float16\n",
    )
    out = tmp_path / "soup"
    code, stdout, err = rl("merge", recipe, "-o", out, "--json")
    assert code == 0, err
    data = check(stdout, "merge")
    [result] = data["stages"]
    assert result["status"] == "merged" and result["tensors"] == 21
    assert data["outputs"] == [str(out)] and data["seconds"] == result["seconds"]
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    want = {k: ((a[k].double() + b[k].double()) / 2).half() for k in a}
    assert_states_close(load_state(out), want, atol=1e-3)
    assert load_state(out)["lm_head.weight"].dtype.is_floating_point


def test_dry_run_prints_plan_and_writes_nothing(family, tmp_path) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: slerp\nbase_model: {family['base']}\n"
        f"models: [{{model: {family['rlhf']}}}]\nparameters: {{t: [0.0, 1.0]}}\n",
    )
    out = tmp_path / "out"
    code, stdout, err = rl("merge", recipe, "-o", out, "--dry-run")
    assert code == 0, err
    assert "model.layers.1.mlp.up_proj.weight [128, 64] F32 depth=1" in stdout
    assert "estimated peak memory" in stdout and "shard model.safetensors" in stdout
    code, stdout, _ = rl("merge", recipe, "-o", out, "--dry-run", "--json")
    plan = check(stdout, "merge")
    assert plan["dry_run"] is True and plan["outputs"] == []
    ts = {t["name"]: t["global_params"]["t"] for t in plan["stages"][0]["tensors"]}
    assert ts["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert ts["model.layers.1.mlp.up_proj.weight"] == 1.0
    assert not out.exists()


def test_validate_reports_every_problem(tmp_path) -> None:
    good = write(tmp_path / "good.yaml", "merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    bad = write(
        tmp_path / "bad.yaml",
        """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {density: 0.5}
  - model: b
    parameters: {desnity: 0.5, weight: x}
tokenizer_source: unoin
dtpye: float16
""",
    )
    code, _, err = rl("validate", good)
    assert code == 0 and "ok" in err
    code, _, err = rl("validate", good, bad)
    assert code == 2
    assert "models[1].parameters.desnity: unknown parameter for ties (did you mean density?)" in err
    assert "models[1].parameters.weight" in err
    assert "tokenizer_source: 'unoin' is not a model of this recipe; use 'base', 'union'" in err
    assert "dtpye: unknown key (did you mean dtype?)" in err
    assert "4 problems" in err


def test_pipeline_validation_names_stages(tmp_path) -> None:
    recipe = write(
        tmp_path / "p.yaml",
        "merge_method: linear\nmodels: [{model: later}]\n---\n"
        "name: later\nmerge_method: linear\nmodels: [{model: a}]\n",
    )
    code, _, err = rl("validate", recipe)
    assert code == 2
    assert "[stage 1] name: every stage but the last needs a name" in err
    assert "[stage 1] models[0].model: stage 'later' comes later in the file" in err


def test_merge_missing_model_exits_2(family, tmp_path) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\n"
        "models: [{model: ./does-not-exist}]\n",
    )
    code, _, err = rl("merge", recipe, "-o", tmp_path / "out")
    assert code == 2
    assert "models[0].model" in err and "./does-not-exist" in err
    assert not (tmp_path / "out").exists()


def test_methods_table_and_json() -> None:
    code, stdout, _ = rl("methods", "--json")
    assert code == 0
    rows = {r["name"]: r for r in check(stdout, "methods")["methods"]}
    assert len(rows) >= 14
    assert rows["ties"]["needs_base"] is True
    assert rows["ties"]["model_params"] == {"weight": 1.0, "density": 1.0}
    assert rows["ties"]["global_params"]["normalize"] is True
    assert rows["slerp"]["global_params"] == {"t": "required"}
    assert rows["slerp"]["max_models"] == 1
    assert rows["ties"]["paper"].startswith("https://arxiv.org/")
    code, stdout, _ = rl("methods")
    assert code == 0 and "dare_ties" in stdout and "model_stock" in stdout


def test_weights_summing_to_zero_fail_cleanly(family, tmp_path) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n"
        f"  - {{model: {family['sft1']}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {family['sft2']}, parameters: {{weight: -1.0}}}}\n",
    )
    code, _, err = rl("merge", recipe, "-o", tmp_path / "out")
    assert code == 2 and "sum to 0" in err and "normalize: false" in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left behind
