"""What a user meets first: results on stdout and diagnostics on stderr, plain tab-separated
tables in a pipe, help text, did-you-mean hints.

CliRunner's stdout is not a terminal, so every command here runs as it would in `| cut` or
`| wc -l`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()
BOX = set("─│┃━┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇╈╭╮╯╰")


def rl(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _tsv(stdout: str) -> list[list[str]]:
    """The rows as `cut -f` sees them, after a '# title' line."""
    lines = stdout.splitlines()
    assert not BOX & set(stdout), stdout
    return [line.split("\t") for line in lines if not line.startswith("# ")]


def test_eval_in_a_pipe_prints_tab_separated_rows(family, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the policy"}) + "\n")
    code, out, err = rl(
        "eval", family["sft1"], family["sft2"], "--prompts", prompts, "--max-new-tokens", "2"
    )
    assert code == 0, err
    rows = _tsv(out)
    assert rows[0][:2] == ["model", "reward"]
    assert [r[0] for r in rows[1:]] == [str(family["sft1"]), str(family["sft2"])]
    assert all(len(r) == len(rows[0]) for r in rows)
    float(rows[1][1])  # a whole cell: the reward as a number


def test_validate_report_is_on_stdout(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("merge_method: linear\nmodels: [{model: x}, {model: y}]\n")
    b = tmp_path / "b.yaml"
    b.write_text("merge_method: linear\nmodels: [{model: x}, {model: y}]\n---\nmerge_method: x\n")
    code, out, err = rl("validate", a, b)  # `rlmerge validate a.yaml b.yaml | wc -l`
    assert code == 2 and out.splitlines()[0] == f"ok {a} (1 stage)"
    assert out.splitlines()[1].startswith(f"invalid {b}")
    assert str(b) in err and str(a) not in err


@pytest.mark.parametrize(
    ("args", "stdout_has"),
    [
        (["methods"], "dare_ties"),
        (["inspect", "{sft1}"], "parameters"),
        (["diff", "{sft1}", "{sft2}"], "rel_l2"),
    ],
)
def test_tables_are_results_on_stdout(family, args: list[str], stdout_has: str) -> None:
    code, out, err = rl(*[a.format(**{k: str(v) for k, v in family.items()}) for a in args])
    assert code == 0 and err == ""
    assert stdout_has in out and all(len(r) > 1 for r in _tsv(out))


def test_written_outputs_are_reported_on_stderr_and_stdout_stays_empty(
    family, tmp_path: Path
) -> None:
    """A command whose result is a file says what it wrote as a message (stderr); progress
    is stderr too, so `rlmerge soup ... > log` leaves stdout for --json."""
    code, out, err = rl("soup", family["sft1"], family["sft2"], "-o", tmp_path / "s")
    assert code == 0 and out == "" and f"wrote {tmp_path / 's'}" in err
    assert len(err.splitlines()) == 1  # a 0.02 s soup in a pipe: no progress lines


def _commands() -> list[tuple[str, object]]:
    import typer

    def walk(cmd, path: list[str]):  # noqa: ANN001, ANN202
        yield " ".join(path), cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_short_help_is_one_complete_sentence() -> None:
    """`rlmerge --help` lists each command with its docstring's first paragraph, keeping its
    line breaks: that paragraph must be one line and a whole sentence."""
    for name, cmd in _commands():
        first = (cmd.help or "").strip().split("\n\n")[0]
        assert "\n" not in first and first.endswith("."), (name, first)
    for group in ("", "task-vector", "lora"):
        result = CliRunner().invoke(app, [*group.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for name, cmd in _commands():
            if name and name.rpartition(" ")[0] == group:  # listed on one line, whole
                first = (cmd.help or "").strip().split("\n\n")[0]
                assert first in result.stdout, (name, first)


def test_a_mistyped_reward_name_gets_a_did_you_mean(family, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the policy\n")
    code, out, err = rl("eval", family["sft1"], "--prompts", prompts, "--reward", "sentimnet")
    assert code == 2 and out == ""
    assert "sentimnet: unknown reward (did you mean sentiment?)" in err
    assert "Extra inputs are not permitted" not in err
    code, _, err = rl("eval", family["sft1"], "--prompts", prompts, "--reward", "{lenght: {}}")
    assert code == 2 and "lenght: unknown reward (did you mean length?)" in err
