"""Torch calls per parameter per optimizer step on the accelerator path, counted on the CPU: a
proxy for kernel launches, which bound a step on a GPU when parameters are many and small.

    python bench/launches.py [--params 20] [--layout toy|tinyllama]

The accelerator path is forced on the CPU (host kernels off, sync-free top-k, fused moments as
on CUDA). A dispatch mode counts every aten call of one step after a warm-up step, views
included (they launch nothing, so the count without them is given too). The parameters are
--params tensors in one chunk, half 256 x 128 matrices and half 128-entry vectors (toy), or the
201 parameters of the 1.1B TinyLlama layout (hidden 2048, 22 layers, 4 KV heads, vocab 32000)
with every dimension / 16 and the chunk budget / 256, so parameters fall into chunks as in the
full model (tinyllama). Random tau and gradients. Prints a Markdown table (calls per parameter
and per step) and writes launches.json in $RLMERGE_BENCH_WORK.
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ["RLMERGE_NATIVE"] = "0"  # before mergekit_rl loads: the torch paths accelerators run

import torch
from harness import WORK, machine, save_json
from torch.utils._python_dispatch import TorchDispatchMode

from mergekit_rl.train import optim

VIEWS = {"view", "slice", "select", "detach", "split_with_sizes", "squeeze", "unsqueeze",
         "expand", "lift_fresh", "unbind", "alias"}  # fmt: skip


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def tinyllama_shapes(scale: int = 16) -> list[tuple[int, ...]]:
    """TinyLlama 1.1B's parameter shapes with every dimension divided by scale."""
    h, kv, inter, vocab = 2048 // scale, 256 // scale, 5632 // scale, 32000 // scale
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(vocab, h), *layer * 22, (h,), (vocab, h)]


def count(mode: str, dtype: torch.dtype, weight_decay: float, shapes: list) -> dict:
    torch.manual_seed(0)
    n = len(shapes)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    names = [f"p{i}" for i in range(n)]
    taus = {name: torch.randn(s) * 1e-3 for name, s in zip(names, shapes, strict=True)}
    opt = optim.OnlineMergingAdamW(
        list(zip(names, params, strict=True)), taus, mode=mode, lr=1e-3, weight_decay=weight_decay
    )
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds scratch buffers and tables
    with Count() as c:
        opt.step()
    total = sum(c.calls.values())
    views = sum(v for k, v in c.calls.items() if k in VIEWS)
    return {
        "optimizer": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_decay": weight_decay,
        "calls_per_step": total,
        "calls_per_param": round(total / n, 1),
        "without_views": round((total - views) / n, 1),
        "top": dict(c.calls.most_common(8)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=20)
    ap.add_argument("--layout", choices=["toy", "tinyllama"], default="toy")
    args = ap.parse_args()
    optim.HOST_SELECTION_DEVICES = ()  # the sync-free radix select, as on accelerators
    shapes = [(256, 128)] * (args.params // 2) + [(128,)] * (args.params - args.params // 2)
    if args.layout == "tinyllama":
        shapes = tinyllama_shapes()
        optim.CHUNK_ELEMS //= 256  # parameters fall into chunks as in the full-size model
    rows = [
        count(mode, dtype, wd, shapes)
        for mode in ("ondare", "onties")
        for dtype in (torch.float32, torch.bfloat16)
        for wd in (0.0, 0.01)
    ]
    print(f"{len(shapes)} parameters ({args.layout})\n")
    print(
        "| optimizer | parameters | weight decay | calls per step | per parameter | without views |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {r['dtype']} | {r['weight_decay']} | {r['calls_per_step']} "
            f"| {r['calls_per_param']} | {r['without_views']} |"
        )
    WORK.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "layout": args.layout, "params": len(shapes), "rows": rows}
    save_json(WORK / "launches.json", info)


if __name__ == "__main__":
    main()
