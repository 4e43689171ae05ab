"""Every shell command in README.md and docs/*.md runs as written and exits with 0.

Each document runs in its own fresh directory holding a copy of `recipes/` (what a clone of the
repository gives the reader). Its `sh` / `bash` / `shell` / `console` code blocks run in order,
in one bash process, each block starting from that directory (a `cd` inside a block lasts to
the end of the block; files written by one block are there for the next).

Skipping (see docs/cli.md, "Docs that run"): an HTML comment `<!-- docs-test: skip (reason) -->`
on the line before a code block skips that block; ALLOWLIST skips commands everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("sh", "bash", "shell", "console")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b(.*?)-->\s*$")
# command prefixes never run here, with the reason
ALLOWLIST = {
    "pip install": "installs packages (network); CI installs them itself",
    "python -m pytest": "the test suite itself",
    "accelerate launch": "needs several processes / GPUs",
}
MARK = "@@docs-test"


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # 1-based line in the document
    block: int  # index of its code block in the document
    text: str


def commands(text: str, doc: str) -> tuple[list[Command], list[tuple[int, str]]]:
    """(the commands to run, (line, reason) of every skipped block or command)."""
    lines = text.splitlines()
    found: list[Command] = []
    skipped: list[tuple[int, str]] = []
    i, block = 0, -1
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        body = lines[i + 1 : end]
        marker = SKIP.match(lines[i - 1].strip()) if i > 0 else None
        if fence.group(1) in SHELLS:
            block += 1
            if marker:
                skipped.append((i + 1, marker.group(1).strip() or "marked skip"))
            else:
                found += _block_commands(body, i + 2, block, doc, fence.group(1), skipped)
        i = end + 1
    return found, skipped


def _block_commands(
    body: list[str], first_line: int, block: int, doc: str, lang: str, skipped: list
) -> list[Command]:
    out: list[Command] = []
    pending, start = "", 0
    for n, raw in enumerate(body, first_line):
        line = raw.strip()
        if lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending and (not line or line.startswith("#")):
            continue
        start = start if pending else n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        cmd = pending + line
        pending = ""
        reason = next((r for p, r in ALLOWLIST.items() if cmd.startswith(p)), None)
        if reason:
            skipped.append((start, reason))
        else:
            out.append(Command(doc, start, block, cmd))
    return out


def script(cmds: list[Command], root: Path) -> str:
    """One bash script: every block starts in root; after each command, a marker line with
    its index and exit status (no `set -e`: a failure is reported, the rest still runs)."""
    parts = ["exec 2>&1"]
    for k, c in enumerate(cmds):
        if k == 0 or c.block != cmds[k - 1].block:
            parts.append(f"cd {shlex_quote(str(root))}")
        parts.append(c.text)
        parts.append(f"printf '\\n{MARK} %d %d\\n' {k} $?")
    return "\n".join(parts) + "\n"


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def run_doc(doc: Path, workdir: Path) -> tuple[list[Command], dict[int, int], str]:
    cmds, _ = commands(doc.read_text(), doc.name)
    shutil.copytree(ROOT / "recipes", workdir / "recipes")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    proc = subprocess.run(
        ["bash", "-c", script(cmds, workdir)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    codes = {int(k): int(rc) for k, rc in re.findall(rf"^{MARK} (\d+) (\d+)$", proc.stdout, re.M)}
    return cmds, codes, proc.stdout


# -- the parser (fast) ---------------------------------------------------------------------------


def test_parser_blocks_skips_and_continuations() -> None:
    doc = "\n".join(
        [
            "text",
            "```sh",
            "# a comment",
            "rlmerge demo demo && cd demo   # trailing comment stays",
            "pip install foo",
            "rlmerge soup a b \\",
            "  -o out",
            "```",
            "<!-- docs-test: skip (needs a GPU) -->",
            "```sh",
            "rlmerge soup a b -o x --device cuda",
            "```",
            "```python",
            "print('not shell')",
            "```",
            "```console",
            "$ rlmerge methods",
            "output line",
            "```",
        ]
    )
    cmds, skipped = commands(doc, "x.md")
    assert [c.text for c in cmds] == [
        "rlmerge demo demo && cd demo   # trailing comment stays",
        "rlmerge soup a b  -o out",
        "rlmerge methods",
    ]
    assert [c.line for c in cmds] == [4, 6, 17] and [c.block for c in cmds] == [0, 0, 2]
    assert skipped == [(5, ALLOWLIST["pip install"]), (10, "(needs a GPU)")]


def test_every_doc_has_runnable_commands_or_none() -> None:
    """README and the guides that show commands are picked up (new docs/*.md automatically)."""
    names = {d.name for d in DOCS}
    assert {"README.md", "recipes.md", "training.md", "cli.md"} <= names
    counts = {d.name: len(commands(d.read_text(), d.name)[0]) for d in DOCS}
    assert counts["README.md"] >= 12 and counts["recipes.md"] >= 4, counts


def test_script_reports_each_exit_code(tmp_path: Path) -> None:
    cmds = [
        Command("x", 1, 0, "mkdir d && cd d"),
        Command("x", 2, 0, "test $(basename $PWD) = d"),
        Command("x", 3, 1, "test $(basename $PWD) = d"),  # a new block starts at the root
        Command("x", 4, 1, "exit_code_7() { return 7; }; exit_code_7"),
    ]
    out = subprocess.run(
        ["bash", "-c", script(cmds, tmp_path)], capture_output=True, text=True, cwd=tmp_path
    ).stdout
    codes = dict(re.findall(rf"^{MARK} (\d+) (\d+)$", out, re.M))
    assert codes == {"0": "0", "1": "0", "2": "1", "3": "7"}


# -- the docs themselves (slow: they build the demo and train a few steps) --------------------


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_doc_commands_run_in_order(doc: Path, tmp_path: Path) -> None:
    cmds, codes, output = run_doc(doc, tmp_path)
    if not cmds:
        pytest.skip(f"{doc.name} shows no shell commands")
    failed = [
        f"{c.doc}:{c.line}: `{c.text}` exited {codes.get(k, 'never ran')}"
        for k, c in enumerate(cmds)
        if codes.get(k) != 0
    ]
    assert not failed, "\n".join(failed) + "\n--- output (tail) ---\n" + output[-4000:]
