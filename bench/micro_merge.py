"""Merge kernels of two source trees in one process: old vs new, alternating, median of N.

    python bench/micro_merge.py --old /work/old --threads 1 --repeats 7

The old tree's `mergekit_rl` is loaded under another package name, so both versions run on
the same tensors in the same process (same allocator, cache and load). Tensors: task vectors of
real bf16 checkpoints when bench/_work/0.5B exists (make_models.py; the 4096 x 1024 MLP
tensor and the 32000 x 1024 embedding of m2, m3 over m1), else synthetic bf16-rounded ones of
the same shapes. Cases: the whole TIES, DARE-TIES, DELLA and slerp merge of one tensor (the method
function the engine calls), and the pieces (magnitude prune, the DARE keep mask, DELLA's keep).
Prints one Markdown table (old s, new s, new / old); JSON in bench/_work/micro-merge.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from harness import WORK, machine, save_json

NEW_TREE = Path(__file__).resolve().parent.parent


def load_package(tree: Path, name: str) -> ModuleType:
    """`tree`/mergekit_rl imported as package `name` (relative imports stay inside it)."""
    spec = importlib.util.spec_from_file_location(
        name,
        tree / "mergekit_rl" / "__init__.py",
        submodule_search_locations=[str(tree / "mergekit_rl")],
    )
    assert spec is not None and spec.loader is not None
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def task_vectors(shape: tuple[int, int], key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, [m2, m3]) float32 of one tensor of the 0.5B family, or synthetic ones."""
    models = [WORK / "0.5B" / f"m{k}" for k in (1, 2, 3)]
    if all((m / "config.json").exists() for m in models):
        from safetensors import safe_open

        out = []
        for m in models:
            for f in sorted(m.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    names = [n for n in h.keys() if key in n]  # noqa: SIM118 (not a dict)
                    names = [n for n in names if tuple(h.get_slice(n).get_shape()) == shape]
                    if names:
                        out.append(h.get_tensor(sorted(names)[0]).float())
                        break
        if len(out) == 3:
            return out[0], out[1:]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    tuned = [(base + torch.randn(shape, generator=g) * 2e-3).bfloat16().float() for _ in range(2)]
    return base, tuned


def timeit(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def primitives(pkg: ModuleType) -> SimpleNamespace:
    """The merge primitives of a tree by name: one `merge/core.py` in old trees, split by
    concern (`merge/selection.py`, `merge/rng.py`, ...) since."""
    try:
        return SimpleNamespace(**vars(importlib.import_module(f"{pkg.__name__}.merge.core")))
    except ModuleNotFoundError:
        found: dict[str, object] = {}
        for name in ("blend", "selection", "rng", "rounding"):
            found.update(vars(importlib.import_module(f"{pkg.__name__}.merge.{name}")))
        return SimpleNamespace(**found)


def cases(pkg: ModuleType, base: torch.Tensor, xs: list[torch.Tensor]) -> dict[str, Callable]:
    """name -> a call of this package's code on the given tensors."""
    prims = primitives(pkg)
    reg = pkg.merge.registry
    methods = {m.name: m for m in pkg.merge.methods.BUILTINS}
    ctx = reg.TensorContext("model.layers.0.mlp.up_proj.weight", ("m2", "m3"), 0)
    params = [{"weight": 0.5, "density": 0.5}] * 2
    delta = xs[0] - base
    n = delta.numel()
    key = prims.tensor_seed(0, "m2", ctx.name)
    probs = torch.full(delta.shape, 0.5)
    old_dare = hasattr(prims, "bernoulli_mask")  # the old tree drew masks with CPU generators

    def dare_mask() -> torch.Tensor:
        if old_dare:
            return prims.bernoulli_mask(delta.shape, 0.5, 0, "m2", ctx.name)
        return prims.hash_keep_mask(delta.shape, 0.5, key)

    def della_keep() -> torch.Tensor:
        if old_dare:
            return prims.bernoulli_mask_like(probs, 0, "m2", ctx.name)
        return prims.hash_uniform(n, key).view(delta.shape) < probs

    return {
        "ties merge": lambda: methods["ties"].run(ctx, xs, base, params, {}),
        "dare_ties merge": lambda: methods["dare_ties"].run(ctx, xs, base, params, {}),
        "della merge": lambda: methods["della"].run(ctx, xs, base, params, {}),
        "slerp merge": lambda: methods["slerp"].run(ctx, xs[:1], base, [{}], {"t": 0.5}),
        "magnitude_prune d=0.5": lambda: prims.magnitude_prune(delta, 0.5),
        "magnitude_prune d=0.1": lambda: prims.magnitude_prune(delta, 0.1),
        "DARE keep mask d=0.5": dare_mask,
        "DELLA keep (u < p)": della_keep,
        "hash_keep_mask d=0.5": lambda: prims.hash_keep_mask(delta.shape, 0.5, key),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the old source tree")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pkgs = {
        "old": load_package(args.old.resolve(), "mergekit_rl_old"),
        "new": load_package(NEW_TREE, "mergekit_rl"),
    }
    for pkg in pkgs.values():
        __import__(f"{pkg.__name__}.merge.methods")
    info = machine()
    rows = []
    for shape, key in (((4096, 1024), "up_proj"), ((32000, 1024), "embed_tokens")):
        base, xs = task_vectors(shape, key)
        per = {side: cases(pkg, base, xs) for side, pkg in pkgs.items()}
        for name in per["new"]:
            if args.only not in name:
                continue
            t = {"old": [], "new": []}
            for rep in range(args.repeats):  # alternate, order flipped every repeat
                for side in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                    t[side].append(timeit(per[side][name], 1))
            old_s, new_s = statistics.median(t["old"]), statistics.median(t["new"])
            rows.append(
                {"shape": "x".join(map(str, shape)), "case": name, "old_s": old_s, "new_s": new_s}
            )
            print(
                f"{rows[-1]['shape']:>10s} {name:26s} old {old_s:.4f} new {new_s:.4f} ratio {new_s / old_s:.2f}",
                flush=True,
            )
    md = "| tensor | case | old s | new s | new / old |\n|---|---|---|---|---|\n" + "".join(
        f"| {r['shape']} | {r['case']} | {r['old_s']:.4f} | {r['new_s']:.4f} | {r['new_s'] / r['old_s']:.2f} |\n"
        for r in rows
    )
    print(md)
    save_json(WORK / "micro-merge.json", {"machine": info, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
