from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_rl.demo import run_demo
from mergekit_rl.errors import UsageError
from tests.conftest import load_state


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
    # a complete demo is reused as it is; any other non-empty directory is refused
    again: list[str] = []
    assert run_demo(tmp_path / "d", echo=again.append) == paths
    assert again == [f"reusing the complete demo in {tmp_path / 'd'} (--force rebuilds it)"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        run_demo(tmp_path / "other", echo=lines.append)
