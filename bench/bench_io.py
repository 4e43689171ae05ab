"""Time `rlmerge soup` and `rlmerge interpolate` against the IO floor, in the same run.

    python bench/make_models.py --size 0.5B --out bench/_work/0.5B   # once per size
    python bench/bench_io.py --sizes 0.5B 1.5B --repeats 3

Per size: warm the page cache by reading the inputs once, measure an idle
`python -c "import torch"`, then for every repeat run each case's matched floor and the tool,
alternating which goes first, each in a fresh process (wall seconds, peak RSS of that process).
Cases: soup of m1 m2 m3 (floor: read 3 models, write 1); interpolate m1 -> m2 at alpha 0.5
(floor: read 2, write 1); a 5-alpha sweep in one pass (floor: read 2, write 5).
Prints markdown tables; every run goes to bench/_work/io-<size>.json.
"""

from __future__ import annotations

import argparse

from harness import (
    RLMERGE,
    WORK,
    Case,
    idle_torch_rss,
    machine,
    markdown,
    run_cases,
    save_json,
    summarize,
    wait_for_quiet,
    warm_cache,
)

SWEEP = "0,0.25,0.5,0.75,1"


def io_cases(size: str) -> list[Case]:
    models = [WORK / size / f"m{k}" for k in (1, 2, 3)]
    out = WORK / "out"
    flags = ["--quiet", "--json", "--force"]
    return [
        Case(
            "soup (3 models)",
            [*RLMERGE, "soup", *map(str, models), "-o", str(out / "soup"), *flags],
            models,
            1,
            [out / "soup"],
            1.3,
        ),
        Case(
            "interpolate a=0.5",
            [
                *RLMERGE,
                "interpolate",
                *map(str, models[:2]),
                "-o",
                str(out / "interp"),
                "--alpha",
                "0.5",
                *flags,
            ],
            models[:2],
            1,
            [out / "interp"],
            1.3,
        ),
        Case(
            "interpolate 5 alphas",
            [
                *RLMERGE,
                "interpolate",
                *map(str, models[:2]),
                "-o",
                str(out / "sweep"),
                "--alpha",
                SWEEP,
                *flags,
            ],
            models[:2],
            5,
            [out / "sweep"],
            1.3,
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], help="tiny, 0.5B, 1.5B")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    print(machine())
    rows = []
    for size in args.sizes:
        cases = [c for c in io_cases(size) if args.cases in c.name]
        inputs = sorted({p for c in cases for p in c.floor_inputs})
        print(f"{size}: warming {warm_cache(inputs) / 1e9:.1f} GB; load {wait_for_quiet():.2f}")
        idle = idle_torch_rss()
        log: list[dict] = []
        run_cases(cases, args.repeats, log)
        size_rows = summarize(size, cases, log, idle)
        save_json(
            WORK / f"io-{size}.json", {"idle_torch_mib": idle, "runs": log, "rows": size_rows}
        )
        print(f"idle torch: {idle:.0f} MiB")
        rows += size_rows
    print(markdown(rows))


if __name__ == "__main__":
    main()
