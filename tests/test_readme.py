"""The README stays true: every `rlmerge ...` line in its code blocks names a real command, and
every option it uses appears in that command's --help."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mergekit_rl.cli.app import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part.strip()) if part.strip() else []
                if words and words[0] == "rlmerge":
                    cmds.append(words[1:])
    return cmds


def _command_path(words: list[str]) -> list[str]:
    path = []
    for w in words:
        if w.startswith("-"):
            break
        result = runner.invoke(app, [*path, w, "--help"])
        if result.exit_code != 0:
            break
        path.append(w)
        if "Commands" not in result.stdout:
            break
    return path


def test_readme_commands_exist_with_their_options() -> None:
    cmds = _readme_commands()
    assert len(cmds) >= 8
    for words in cmds:
        if words[:1] == ["--version"]:
            continue
        path = _command_path(words)
        assert path, f"README uses an unknown command: rlmerge {' '.join(words)}"
        help_text = runner.invoke(app, [*path, "--help"], terminal_width=200).stdout
        for opt in (w.split("=")[0] for w in words if w.startswith("--")):
            assert opt in help_text, f"README: `rlmerge {' '.join(path)}` has no option {opt}"
