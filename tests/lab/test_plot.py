"""`rlmerge plot`: a valid PNG / PDF / SVG with the expected points, sweeps averaged over seeds,
bars inside the measured range, plain log ticks, a legend off the data, coincident points
visible."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.errors import UsageError
from mergekit_rl.lab.plot import aggregate, figure, load_rows, plot

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
    # the seeds' range, not +-std: a bar stays inside what was measured
    assert (p.reward_lo, p.reward_hi) == (2.0, 3.0)
    assert (p.x_lo, p.x_hi) == pytest.approx((4.0, 4.1))
    sft = pts[("sft", None)]  # one run: its reward's standard error, no x interval
    assert (sft.reward_lo, sft.reward_hi) == (-0.1, 0.1) and sft.x_lo == sft.x_hi == 0.0
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


@pytest.mark.parametrize(
    ("name", "magic"), [("f.pdf", b"%PDF"), ("f.svg", b"<?xml"), ("f.PNG", PNG)]
)
def test_the_format_follows_the_file_name(tmp_path: Path, name: str, magic: bytes) -> None:
    results = tmp_path / "r.json"
    results.write_text(json.dumps(_rows()))
    got = runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / name)])
    assert got.exit_code == 0, got.output
    data = (tmp_path / name).read_bytes()
    assert data.startswith(magic) and (b"<svg" in data if name.endswith("svg") else True)
    got = runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "f.jpg")])
    assert got.exit_code == 2 and ".svg" in got.stderr and not (tmp_path / "f.jpg").exists()


def _bar_segments(ax) -> list:  # noqa: ANN001
    return [seg for c in ax.collections for seg in c.get_segments()]


def test_kl_bars_stay_at_or_above_zero() -> None:
    """Seeds at KL 0, 0 and 0.03: mean 0.01, std 0.017, so a +-std bar would reach -0.007."""
    rows = [
        {"method": "grpo", "seed": s, "reward": 0.1 * s, "kl": k}
        for s, k in enumerate([0.0, 0.0, 0.03])
    ]
    fig, [p] = figure(rows, "kl")
    ax = fig.axes[0]
    xs = [x for seg in _bar_segments(ax) for x, _ in seg]
    assert min(xs) == pytest.approx(0.0) and max(xs) == pytest.approx(0.03)
    ys = [y for seg in _bar_segments(ax) for _, y in seg]
    assert min(ys) == pytest.approx(0.0) and max(ys) == pytest.approx(0.2)


def test_perplexity_axis_has_plain_tick_labels() -> None:
    rows = [
        {"method": m, "reward": r, "kl": 0.0, "ppl": v}
        for m, r, v in [("a", 0.1, 4.05), ("b", 0.2, 4.45)]
    ]
    fig, _ = figure(rows, "ppl")
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(labels) >= 3, labels
    for text in labels:  # 4.1, 4.2, ...: no 4.05x10^0 mathtext
        assert float(text) and "$" not in text and "times" not in text, text
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert minor == []


def test_legend_covers_no_point_and_coincident_points_stay_visible() -> None:
    rows = [
        {"method": m, "seed": s, "reward": r, "kl": k}
        for s in (0, 1)
        for m, r, k in [
            ("sft", 0.036, 0.0),
            ("grpo+er", 0.036, 0.0),
            ("salsa", 0.3, 0.01),
            ("grpo+kl", 0.3, 0.01),
        ]
    ]
    fig, points = figure(rows, "kl")
    ax = fig.axes[0]
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    for p in points:
        px, py = ax.transData.transform((p.x, p.reward))
        assert not box.contains(px, py), p
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for a, b in [("sft", "grpo+er"), ("salsa", "grpo+kl")]:  # drawn at the same point
        la, lb = lines[a], lines[b]
        assert list(la.get_xydata()[0]) == list(lb.get_xydata()[0])
        assert la.get_marker() != lb.get_marker()
        assert lb.get_markersize() < la.get_markersize()  # the later one inside the earlier
        assert la.get_markerfacecolor() == lb.get_markerfacecolor() == "none"  # hollow
        assert lb.get_zorder() > la.get_zorder()
    # a point alone keeps the full size, however late its method is drawn
    assert lines["salsa"].get_markersize() == lines["sft"].get_markersize()
