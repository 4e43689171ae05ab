"""`rlmerge merge` from two or more source trees (commits), the same venv, alternating.

    git worktree add --detach /work/old 2e0952a         # the old source tree, once
    python bench/make_models.py --size 0.5B --out bench/_work/0.5B
    python bench/compare_commits.py --tree old=/work/old --tree new=. --repeats 2 --threads 1

Each run is a fresh `rlmerge merge RECIPE -o OUT --json` from the tree: its folder first on
sys.path, its cli/ loaded as `mergekit_rl.cli`, run from the tree (checked before any run: both
the library and the CLI must come from the tree; the editable install would otherwise supply
the installed checkout's CLI). The trees alternate, the order flipped every repeat; the page
cache is warmed once (all trees read the same inputs). Per run: the tool's own engine seconds
(its --json), the child's CPU seconds (user + system, `os.wait4`) and peak RSS, the 1-minute
load average just before, and a SHA-256 of the output's tensor files (equal digests: the trees
wrote the same tensors; printed per recipe). Recipes: the 0.5B family of bench_merge.py (soup
of m1 m2 m3; ties, dare_ties, della and task_arithmetic of m2 m3 over base m1, weight 0.5,
density 0.5, seed 0; slerp m1 -> m2 at t = 0.5). Writes compare-<size>.json and compare-<size>.md in bench/_work/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from bench_merge import recipe
from harness import (
    FLOOR,
    WORK,
    Measurement,
    machine,
    measure,
    median,
    save_json,
    settle,
    tool_seconds,
    warm_cache,
)

METHODS = ("linear", "ties", "dare_ties", "della", "task_arithmetic", "slerp")


def write_recipe(method: str, size: str) -> Path:
    m1, m2, m3 = (WORK / size / f"m{k}" for k in (1, 2, 3))
    body = recipe("ties" if method == "della" else method, m1, m2, m3)
    body["merge_method"] = method  # della: the ties recipe's models and densities
    path = WORK / "recipes" / f"compare-{size}-{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# The editable install maps `mergekit_rl.cli` to the installed checkout's cli/ folder whatever
# PYTHONPATH says, so each run loads the tree's own cli/ as that package before the app starts.
BOOT = (
    "import importlib.util as u, sys; t = sys.argv.pop(1); sys.path.insert(0, t); "
    "import mergekit_rl; s = u.spec_from_file_location('mergekit_rl.cli', t + '/cli/__init__.py', "
    "submodule_search_locations=[t + '/cli']); m = u.module_from_spec(s); "
    "sys.modules['mergekit_rl.cli'] = mergekit_rl.cli = m; s.loader.exec_module(m); "
)
# as the `rlmerge` executable runs it: through cli/entry.py (it sets OpenMP's wait policy before
# torch loads) where the tree has one, else the app itself (older trees)
RUN_APP = (
    "import os, runpy; e = os.path.exists(t + '/cli/entry.py'); "
    "runpy.run_module('mergekit_rl.cli.' + ('entry' if e else 'app'), run_name='__main__', "
    "alter_sys=True)"
)
PROBE = "import mergekit_rl.cli.app as a; print(mergekit_rl.__file__); print(a.__file__)"


def check_tree(tree: Path) -> None:
    """Fail unless both `mergekit_rl` and its CLI are imported from `tree`."""
    cmd = [sys.executable, "-c", BOOT + PROBE, str(tree)]
    got = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True).stdout
    for path in got.split():
        if not Path(path).resolve().is_relative_to(tree):
            raise SystemExit(f"{tree}: imports {path}, not from the tree")


def commit_of(tree: Path) -> str:
    git = ["git", "rev-parse", "--short", "HEAD"]
    return subprocess.run(git, cwd=tree, capture_output=True, text=True).stdout.strip()


def output_digest(out: Path) -> str:
    """SHA-256 of the output's tensors (the .safetensors headers without their metadata, and
    the data bytes; files sorted by name), first 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(out.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            header.pop("__metadata__", None)
            h.update(json.dumps(header, sort_keys=True).encode())
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]


def run_once(tree: Path, recipe_path: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", BOOT + RUN_APP, str(tree), "merge", str(recipe_path)]
    cmd += ["-o", str(out), "--quiet", "--json", "--force"]
    settle(out)
    m = measure(cmd, cwd=tree)
    digest = output_digest(out)
    settle(out)
    return {"engine_s": tool_seconds(m.stdout), **_usage(m), "digest": digest}


def _usage(m: Measurement) -> dict:
    return {
        "wall_s": round(m.seconds, 3),
        "cpu_s": round(m.cpu_seconds, 4),
        "sys_s": round(m.system_seconds, 3),
        "minor_faults": m.minor_faults,
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "load1": round(m.load1, 2),
    }


def floor_once(method: str, size: str) -> dict:
    """The IO floor of one recipe: bench/floor.py reading the recipe's inputs, writing one
    model (the same command and protocol as bench_merge.py's floor)."""
    m1, m2, m3 = (WORK / size / f"m{k}" for k in (1, 2, 3))
    inputs = [m1, m2] if method == "slerp" else [m1, m2, m3]
    out = WORK / "out" / "floor"
    cmd = [*FLOOR, "--inputs", *map(str, inputs), "--out", str(out), "--copies", "1"]
    settle(out)
    m = measure(cmd)
    settle(out)
    return _usage(m)


def summarize(method: str, runs: list[dict], names: list[str]) -> list[dict]:
    """Medians per tree (and for the IO floor, when measured) for one recipe, with ratios to
    the first tree's and to the floor's wall seconds."""
    rows = []
    floor = [r for r in runs if r["side"] == "floor"]
    floor_wall = median([r["wall_s"] for r in floor]) if floor else None
    for name in names + (["floor"] if floor else []):
        mine = [r for r in runs if r["side"] == name]
        engine = [r["engine_s"] for r in mine if r.get("engine_s") is not None]
        rows.append(
            {
                "method": method,
                "tree": name,
                "engine_s": round(median(engine), 4) if engine else None,
                "wall_s": round(median([r["wall_s"] for r in mine]), 3),
                "cpu_s": round(median([r["cpu_s"] for r in mine]), 4),
                "sys_s": round(median([r["sys_s"] for r in mine]), 3),
                "minor_faults": int(median([r["minor_faults"] for r in mine])),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in mine)),
                "load": f"{min(r['load1'] for r in mine):.1f}-{max(r['load1'] for r in mine):.1f}",
                "digests": sorted({r["digest"] for r in mine if "digest" in r}),
            }
        )
    for row in rows:
        row["wall_ratio"] = round(row["wall_s"] / rows[0]["wall_s"], 2)
        row["cpu_ratio"] = round(row["cpu_s"] / rows[0]["cpu_s"], 2)
        row["floor_ratio"] = round(row["wall_s"] / floor_wall, 2) if floor_wall else None
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| recipe | tree | wall s | / floor | / first | engine s | CPU s | / first | system s "
        "| minor faults | peak RSS MB | load |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['method']} | {r['tree']} | {r['wall_s']:.2f} | {r['floor_ratio']} "
        f"| {r['wall_ratio']} | {r['engine_s']} | {r['cpu_s']:.2f} | **{r['cpu_ratio']}** "
        f"| {r['sys_s']:.2f} | {r['minor_faults']:,} | {r['peak_rss_mb']} | {r['load']} |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tree",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a source tree to run (twice or more; ratios are to the first one)",
    )
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)"
    )
    ap.add_argument("--tag", default="compare", help="log names: bench/_work/TAG-SIZE.json/.md")
    ap.add_argument(
        "--floor", action="store_true", help="also run the IO floor of each recipe (bench/floor.py)"
    )
    args = ap.parse_args()
    trees = {n: Path(p).resolve() for n, p in (t.split("=", 1) for t in args.tree)}
    if len(trees) < 2:
        raise SystemExit("--tree: give at least two trees")
    for tree in trees.values():
        check_tree(tree)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # measure() passes it to the runs
    inputs = [WORK / args.size / f"m{k}" for k in (1, 2, 3)]
    if not all((p / "config.json").exists() for p in inputs):
        raise SystemExit(f"run bench/make_models.py --size {args.size} first")
    info = machine()
    info["trees"] = {k: f"{v} ({commit_of(v)})" for k, v in trees.items()}
    info["run threads"] = str(args.threads or "torch default")
    print(info, flush=True)
    print(f"warmed {warm_cache(inputs) / 1e9:.1f} GB", flush=True)
    out = WORK / "out" / "compare"
    names = list(trees)
    runs: list[dict] = []
    for rep in range(args.repeats):
        for method in args.methods:
            path = write_recipe(method, args.size)
            sides = names + (["floor"] if args.floor else [])
            for name in sides if rep % 2 == 0 else sides[::-1]:
                r = {"method": method, "side": name, "rep": rep}
                if name == "floor":
                    r |= floor_once(method, args.size)
                else:
                    r |= run_once(trees[name], path, out)
                runs.append(r)
                print(
                    f"  {method:16s} {name} rep {rep}: wall {r['wall_s']} s, engine "
                    f"{r.get('engine_s')} s, cpu {r['cpu_s']} s, sys {r['sys_s']} s, "
                    f"{r['minor_faults']} faults, {r['peak_rss_mb']:.0f} MB (load {r['load1']})",
                    flush=True,
                )
    rows = [
        row
        for m in args.methods
        for row in summarize(m, [r for r in runs if r["method"] == m], names)
    ]
    md = table(rows)
    print(md)
    for method in args.methods:  # which trees wrote identical outputs
        by_tree = {r["tree"]: r["digests"] for r in rows if r["method"] == method and r["digests"]}
        print(f"{method}: output digests {by_tree}")
    tag = f"{args.tag}-{args.size}"
    save_json(WORK / f"{tag}.json", {"machine": info, "runs": runs, "rows": rows})
    header = "".join(f"- {k}: {v}\n" for k, v in info.items())
    (WORK / f"{tag}.md").write_text(header + "\n" + md)


if __name__ == "__main__":
    main()
