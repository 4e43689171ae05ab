"""`rlmerge lab --quick` end to end, and the sentiment reward in a train recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.lab.run import QUICK, make_arms
from mergekit_rl.train.recipe import parse_train_recipe
from mergekit_rl.train.rewards import build_rewards
from tests.cli.envelope import check

runner = CliRunner()


def test_sentiment_is_a_train_reward() -> None:
    text = (
        "algorithm: grpo\npolicy: p\ndataset: {path: d.jsonl}\n"
        "reward: {sentiment: {weight: 2.0}}\ntraining: {output_dir: o, batch_size: 4}\n"
    )
    recipe = parse_train_recipe(text, "r.yaml")
    funcs, weights = build_rewards(recipe.reward)
    assert weights == [2.0]
    good, bad = funcs[0](["p", "p"], ["a wonderful film", "an awful film"])
    assert good > 0.3 and bad < -0.3


@pytest.mark.slow
def test_lab_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "lab"
    got = runner.invoke(app, ["lab", "--out", str(out), "--quick", "--json"])
    assert got.exit_code == 0, got.output
    summary = check(got.stdout, "lab")  # the documented --json envelope
    assert sorted(Path(p).name for p in summary["outputs"]) == [
        "pareto_kl.png",
        "pareto_ppl.png",
        "report.md",
        "results.json",
    ]
    results = json.loads((out / "results.json").read_text())
    arms = make_arms(QUICK, out / "models")
    # 3 SFT models, every arm once (one seed), the interpolation alphas
    assert len(results["rows"]) == 3 + len(arms) + len(QUICK.alphas)
    for row in results["rows"]:
        assert -1.0 <= row["reward"] <= 1.0 and row["kl"] >= 0 and row["ppl"] > 1
    sft = next(r for r in results["rows"] if r["arm"] == "sft-1")
    assert sft["kl"] == pytest.approx(0.0, abs=1e-6) and sft["win_rate"] == 0.5
    dpo = next(r for r in results["rows"] if r["arm"] == "dpo-b0.1")
    assert dpo["kl"] > 1e-3  # training moved the policy away from sft-1
    report = (out / "report.md").read_text()
    assert (
        "| DPO + OnDARE | 0.1 | 1 |" in report and "![reward against KL](pareto_kl.png)" in report
    )
    for png in ("pareto_kl.png", "pareto_ppl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, ["lab", "--out", str(out), "--quick"])
    assert again.exit_code == 2 and "--force" in again.stderr  # nothing is overwritten


def test_lab_refuses_a_file_as_out(tmp_path: Path) -> None:
    f = tmp_path / "notadir"
    f.write_text("keep me")
    got = runner.invoke(app, ["lab", "--out", str(f), "--quick"])
    assert got.exit_code == 2 and "is a file" in got.stderr
    assert f.read_text() == "keep me"
