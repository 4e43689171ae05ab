"""`rlmerge plot`: a valid PNG with the expected points, sweeps averaged over seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.errors import UsageError
from mergekit_rl.lab.plot import aggregate, load_rows, plot

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[dict]:
    rows = [{"label": "sft", "reward": 0.0, "reward_se": 0.1, "kl": 0.0, "ppl": 2.0}]
    for beta in (0.1, 0.5, 1.0):  # a sweep over beta, two seeds each
        for seed in (0, 1):
            rows.append(
                {
                    "method": "dpo",
                    "param": beta,
                    "seed": seed,
                    "reward": 1.0 / beta + seed,
                    "kl": 2.0 / beta + 0.1 * seed,
                    "ppl": 3.0,
                }
            )
    rows.append({"method": "ondare", "param": 0.1, "reward": 11.0, "kl": 19.0, "ppl": None})
    return rows


def test_aggregate_means_and_seed_spread() -> None:
    pts = {(p.method, p.param): p for p in aggregate(_rows(), "kl")}
    assert len(pts) == 5  # sft, 3 betas, ondare
    p = pts[("dpo", 0.5)]
    assert p.seeds == 2
    assert p.reward == pytest.approx(2.5) and p.x == pytest.approx(4.05)
    assert p.reward_err == pytest.approx(statistics.stdev([2.0, 3.0]))
    assert pts[("sft", None)].reward_err == 0.1  # one run: its standard error
    assert len(aggregate(_rows(), "ppl")) == 4  # the row without ppl is left out


def test_plot_writes_png_with_expected_points(tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    points = plot(_rows(), out, "kl")
    assert len(points) == 5
    assert out.read_bytes()[:8] == PNG
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not (tmp_path / "fig.png.tmp").exists()
    with pytest.raises(UsageError, match="no evaluated row"):
        plot([{"label": "x", "reward": 1.0, "kl": None}], tmp_path / "none.png", "kl")
    assert not (tmp_path / "none.png").exists()


def test_plot_cli(tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"rows": _rows()}))
    out = tmp_path / "p.png"
    args = ["plot", str(results), "-o", str(out), "--x", "ppl", "--json"]
    got = runner.invoke(app, args)
    assert got.exit_code == 0, got.output
    summary = json.loads(got.stdout)
    assert summary["outputs"] == [str(out)] and len(summary["points"]) == 4
    assert out.read_bytes()[:8] == PNG
    again = runner.invoke(app, args)  # an existing figure is kept unless --force
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    got = runner.invoke(app, ["plot", str(bad), "-o", str(tmp_path / "b.png")])
    assert got.exit_code == 2 and "bad.json" in got.stderr


def test_load_rows_from_csv(tmp_path: Path) -> None:
    f = tmp_path / "rows.csv"
    f.write_text("# settings: {}\nlabel,model,reward,kl\na,m,0.5,0.1\n")
    assert load_rows([f]) == [{"label": "a", "model": "m", "reward": 0.5, "kl": 0.1}]
