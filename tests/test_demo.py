from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_rl.demo import run_demo
from mergekit_rl.errors import UsageError
from mergekit_rl.tiny import CORPUS
from tests.conftest import load_state


@pytest.mark.slow  # builds four models, runs every operation and loads the outputs
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    paths = run_demo(tmp_path / "d", echo=lines.append)
    out = paths["outputs"]
    s1, s2 = load_state(paths["sft1"]), load_state(paths["sft2"])
    soup = load_state(out / "salsa_ref")
    torch.testing.assert_close(
        soup["model.norm.weight"], (s1["model.norm.weight"] + s2["model.norm.weight"]) / 2
    )
    assert any("alpha=1 reproduces the RLHF model" in line and "0.00e+00" in line for line in lines)
    assert any(line.startswith("$ rlmerge soup") for line in lines)
    # the base-mismatch warning is demonstrated on purpose, announced, and shown in the walk-through
    i = next(i for i, line in enumerate(lines) if line.startswith("$ rlmerge task-vector apply"))
    assert lines[i - 1].startswith("# on purpose:")
    assert lines[i + 1].startswith("  warning (expected here): task vector")
    # generated text decodes cleanly: the corpus's letters and spaces, no U+FFFD or byte junk
    [gen] = [line for line in lines if "the soup generates" in line]
    text = gen.split(": ", 1)[1].strip("'")
    assert text.startswith("the policy model learns") and len(text) > len("the policy model learns")
    assert set(text) <= set("".join(CORPUS)), text
    # a complete demo is reused as it is; any other non-empty directory is refused
    again: list[str] = []
    assert run_demo(tmp_path / "d", echo=again.append) == paths
    assert again == [f"reusing the complete demo in {tmp_path / 'd'} (--force rebuilds it)"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        run_demo(tmp_path / "other", echo=lines.append)
