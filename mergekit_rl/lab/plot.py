"""`rlmerge plot`: reward against drift (KL or perplexity) for evaluated models.

One colour per method; a line through each method's sweep (beta, alpha, steps: the row's
`param`), in `param` order; error bars from seeds (the standard deviation of the seed means,
or a single run's standard error of the reward); the Pareto front (no other point has more
reward at no more drift) drawn as a dashed line through ringed points.
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


@dataclass(frozen=True)
class Point:
    method: str
    param: float | None
    x: float
    x_err: float
    reward: float
    reward_err: float
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
    """One point per (method, param): means over seeds, with their spread as error bars."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get(x) is None or (isinstance(r[x], float) and math.isnan(r[x])):
            continue
        method = str(r.get("method") or r.get("label") or r.get("model"))
        groups.setdefault((method, r.get("param")), []).append(r)
    points = []
    for (method, param), rs in groups.items():
        xs, ys = [float(r[x]) for r in rs], [float(r["reward"]) for r in rs]
        if len(rs) > 1:
            x_err, y_err = statistics.stdev(xs), statistics.stdev(ys)
        else:
            x_err, y_err = 0.0, float(rs[0].get("reward_se") or 0.0)
        points.append(
            Point(method, param, statistics.mean(xs), x_err, statistics.mean(ys), y_err, len(rs))
        )
    return points


def plot(
    rows: Sequence[dict[str, Any]], out: Path, x: str = "kl", title: str | None = None
) -> list[Point]:
    """Draw the figure into `out` (PNG, written atomically); return the points drawn."""
    if x not in AXES:
        raise UsageError(f"--x '{x}' is unknown: use kl or ppl.")
    points = aggregate(rows, x)
    if not points:
        hint = " (give `rlmerge eval` a --reference)" if x == "kl" else " (give --heldout)"
        raise UsageError(f"no evaluated row has a '{x}' value to plot{hint}.")
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(p.method for p in points))
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        pts = sorted(
            (p for p in points if p.method == method),
            key=lambda p: (p.param is None, p.param if p.param is not None else 0),
        )
        c = colours(i % 10)
        ax.errorbar(
            [p.x for p in pts],
            [p.reward for p in pts],
            xerr=[p.x_err for p in pts],
            yerr=[p.reward_err for p in pts],
            fmt="o-" if len(pts) > 1 else "o",
            color=c,
            label=method,
            capsize=3,
            markersize=6,
        )
        if len(pts) > 1:
            for p in pts:
                if p.param is not None:
                    ax.annotate(
                        f"{p.param:g}", (p.x, p.reward), fontsize=7, xytext=(4, 4),
                        textcoords="offset points", color=c,
                    )  # fmt: skip
    front = [points[i] for i in metrics.pareto_front([(p.x, p.reward) for p in points])]
    ax.plot(
        [p.x for p in front],
        [p.reward for p in front],
        "o--",
        color="black",
        markerfacecolor="none",
        markersize=12,
        linewidth=1,
        label="Pareto front",
    )
    ax.set_xlabel(AXES[x] + (" (log scale)" if x == "ppl" else ""))
    if x == "ppl":
        ax.set_xscale("log")
    ax.set_ylabel("reward (mean)")
    ax.set_title(title or f"reward against {x}: up and to the left is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return points
