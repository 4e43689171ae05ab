"""Peak memory of every built-in merge method across model sizes (is it flat?).

    python bench/make_models.py --size 0.35B --out bench/_work/0.35B
    python bench/make_models.py --size 1.1B --out bench/_work/1.1B
    python bench/rss_sizes.py --sizes 0.35B 1.1B

For each size and method, one `rlmerge merge RECIPE -o OUT --json` in a fresh process (this
checkout's code) on the size's family (bf16 m1 as the base, m2 and m3 as the models, weight 0.5
and density 0.5 where the method takes them; slerp m1 -> m2 at t = 0.5; passthrough of m2):
its peak RSS, minor page faults, system and wall seconds, and the 1-minute load before it. A
merge that streams every tensor in row blocks has the same peak at every size: the largest
block and the largest tensor under the block size bound it, not the model. Writes
rss-sizes.json and rss-sizes.md in bench/_work/.
"""

from __future__ import annotations

import argparse

import yaml
from bench_merge import recipe
from harness import RLMERGE, WORK, machine, measure, save_json, settle

# every built-in method with the parameters it is benchmarked with (per model, global)
EXTRA: dict[str, tuple[dict, dict]] = {
    "dare_linear": ({"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs": ({"weight": 0.5, "density": 0.5, "gamma": 0.01}, {}),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.5, "gamma": 0.01}, {}),
    "della_linear": ({"weight": 0.5, "density": 0.5}, {}),
    "nuslerp": ({"weight": 0.5}, {}),
    "model_stock": ({}, {}),
}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp", *EXTRA, "karcher")


def method_recipe(method: str, size: str) -> dict:
    m1, m2, m3 = (WORK / size / f"m{k}" for k in (1, 2, 3))
    if method in ("linear", "task_arithmetic", "ties", "dare_ties", "slerp"):
        return recipe(method, m1, m2, m3)
    if method == "della":
        return {**recipe("ties", m1, m2, m3), "merge_method": "della"}
    if method == "karcher":
        return {"merge_method": "karcher", "models": [{"model": str(m)} for m in (m1, m2, m3)]}
    params, globals_ = EXTRA[method]
    body: dict = {
        "merge_method": method,
        "base_model": str(m1),
        "models": [{"model": str(m), "parameters": dict(params)} for m in (m2, m3)],
        "seed": 0,
    }
    if globals_:
        body["parameters"] = globals_
    return body


def run(method: str, size: str) -> dict:
    path = WORK / "recipes" / f"rss-{size}-{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(method_recipe(method, size), sort_keys=False))
    out = WORK / "out" / "rss"
    settle(out)
    m = measure([*RLMERGE, "merge", str(path), "-o", str(out), "--quiet", "--json", "--force"])
    settle(out)
    return {
        "size": size,
        "method": method,
        "wall_s": round(m.seconds, 2),
        "sys_s": round(m.system_seconds, 2),
        "minor_faults": m.minor_faults,
        "peak_rss_mb": round(m.peak_rss_mb),
        "load1": round(m.load1, 1),
    }


def table(rows: list[dict], sizes: list[str]) -> str:
    head = "| method | " + " | ".join(f"{s} peak RSS MB | {s} wall s" for s in sizes) + " |\n"
    head += "|---" * (1 + 2 * len(sizes)) + "|\n"
    by = {(r["method"], r["size"]): r for r in rows}
    body = ""
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [
            f"{by[method, s]['peak_rss_mb']} | {by[method, s]['wall_s']}"
            if (method, s) in by
            else "- | -"
            for s in sizes
        ]
        body += f"| {method} | " + " | ".join(cells) + " |\n"
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["0.35B", "1.1B"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    rows = []
    for method in args.methods:
        for size in args.sizes:
            rows.append(run(method, size))
            print(rows[-1], flush=True)
    md = "\n".join(f"- {k}: {v}" for k, v in machine().items()) + "\n\n"
    md += table(rows, args.sizes)
    save_json(WORK / "rss-sizes.json", {"machine": machine(), "runs": rows})
    (WORK / "rss-sizes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
