"""Fault campaign: kill -9, write errors, two writers, SIGTERM/SIGINT in training, fuzzing.

    python bench/faults.py --kills 30

prints one table row per fault: trials and outcomes (clean error / output absent / complete
output / corrupt output / leftover files after the next run). A few-MB tiny Llama family is
built in RLMERGE_BENCH_WORK (default bench/_work)/faults. Outcome definitions:

- kill -9: the command is SIGKILLed at a random moment (4 in 5 inside the writer's window,
  from its first temp file to its commit, as measured on an uninterrupted run and shrunk each
  time a kill comes after the commit; 1 in 5 anywhere in the first 4 s from process start). "complete" means
  byte for byte the uninterrupted run's output; after each trial that left anything, the same
  command runs again and must remove the leftovers and write the reference output.
- write errors: RLIMIT_FSIZE at several limits; "clean error" is exit 1 with one message that
  names the output, no output and no temp or lock file.
- two writers: two `soup -o SAME` started together; one must succeed and the other exit 2.
- SIGTERM / SIGINT in `rlmerge train`: exit 130 with a checkpoint; `--resume` must give the
  uninterrupted run's weights.
- fuzzing: the hypothesis tests of tests/io and tests/faults with RLMERGE_FUZZ_EXAMPLES each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.faults.harness import (  # noqa: E402
    RLMERGE,
    kill_trial,
    leftovers,
    reference_run,
    remove,
    run,
    snapshot,
)

WORK = Path(os.environ.get("RLMERGE_BENCH_WORK", REPO / "bench" / "_work")) / "faults"
COLUMNS = ["clean error", "absent", "complete", "corrupt", "leftovers after next run"]


def family() -> dict[str, Path]:
    from mergekit_rl.tiny import build_family

    root = WORK / "family"
    if not (root / "rlhf" / "config.json").is_file():
        build_family(root, hidden=192, layers=4)
    return {k: root / k for k in ("base", "sft1", "sft2", "rlhf")}


def commands(fam: dict[str, Path], out: Path) -> dict[str, list[str]]:
    recipe = WORK / "ties.yaml"
    models = [
        {"model": str(fam[m]), "parameters": {"weight": 0.5, "density": 0.5}}
        for m in ("sft1", "sft2")
    ]
    doc = {"merge_method": "ties", "base_model": str(fam["base"]), "models": models}
    recipe.write_text(yaml.safe_dump(doc))
    shard = ["--max-shard-size", "1MB", "--quiet"]
    sft1, sft2, rlhf = (str(fam[k]) for k in ("sft1", "sft2", "rlhf"))
    return {
        "soup": ["soup", sft1, sft2, "-o", str(out), *shard],
        "interpolate": ["interpolate", sft1, rlhf, "-o", str(out), "--alpha", "0,0.5,1", *shard],
        "merge": ["merge", str(recipe), "-o", str(out), "--quiet"],
        "task-vector extract": [
            "task-vector",
            "extract",
            str(fam["base"]),
            sft1,
            "-o",
            str(out) + ".safetensors",
        ],  # fmt: skip
    }


def kills(fam: dict[str, Path], n: int, rng: random.Random) -> list[tuple[str, int, Counter]]:
    rows = []
    out = WORK / "out" / "model"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, args in commands(fam, out).items():
        if name == "task-vector extract":
            continue
        reference, window = reference_run(args, out)
        counts: Counter = Counter()
        for i in range(n):
            from_start = i % 5 == 4
            delay = rng.uniform(0, 4.0 if from_start else 1.1 * window)
            t = kill_trial(args, out, reference, delay, from_start=from_start)
            if not from_start and t.killed and t.state == "complete" and not t.leftovers:
                window = max(0.02, delay)  # the commit came before `delay`: aim earlier
            counts[t.state] += 1
            counts["killed"] += t.killed
            counts["left right after kill"] += t.leftovers > 0
            if t.cleaned is False or leftovers(out.parent):
                counts["leftovers after next run"] += 1
        print(
            f"  kill -9 {name}: window {window * 1000:.0f} ms at the end, {dict(counts)}",
            flush=True,
        )
        rows.append((f"kill -9 during `{name}`", n, counts))
    return rows


def write_errors(fam: dict[str, Path]) -> tuple[str, int, Counter]:
    out = WORK / "out" / "model"
    counts: Counter = Counter()
    trials = 0
    for limit in (4 << 10, 64 << 10, 512 << 10, 2 << 20, 3 << 20):  # 0: torch cannot import

        def limited(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        for args in commands(fam, out).values():
            trials += 1
            target = Path(args[args.index("-o") + 1])
            done = run(args, preexec_fn=limited)
            left = leftovers(target.parent)
            if done.returncode == 0:
                counts["complete"] += 1
            elif (
                done.returncode == 1
                and done.stderr.count("rlmerge: failed:") == 1
                and str(target) in done.stderr
                and not os.path.lexists(target)
            ):
                counts["clean error"] += 1
            else:
                counts["other"] += 1
                print(f"    unexpected: rc {done.returncode}: {done.stderr[-400:]}", flush=True)
            counts["leftovers after next run"] += bool(left)
            remove(target)
            for p in left:
                remove(p)
    print(f"  write errors: {dict(counts)}", flush=True)
    return "write error (RLIMIT_FSIZE 4 KB-3 MB)", trials, counts


def two_writers(fam: dict[str, Path], n: int) -> tuple[str, int, Counter]:
    out = WORK / "out" / "two"
    args = commands(fam, out)["soup"]
    reference, _ = reference_run(args, out)
    counts: Counter = Counter()
    for _ in range(n):
        procs = [
            subprocess.Popen([*RLMERGE, *args], stderr=subprocess.PIPE, text=True) for _ in range(2)
        ]
        results = [(p.wait(), p.stderr.read()) for p in procs]
        codes = sorted(c for c, _ in results)
        ok = snapshot(out) == reference if out.exists() else False
        if codes == [0, 2] and ok:
            counts["clean error"] += 1  # one wrote, the other was refused
            counts["complete"] += 1
        elif codes == [0, 0]:
            counts["both succeeded"] += 1
        else:
            counts["corrupt" if out.exists() and not ok else "other"] += 1
        counts["leftovers after next run"] += bool(leftovers(out.parent))
        remove(out)
    print(f"  two writers: {dict(counts)}", flush=True)
    return "two `soup -o SAME` at once", n, counts


def train_signals(fam: dict[str, Path]) -> tuple[str, int, Counter]:
    import torch

    from mergekit_rl.train.recipe import parse_train_recipe
    from mergekit_rl.train.run import TrainOptions, train
    from tests.conftest import load_state
    from tests.faults.test_train_signal import logged_steps, recipe

    text = recipe(fam, WORK / "train-straight")
    remove(WORK / "train-straight")
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    want = load_state(WORK / "train-straight" / "final")
    counts: Counter = Counter()
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        out = WORK / f"train-{sig.name}"
        remove(out)
        path = WORK / f"{sig.name}.yaml"
        path.write_text(recipe(fam, out))
        proc = subprocess.Popen([*RLMERGE, "train", str(path)], stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not logged_steps(out):
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate()
        ckpts = list(out.glob("checkpoint-*"))
        if proc.returncode != 130 or len(ckpts) != 1:
            counts["other"] += 1
            print(f"    unexpected: rc {proc.returncode}, {ckpts}: {err[-400:]}", flush=True)
            continue
        counts["clean error"] += 1
        done = run(["train", str(path), "--resume"])
        got = load_state(out / "final") if done.returncode == 0 else {}
        same = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        counts["complete" if same else "corrupt"] += 1
    print(f"  train signals: {dict(counts)}", flush=True)
    return "SIGTERM / SIGINT in `rlmerge train` (exit 130, then --resume)", len(sigs), counts


def fuzz(examples: int) -> list[tuple[str, int, Counter]]:
    env = {**os.environ, "RLMERGE_FUZZ_EXAMPLES": str(examples)}
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "tests/io/test_safetensors_fuzz.py", "tests/faults/test_fuzz_recipe.py",
        "--hypothesis-show-statistics", "--hypothesis-seed=0",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    rows = []
    for label, pattern in (("safetensors header", "safetensors_fuzz"), ("recipe", "fuzz_recipe")):
        blocks = re.findall(rf"{pattern}\.py::(\w+):\n(.*?)(?=\n\S|\Z)", done.stdout, re.S)
        n = fail = 0
        for _, block in blocks:
            for p, f in re.findall(r"(\d+) passing, (\d+) failing", block):
                n, fail = n + int(p) + int(f), fail + int(f)
        rows.append((f"fuzzed {label} ({len(blocks)} generators)", n, Counter(
            {"clean error / parsed": n - fail, "corrupt": fail})))  # fmt: skip
    print(f"  fuzz: pytest exit {done.returncode}; {done.stdout.splitlines()[-1:]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30, help="kills per command")
    ap.add_argument("--writers", type=int, default=10, help="two-writer trials")
    ap.add_argument("--fuzz", type=int, default=1000, help="hypothesis cases per generator")
    ap.add_argument("--skip", default="", help="comma list: kill,write,writers,train,fuzz")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    fam = family()
    size = sum(f.stat().st_size for f in fam["sft1"].glob("*.safetensors"))
    print(f"model: {size / 1e6:.1f} MB per checkpoint; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    if "kill" not in skip:
        rows += kills(fam, args.kills, random.Random(args.seed))
    if "write" not in skip:
        rows.append(write_errors(fam))
    if "writers" not in skip:
        rows.append(two_writers(fam, args.writers))
    if "train" not in skip:
        rows.append(train_signals(fam))
    if "fuzz" not in skip:
        rows += fuzz(args.fuzz)
    print("\n| fault | trials | outcomes |\n|---|---|---|")
    for label, n, counts in rows:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"| {label} | {n} | {shown} |")
    print(json.dumps({"rows": [(a, b, dict(c)) for a, b, c in rows]}))


if __name__ == "__main__":
    main()
