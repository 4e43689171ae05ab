"""`rlmerge lab --quick` end to end, and the sentiment reward in a train recipe."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.lab import data as labdata
from mergekit_rl.lab.run import DEFAULT, QUICK, comparisons, make_arms
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


def _grams(line: str, n: int = 4) -> set[tuple[str, ...]]:
    words = line.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("budget", [DEFAULT, QUICK], ids=["default", "quick"])
def test_lab_held_out_data_is_not_training_data(tmp_path: Path, budget) -> None:  # noqa: ANN001
    sizes = {k: getattr(budget, k) for k in ("corpus", "heldout", "sft", "prompts", "eval_prompts")}
    files = labdata.make_data(tmp_path, 0, sizes)
    rows = lambda key: [json.loads(x) for x in files[key].read_text().splitlines()]  # noqa: E731
    evals = [r["prompt"] for r in rows("eval_prompts")]
    assert len(set(evals)) == len(evals) == budget.eval_prompts  # distinct prompts
    trained = {r["prompt"] for r in rows("prompts")} | {r["prompt"] for r in rows("sft")}
    assert not set(evals) & trained  # GRPO, DPO (pairs from these prompts) and SFT
    # nor does an eval prompt open any training text
    texts = [r["prompt"] + r["completion"] for r in rows("sft")]
    corpus = files["corpus"].read_text().splitlines()
    assert not [e for e in evals if any(e in t for t in texts + corpus)]
    heldout = files["heldout"].read_text().splitlines()
    assert len(heldout) == budget.heldout
    seen = set().union(*(_grams(x) for x in corpus + texts))
    assert not set(heldout) & set(corpus)
    assert all(_grams(x) - seen for x in heldout)  # every held-out line has an unseen 4-gram


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


def _entry(method: str, reward: float, kl: float, seeds: int, std: float, se: float) -> dict:
    return {
        "method": method, "param": 0.1, "seeds": seeds, "reward": reward, "kl": kl, "ppl": 5.0,
        "reward_std": std, "kl_std": std / 10, "reward_se": se,
    }  # fmt: skip


def test_verdicts_need_a_difference_larger_than_the_noise() -> None:
    def say(m: dict, base: dict, quick: bool = False) -> str:
        (line,) = comparisons([m, base], replace(DEFAULT, dpo_betas=(0.1,)), quick)
        return line

    base = _entry("DPO (AdamW)", 0.5, 1.0, 3, 0.05, 0.02)
    # an exact reward tie with less KL is not "less reward"
    tie = say(_entry("DPO + OnDARE", 0.5, 0.5, 3, 0.05, 0.02), base)
    assert "less KL, no measurable difference in reward" in tie
    # one seed: +0.013 against a standard error of 0.117 is no difference, KL noise unknown
    one = say(
        _entry("DPO + OnDARE", 0.513, 0.5, 1, 0.0, 0.117),
        _entry("DPO (AdamW)", 0.5, 1, 1, 0, 0.117),
    )
    assert "no measurable difference" in one and "KL noise unknown" in one
    more = say(_entry("DPO + OnDARE", 0.7, 0.5, 3, 0.05, 0.02), base)
    assert "more reward and less KL" in more
    within = say(_entry("DPO + OnDARE", 0.55, 1.0, 3, 0.05, 0.02), base)  # 0.05 < 0.071
    assert "; no measurable difference (" in within
    assert "not measurable" in say(_entry("DPO + OnDARE", 0.9, 0.1, 1, 0, 0.01), base, quick=True)
    for line in (tie, one, more, within):
        assert "claim" not in line
