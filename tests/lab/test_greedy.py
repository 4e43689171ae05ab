"""Greedy soups: the selection on a case whose answer is worked out by hand, and the
command end to end (the written soup is the average of the chosen members)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.lab.greedy import greedy_select
from tests.conftest import load_state

runner = CliRunner()


def test_greedy_select_known_answer() -> None:
    # candidate i is the number v[i]; a soup's score is -(mean of its members)^2
    v = [1.0, -1.5, 3.0, -0.5]

    def score(members: list[int]) -> float:
        return -((sum(v[i] for i in members) / len(members)) ** 2)

    got = greedy_select(4, score)
    # ranking: 3 (-0.25), 0 (-1), 1 (-2.25), 2 (-9); {3, 0}: mean 0.25 -> -0.0625 (kept);
    # {3, 0, 1}: mean -1/3 -> -0.111 (left out); {3, 0, 2}: mean 7/6 -> -1.36 (left out)
    assert got.chosen == [3, 0]
    assert got.individual == [-1.0, -2.25, -9.0, -0.25]
    assert [(i, kept) for i, _, kept in got.steps] == [(3, True), (0, True), (1, False), (2, False)]
    assert got.score == pytest.approx(-0.0625)
    # a uniform soup of everything would be worse than the greedy one
    assert score([0, 1, 2, 3]) < got.score


def test_greedy_keeps_only_improvements() -> None:
    got = greedy_select(3, lambda m: 1.0)  # no soup beats the best single model
    assert got.chosen == [0]


@pytest.mark.slow  # scores every candidate soup by sampling
def test_soup_greedy_cli(family: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the policy\na reward model\n")
    out = tmp_path / "greedy"
    models = [str(family[k]) for k in ("sft1", "sft2", "rlhf")]
    args = ["soup", *models, "-o", str(out), "--greedy", "--eval-prompts", str(prompts)]
    got = runner.invoke(app, [*args, "--reward", "{length: {target: 3}}", "--json"])
    assert got.exit_code == 0, got.output
    card = (out / "README.md").read_text()
    assert "## Greedy soup" in card and "Chosen (uniform soup):" in card
    chosen_line = next(ln for ln in card.splitlines() if ln.startswith("Chosen"))
    chosen = [m for m in models if f"`{m}`" in chosen_line]
    assert chosen
    states = [load_state(Path(m)) for m in chosen]
    want = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    got_state = load_state(out)
    for k, w in want.items():
        torch.testing.assert_close(got_state[k], w, atol=1e-6, rtol=1e-5)
    assert json.loads(got.stdout)["outputs"]


def test_soup_greedy_needs_prompts(family: dict[str, Path], tmp_path: Path) -> None:
    got = runner.invoke(
        app,
        ["soup", str(family["sft1"]), str(family["sft2"]), "-o", str(tmp_path / "o"), "--greedy"],
    )
    assert got.exit_code == 2 and "--eval-prompts" in got.stderr
    assert not (tmp_path / "o").exists()
