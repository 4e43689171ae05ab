"""Time `rlmerge soup` and `rlmerge interpolate` against the IO floor, in the same run.

    python bench/make_models.py --size 0.5B --out bench/_work/0.5B   # once per size
    python bench/bench_io.py --sizes 0.5B 1.5B --repeats 3 [--cache cold|warm]

Per size: measure an idle `python -c "import torch"`, then for every repeat run each case's
matched floor and the tool, alternating which goes first, each in a fresh process (wall seconds,
peak RSS of that process). Cold (the default when root): the page cache is dropped before every
command. Warm: the inputs are read once first. Cases: soup of m1 m2 m3 (floor: read 3 models,
write 1); interpolate m1 -> m2 at alpha 0.5 (floor: read 2, write 1); a 3-alpha sweep in one
pass (floor: read 2, write 3). Prints a markdown table (also saved to bench/_work/io.md); every
run goes to bench/_work/io-<size>.json.
"""

from __future__ import annotations

from harness import RLMERGE, WORK, Case, main_for

SWEEP = "0.25,0.5,0.75"
FLAGS = ["--quiet", "--json", "--force"]


def io_cases(size: str) -> list[Case]:
    m1, m2, m3 = (WORK / size / f"m{k}" for k in (1, 2, 3))
    out = WORK / "out"

    def interpolate(alphas: str, dest: str) -> list[str]:
        return [*RLMERGE, "interpolate", str(m1), str(m2), "-o", str(out / dest), "--alpha", alphas]

    soup = [*RLMERGE, "soup", str(m1), str(m2), str(m3), "-o", str(out / "soup")]
    return [
        Case("soup (3 models)", [*soup, *FLAGS], [m1, m2, m3], 1, [out / "soup"], 1.3),
        Case(
            "interpolate a=0.5",
            [*interpolate("0.5", "interp"), *FLAGS],
            [m1, m2],
            1,
            [out / "interp"],
            1.3,
        ),
        Case(
            "interpolate 3 alphas",
            [*interpolate(SWEEP, "sweep"), *FLAGS],
            [m1, m2],
            3,
            [out / "sweep"],
            1.3,
        ),
    ]


if __name__ == "__main__":
    main_for("io", io_cases, __doc__)
