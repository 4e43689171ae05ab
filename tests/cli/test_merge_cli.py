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
    code, out, err = rl("validate", good)
    assert code == 0 and out == f"ok {good} (1 stage)\n" and err == ""
    # the report is the result (stdout); stderr names the invalid files for the exit code
    code, out, err = rl("validate", good, bad)
    assert code == 2
    assert "models[1].parameters.desnity: unknown parameter for ties (did you mean density?)" in out
    assert "models[1].parameters.weight" in out
    assert "tokenizer_source: 'unoin' is not a model of this recipe; use 'base', 'union'" in out
    assert "dtpye: unknown key (did you mean dtype?)" in out
    assert out.startswith(f"ok {good} (1 stage)\ninvalid {bad}: 4 problems")
    assert err == f"rlmerge: invalid recipe: {bad} (1 of 2 invalid)\n"
    code, out, _ = rl("validate", good, bad, "-q")  # --quiet: only what is wrong
    assert code == 2 and out.startswith(f"invalid {bad}")


def test_pipeline_validation_names_stages(tmp_path) -> None:
    recipe = write(
        tmp_path / "p.yaml",
        "merge_method: linear\nmodels: [{model: later}]\n---\n"
        "name: later\nmerge_method: linear\nmodels: [{model: a}]\n",
    )
    code, out, _ = rl("validate", recipe)
    assert code == 2
    assert "[stage 1] name: every stage but the last needs a name" in out
    assert "[stage 1] models[0].model: stage 'later' comes later in the file" in out


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


def test_dry_run_without_network_is_the_real_runs_user_error(tmp_path: Path) -> None:
    """A hub model, HF_HUB_OFFLINE unset and the hub unreachable (an endpoint nothing listens
    on): the dry run's header request fails inside the HTTP client, and gives the same clean
    exit-2 message as the real run, not an internal error."""
    import os
    import subprocess
    import sys

    recipe = write(
        tmp_path / "r.yaml", "merge_method: linear\nmodels: [{model: someone/tiny-sft}]\n"
    )
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")  # any sets it
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    results = []
    for extra in (["--dry-run"], []):
        cmd = [sys.executable, "-m", "mergekit_rl.cli.app", "merge", str(recipe), "-o"]
        res = subprocess.run(
            [*cmd, str(tmp_path / "out"), *extra], env=env, capture_output=True, text=True
        )
        results.append((res.returncode, res.stderr.strip()))
    (dry_code, dry_err), (real_code, real_err) = results
    assert real_code == 2 and "the hub cannot be reached" in real_err, real_err
    assert (dry_code, dry_err) == (real_code, real_err)
    assert not (tmp_path / "out").exists()


def test_merge_takes_mergekit_yaml_positional_output_and_cuda(family, tmp_path) -> None:
    recipe = write(
        tmp_path / "soup.yaml",
        f"merge_method: linear\nmodels: [{{model: {family['sft1']}}}, {{model: {family['sft2']}}}]\n",
    )
    out = tmp_path / "soup"
    code, _, err = rl("merge", recipe, out, "-q")  # mergekit-yaml's `mergekit-yaml r.yaml out`
    assert code == 0, err
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    assert_states_close(load_state(out), {k: (a[k] + b[k]) / 2 for k in a}, atol=1e-6)
    # the same path both ways is accepted; two different outputs are refused before any work
    code, _, err = rl("merge", recipe, out, "-o", out, "--force", "-q")
    assert code == 0, err
    other = tmp_path / "other"
    code, _, err = rl("merge", recipe, out, "-o", other)
    assert code == 2 and "two outputs given" in err and str(other) in err
    assert not other.exists()
    code, _, err = rl("merge", recipe)
    assert code == 2 and "no output given" in err
    # --cuda is --device cuda: without a GPU it fails as --device cuda does, naming cuda
    code, _, err_cuda = rl("merge", recipe, tmp_path / "c1", "--cuda", "-q")
    code2, _, err_device = rl("merge", recipe, tmp_path / "c2", "--device", "cuda", "-q")
    assert code == code2 and err_cuda == err_device
    assert code == 0 or "--device cuda" in err_cuda  # no GPU here: the device check names it
    code, _, err = rl("merge", recipe, tmp_path / "c1", "--cuda", "--device", "cpu")
    assert code == 2 and "--cuda means --device cuda" in err


def test_merge_help_names_the_mergekit_aliases() -> None:
    code, out, _ = rl("merge", "--help")
    assert code == 0 and "--cuda" in out and "[OUT]" in out
    assert "mergekit-yaml" in out
