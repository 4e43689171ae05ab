"""The contract every command keeps (docs/cli.md): one --json envelope checked against the
documented schema, --debug anywhere, flags shown as flags, plain output in pipes, the same
option names for the same idea, and bad input found before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.demo import DONE_MARKER
from tests.cli.envelope import check
from tests.conftest import assert_states_close, load_state

runner = CliRunner()


def rl(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# -- one --json envelope ---------------------------------------------------------------------


def test_every_model_command_json_matches_the_schema(family, tmp_path: Path) -> None:
    f, t = family, tmp_path
    code, out, err = rl("soup", f["sft1"], f["sft2"], "-o", t / "soup", "--json")
    assert code == 0, err
    assert check(out, "soup")["outputs"] == [str(t / "soup")]
    code, out, err = rl(
        "interpolate", f["sft1"], f["rlhf"], "-o", t / "sw", "--alpha", "0,1", "--json"
    )
    data = check(out, "interpolate")
    assert code == 0 and data["outputs"] == [str(t / "sw" / "alpha-0"), str(t / "sw" / "alpha-1")]
    tau = t / "tau.safetensors"
    code, out, err = rl("task-vector", "extract", f["base"], f["sft1"], "-o", tau, "--json")
    assert code == 0 and check(out, "task-vector extract")["outputs"] == [str(tau)]
    code, out, err = rl("task-vector", "apply", f["base"], tau, "-o", t / "ap", "--json")
    assert code == 0 and check(out, "task-vector apply")["tensors"] == 21
    code, out, _ = rl("inspect", f["base"], "--json")
    assert code == 0 and check(out, "inspect")["outputs"] == []
    code, out, _ = rl("diff", f["sft1"], f["sft2"], "--json")
    assert code == 0 and len(check(out, "diff")["layers"]) > 0
    code, out, _ = rl("methods", "--json")
    assert code == 0 and len(check(out, "methods")["methods"]) == 14
    # a zero task vector has no cosine: null, not NaN (which strict JSON parsers reject)
    code, out, _ = rl("diff", f["sft1"], f["sft2"], "--base", f["sft1"], "--json")
    rows = check(out, "diff")["layers"]
    assert code == 0 and rows and all(r["tv_cosine"] is None and r["tv_norm_a"] == 0 for r in rows)


def test_recipe_commands_json_matches_the_schema(family, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        f"merge_method: linear\nmodels: [{{model: {family['sft1']}}}, {{model: {family['sft2']}}}]\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels: [{model: a}]\ndtpye: x\n")
    code, out, _ = rl("validate", good, "--json")
    data = check(out, "validate")
    assert code == 0 and data["recipes"] == [
        {"recipe": str(good), "ok": True, "stages": 1, "problems": []}
    ]
    code, out, _ = rl("validate", good, bad, "--json")
    data = check(out, "validate", ok=False)
    assert code == 2 and data["error"]["exit_code"] == 2
    assert [r["ok"] for r in data["recipes"]] == [True, False]
    assert {"path": "dtpye", "message": "unknown key (did you mean dtype?)"} in data["recipes"][1][
        "problems"
    ]
    code, out, _ = rl("merge", good, "-o", tmp_path / "m", "--dry-run", "--json")
    assert code == 0 and check(out, "merge")["stages"][0]["method"] == "linear"
    code, out, _ = rl("merge", good, "-o", tmp_path / "m", "--json")
    data = check(out, "merge")
    assert code == 0 and data["outputs"] == [str(tmp_path / "m")]
    assert data["stages"][0]["status"] == "merged"


@pytest.mark.parametrize(
    "args",
    [
        ["soup", "{sft1}", "{tmp}/missing", "-o", "{tmp}/o"],
        ["interpolate", "{sft1}", "{sft2}", "-o", "{tmp}/o", "--method", "cubic"],
        ["task-vector", "extract", "{sft1}", "{tmp}/missing", "-o", "{tmp}/o"],
        ["task-vector", "apply", "{sft1}", "{tmp}/missing", "-o", "{tmp}/o"],
        ["inspect", "{tmp}/missing"],
        ["diff", "{sft1}", "{tmp}/missing"],
        ["merge", "{tmp}/missing.yaml", "-o", "{tmp}/o"],
        ["train", "{tmp}/missing.yaml"],
        ["demo", "{nonempty}"],
    ],
    ids=lambda a: a[0] if a[0] != "task-vector" else f"task-vector {a[1]}",
)
def test_errors_with_json_print_the_error_envelope(family, tmp_path: Path, args) -> None:
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("mine")
    subst = {"sft1": family["sft1"], "sft2": family["sft2"], "tmp": tmp_path, "nonempty": nonempty}
    code, out, err = rl(*(a.format(**subst) for a in args), "--json")
    command = " ".join(args[:2]) if args[0] == "task-vector" else args[0]
    data = check(out, command, ok=False)
    assert code == 2 and data["error"]["exit_code"] == 2
    assert data["error"]["message"] in err  # the same paragraph as on stderr
    assert not (tmp_path / "o").exists()


# -- --debug, flags, plain output --------------------------------------------------------------


def test_debug_before_or_after_the_command(tmp_path: Path) -> None:
    for args in (
        ["--debug", "inspect", tmp_path / "nope"],
        ["inspect", tmp_path / "nope", "--debug"],
    ):
        code, _, err = rl(*args)
        assert code == 2 and "Traceback" in err and "not found" in err, args
    code, _, err = rl("inspect", tmp_path / "nope")
    assert code == 2 and "Traceback" not in err


def test_help_shows_flags_without_a_value() -> None:
    for cmd in (["soup"], ["merge"], ["train"], ["demo"], ["validate"], ["task-vector", "apply"]):
        code, out, _ = rl(*cmd, "--help")
        assert code == 0 and "--json" in out and "<bool>" not in out, cmd


def test_plain_output_in_a_pipe_is_not_wrapped_or_truncated(family, tmp_path: Path) -> None:
    code, out, _ = rl("methods")
    assert code == 0 and "…" not in out
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0][0] == "method" and all(len(r) == 6 for r in rows) and len(rows) == 15
    della = next(r for r in rows if r[0] == "della")
    assert "epsilon=0.15" in della[3] + della[4] and della[5].startswith("https://arxiv.org/")
    long_out = tmp_path / ("a-long-output-directory-name-" * 3)
    code, _, err = rl("soup", family["sft1"], family["sft2"], "-o", long_out)
    wrote = [line for line in err.splitlines() if line.startswith("wrote")]
    assert code == 0 and len(wrote) == 1 and str(long_out) in wrote[0] and "peak RSS" in wrote[0]
    assert not any(line.endswith(" ") for line in err.splitlines())


# -- bad input before any work -----------------------------------------------------------------


def test_mistyped_path_with_a_slash_says_both(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = rl("inspect", "models/nope")
    assert code == 2
    assert "not a local path" in err and "not a cached hub model" in err


def test_zero_sum_weights_are_found_before_any_work(family, tmp_path: Path) -> None:
    recipe = tmp_path / "z.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(family["sft1"]), "parameters": {"weight": 1.0}},
                    {"model": str(family["sft2"]), "parameters": {"weight": -1.0}},
                ],
            }
        )
    )
    code, out, _ = rl("validate", recipe)  # no model is opened by validate
    assert code == 2 and "models: the model weights [1.0, -1.0] sum to 0" in out
    code, _, err = rl("merge", recipe, "-o", tmp_path / "o")
    assert code == 2 and "invalid recipe" in err and not (tmp_path / "o").exists()
    code, _, err = rl(
        "soup", family["sft1"], family["sft2"], "-o", tmp_path / "o", "--weights", "1,-1"
    )
    assert code == 2 and "sum to zero" in err and not (tmp_path / "o").exists()
    # normalize: false (or a method with sign election) is not a division by the sum
    recipe.write_text(recipe.read_text() + "parameters: {normalize: false}\n")
    assert rl("validate", recipe)[0] == 0


# -- the same option for the same idea ---------------------------------------------------------


def test_tokenizer_source_takes_a_model_or_a_position(family, tmp_path: Path) -> None:
    marker = "tokenizer_source_marker"
    other = tmp_path / "sft2-marked"
    code, _, _ = rl("soup", family["sft2"], family["sft1"], "-o", other, "-q")
    cfg = (
        (other / "config.json").read_text().replace('"model_type"', f'"{marker}": 1, "model_type"')
    )
    (other / "config.json").write_text(cfg)
    for value in (str(other), "1"):
        out = tmp_path / f"soup-{value.replace('/', '_')}"
        code, _, err = rl(
            "soup", family["sft1"], other, "-o", out, "--tokenizer-source", value, "-q"
        )
        assert code == 0, err
        assert marker in (out / "config.json").read_text(), value
    out = tmp_path / "interp"
    code, _, err = rl(
        "interpolate", family["sft1"], other, "-o", out, "--tokenizer-source", other, "-q"
    )
    assert code == 0 and marker in (out / "config.json").read_text(), err
    code, _, err = rl(
        "soup", family["sft1"], other, "-o", tmp_path / "x", "--tokenizer-source", "sft9"
    )
    assert code == 2 and "--tokenizer-source 'sft9' is not one of the inputs" in err


def test_task_vector_apply_takes_weights_and_the_old_scale(family, tmp_path: Path) -> None:
    tau = tmp_path / "tau.safetensors"
    assert rl("task-vector", "extract", family["base"], family["sft1"], "-o", tau, "-q")[0] == 0
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    for option in ("--weights", "--scale"):
        out = tmp_path / option.strip("-")
        code, _, err = rl(
            "task-vector", "apply", family["base"], tau, "-o", out, option, "0.5", "-q"
        )
        assert code == 0, err
        assert_states_close(load_state(out), {k: base[k] + 0.5 * (sft[k] - base[k]) for k in base})


# -- demo ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_reuses_a_complete_demo_it_made(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    code, out, err = rl("demo", root, "--json")
    data = check(out, "demo")
    assert code == 0 and data["reused"] is False and data["outputs"] == [str(root)]
    assert (root / DONE_MARKER).is_file() and err == ""  # --json: no progress lines
    before = load_state(root / "models" / "sft1")
    code, out, err = rl("demo", root)
    assert code == 0 and "reusing the complete demo" in out and err == ""
    assert all(torch.equal(before[k], v) for k, v in load_state(root / "models" / "sft1").items())
    code, out, err = rl("demo", root, "-q")
    assert code == 0 and err == "" and out == ""
    # a directory that is not a finished demo is still refused
    (root / DONE_MARKER).unlink()
    code, _, err = rl("demo", root)
    assert code == 2 and "not empty" in err


def test_help_examples_name_files_that_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    commands = [["merge"], ["validate"], ["train"], ["soup"], ["task-vector", "apply"], ["demo"]]
    named = []
    for cmd in commands:
        _, out, _ = rl(*cmd, "--help")
        named += [(cmd, m) for m in re.findall(r"(recipes/[\w./-]+\.yaml)", out)]
    assert any(m == "recipes/ties-sft.yaml" for _, m in named)
    for cmd, path in named:
        assert (root / path).is_file(), (cmd, path)
