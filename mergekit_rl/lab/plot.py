"""`rlmerge plot`: reward against drift (KL or perplexity) for evaluated models.

One colour and one marker per method; a line through each method's sweep (beta, alpha, steps:
the row's `param`), in `param` order; error bars from seeds (the range of the seed values, min
to max, which stays inside what was measured: a KL bar never crosses 0), or a single run's
standard error of the reward; the Pareto front (no other point has more reward at no more
drift) drawn as a dashed line through ringed points. The legend sits outside the axes, so it
covers no point; markers are hollow and shrink in drawing order, so methods that land on the
same point stay visible. The file type follows the output's name: .png, .pdf or .svg.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, UsageError
from . import metrics

AXES = {"kl": "KL(model || reference) per token", "ppl": "perplexity on held-out text"}
FORMATS = (".png", ".pdf", ".svg")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
# a marker's size: MARKER_SIZE, less MARKER_STEP for each point drawn before it at the same
# place (down to MARKER_MIN), so a later method's marker sits inside an earlier one's
MARKER_SIZE, MARKER_STEP, MARKER_MIN = 13.0, 4.0, 4.0
# two points are at the same place when they are this close, as a fraction of each axis' span
SAME_PLACE = 0.015


@dataclass(frozen=True)
class Point:
    """A method's point at one `param`: means over seeds and the interval drawn around them
    (x_lo <= x <= x_hi, reward_lo <= reward <= reward_hi)."""

    method: str
    param: float | None
    x: float
    x_lo: float
    x_hi: float
    reward: float
    reward_lo: float
    reward_hi: float
    seeds: int


def load_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows from `rlmerge eval --json` / `--csv` outputs or a lab results.json."""
    rows: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputNotFoundError(f"results file '{p}' not found; check the path.")
        text = p.read_text()
        try:
            if p.suffix == ".csv":
                lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
                got: Any = [_numbers(r) for r in csv.DictReader(lines)]
            else:
                got = json.loads(text)
        except (json.JSONDecodeError, csv.Error) as e:
            raise UsageError(f"results file {p}: cannot be parsed ({e}).") from e
        got = got.get("rows") if isinstance(got, dict) else got
        if not isinstance(got, list) or not all(isinstance(r, dict) for r in got):
            raise UsageError(f"results file {p}: expected a list of rows or an object with 'rows'.")
        for n, r in enumerate(got):
            if not isinstance(r.get("reward"), (int, float)):
                raise UsageError(f"results file {p}: row {n} has no numeric 'reward'.")
        rows += got
    return rows


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        try:
            out[k] = float(v) if v not in ("", None) else None
        except ValueError:
            out[k] = v
    return out


def aggregate(rows: Sequence[dict[str, Any]], x: str) -> list[Point]:
    """One point per (method, param): means over seeds, the seeds' min..max as its interval
    (a single run: its reward's standard error, no x interval)."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get(x) is None or (isinstance(r[x], float) and math.isnan(r[x])):
            continue
        method = str(r.get("method") or r.get("label") or r.get("model"))
        groups.setdefault((method, r.get("param")), []).append(r)
    points = []
    for (method, param), rs in groups.items():
        xs, ys = [float(r[x]) for r in rs], [float(r["reward"]) for r in rs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        if len(rs) > 1:
            y_lo, y_hi = min(ys), max(ys)
        else:
            se = float(rs[0].get("reward_se") or 0.0)
            y_lo, y_hi = my - se, my + se
        points.append(Point(method, param, mx, min(xs), max(xs), my, y_lo, y_hi, len(rs)))
    return points


def plot(
    rows: Sequence[dict[str, Any]], out: Path, x: str = "kl", title: str | None = None
) -> list[Point]:
    """Draw the figure into `out` (.png, .pdf or .svg by its name, written atomically); return
    the points drawn."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"{out}: name the figure *.png, *.pdf or *.svg (the format follows it).")
    fig, points = figure(rows, x, title)
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format=out.suffix.lower()[1:], dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return points


def figure(rows: Sequence[dict[str, Any]], x: str = "kl", title: str | None = None):  # noqa: ANN201
    """The matplotlib figure and the points it shows (see the module docstring)."""
    if x not in AXES:
        raise UsageError(f"--x '{x}' is unknown: use kl or ppl.")
    points = aggregate(rows, x)
    if not points:
        hint = " (give `rlmerge eval` a --reference)" if x == "kl" else " (give --heldout)"
        raise UsageError(f"no evaluated row has a '{x}' value to plot{hint}.")
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    methods = list(dict.fromkeys(p.method for p in points))
    by_method = [
        sorted(
            (p for p in points if p.method == method),
            key=lambda p: (p.param is None, p.param if p.param is not None else 0),
        )
        for method in methods
    ]
    sizes = marker_sizes([p for pts in by_method for p in pts], log_x=x == "ppl")
    for i, (method, pts) in enumerate(zip(methods, by_method, strict=True)):
        _draw_method(ax, pts, i, method, [sizes[id(p)] for p in pts])
    front = [points[i] for i in metrics.pareto_front([(p.x, p.reward) for p in points])]
    ax.plot(
        [p.x for p in front],
        [p.reward for p in front],
        "o--",
        color="black",
        markerfacecolor="none",
        markersize=MARKER_SIZE + 6,
        linewidth=1,
        label="Pareto front",
        zorder=1,
    )
    ax.set_xlabel(AXES[x] + (" (log scale)" if x == "ppl" else ""))
    if x == "ppl":
        _log_axis(ax, [v for p in points for v in (p.x_lo, p.x_hi)])
    ax.set_ylabel("reward (mean; bars: seed range)")
    ax.set_title(title or f"reward against {x}: up and to the left is better")
    ax.grid(alpha=0.3)
    # outside the axes, right of them: the legend can cover no point
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig, points


def marker_sizes(drawn: list[Point], log_x: bool) -> dict[int, float]:
    """id(point) -> marker size, points in drawing order: smaller by MARKER_STEP for each
    earlier point at the same place (SAME_PLACE of each axis' span)."""
    xs = [math.log(p.x) if log_x and p.x > 0 else p.x for p in drawn]
    ys = [p.reward for p in drawn]
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    sizes: dict[int, float] = {}
    for i, p in enumerate(drawn):
        under = sum(
            abs(xs[j] - xs[i]) <= SAME_PLACE * span_x and abs(ys[j] - ys[i]) <= SAME_PLACE * span_y
            for j in range(i)
        )
        sizes[id(p)] = max(MARKER_MIN, MARKER_SIZE - MARKER_STEP * under)
    return sizes


def _draw_method(ax, pts: list[Point], i: int, method: str, sizes: list[float]) -> None:  # noqa: ANN001
    """One method: its bars (thin, under every marker), a line through a sweep, and hollow
    markers of its own shape, each `sizes[k]` (smaller where earlier points lie under it)."""
    import matplotlib.pyplot as plt

    colour = plt.get_cmap("tab10")(i % 10)
    xs, ys = [p.x for p in pts], [p.reward for p in pts]
    ax.errorbar(
        xs,
        ys,
        xerr=[[p.x - p.x_lo for p in pts], [p.x_hi - p.x for p in pts]],
        yerr=[[p.reward - p.reward_lo for p in pts], [p.reward_hi - p.reward for p in pts]],
        fmt="none",
        ecolor=colour,
        elinewidth=1.0,
        capsize=3,
        alpha=0.7,
        zorder=2,
    )
    if len(pts) > 1:
        ax.plot(xs, ys, "-", color=colour, linewidth=1.5, zorder=3)
    for k, (px, py, size) in enumerate(zip(xs, ys, sizes, strict=True)):
        ax.plot(
            [px],
            [py],
            linestyle="none",
            marker=MARKERS[i % len(MARKERS)],
            markersize=size,
            markerfacecolor="none",
            markeredgewidth=1.8,
            color=colour,
            label=method if k == 0 else None,
            zorder=10 + i,
        )
    if len(pts) > 1:
        for p in pts:
            if p.param is not None:
                ax.annotate(
                    f"{p.param:g}", (p.x, p.reward), fontsize=7, xytext=(6, -10),
                    textcoords="offset points", color=colour,
                )  # fmt: skip


def _log_axis(ax, values: list[float]) -> None:  # noqa: ANN001
    """A log x axis labelled with plain numbers (4.1, 4.2, ...), not 4.1x10^0: within one
    decade, about five evenly spaced ticks; wider, the usual decades."""
    from matplotlib import ticker

    ax.set_xscale("log")
    lo, hi = min(values), max(values)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:.4g}")
    if lo > 0 and hi / lo < 10:
        ticks = [t for t in ticker.MaxNLocator(nbins=5).tick_values(lo, hi) if t > 0]
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
