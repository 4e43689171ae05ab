"""Time `rlmerge merge RECIPE.yaml` for five methods against the IO floor, in the same run.

    python bench/make_models.py --size 0.5B --out bench/_work/0.5B   # once per size
    python bench/bench_merge.py --sizes 0.5B 1.5B --repeats 3 [--cache cold|warm]

Same protocol as bench_io.py (fresh process per command, floor and tool alternating, cold or
warm page cache). Recipes (written to bench/_work/recipes/): linear soup of m1 m2 m3;
task_arithmetic, ties and dare_ties of m2 m3 on base m1 (density 0.5 for the sparsifiers, the
usual setting in shared recipes); slerp from m1 to m2 at t = 0.5. Each floor reads the same
models and writes one model. Targets: linear and task arithmetic <= 1.3x, ties and DARE <= 1.6x.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from harness import RLMERGE, WORK, Case, main_for

TARGETS = {"linear": 1.3, "task_arithmetic": 1.3, "ties": 1.6, "dare_ties": 1.6, "slerp": 1.3}


def recipe(method: str, m1: Path, m2: Path, m3: Path) -> dict:
    """A mergekit-format recipe of `method` on the benchmark models."""
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (m1, m2, m3)],
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(m1),
            "models": [{"model": str(m1)}, {"model": str(m2)}],
            "parameters": {"t": 0.5},
        }
    params = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 0.5, "density": 0.5}
    return {
        "merge_method": method,
        "base_model": str(m1),
        "models": [{"model": str(m), "parameters": params} for m in (m2, m3)],
        "seed": 0,
    }


def merge_cases(size: str) -> list[Case]:
    m1, m2, m3 = (WORK / size / f"m{k}" for k in (1, 2, 3))
    (WORK / "recipes").mkdir(parents=True, exist_ok=True)
    cases = []
    for method, target in TARGETS.items():
        path = WORK / "recipes" / f"{size}-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, m1, m2, m3), sort_keys=False))
        out = WORK / "out" / method
        cmd = [*RLMERGE, "merge", str(path), "-o", str(out), "--quiet", "--json", "--force"]
        inputs = [m1, m2] if method == "slerp" else [m1, m2, m3]
        cases.append(Case(method, cmd, inputs, 1, [out], target))
    return cases


if __name__ == "__main__":
    main_for("merge", merge_cases, __doc__)
