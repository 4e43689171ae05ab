"""One-command GPU benchmark: merges against the IO floor (and mergekit), optimizer steps
against fused AdamW, on a model family it builds itself.

    python bench/gpu.py            # one CUDA GPU: the 1.1B family, under 6 minutes
    python bench/gpu.py --small    # tiny sizes on the CPU (what CI runs; numbers mean nothing)

1. Builds base + 3 fine-tunes of a Llama (1.1B: hidden 2048, 22 layers, vocab 32000; weights
   drawn on the device, so seconds on a GPU) as bf16 checkpoints under $RLMERGE_BENCH_WORK/gpu.
2. Merges, each command in a fresh process after a warm-up read of the inputs (page cache
   warm): the IO floor (bench/floor.py: read the inputs with safetensors, write one model, no
   math), `rlmerge merge RECIPE --device DEV` and, when `mergekit-yaml` is on PATH and the
   device is CUDA, `mergekit-yaml RECIPE OUT --cuda`. Recipes: soup (linear) of the three,
   task_arithmetic, ties (density .5/.3/.7), dare_ties (density .5) over the base, slerp.
3. Optimizer step on the float32 model (fixed random gradients, only `step()` timed,
   synchronised, median): torch AdamW fused and foreach, rlmerge OnDARE and OnTIES (through
   `OnlineMergingAdamW`, reserve_p 0.01), Elastic Reset's EMA update (`blend.ema_update_many_` on
   every parameter), and plain reimplementations of the released algorithms (Adam update, then
   dense `F.dropout` per tensor for OnDARE, a full `argsort` per tensor for OnTIES).
Prints two Markdown tables with ratios (x the IO floor, x fused AdamW) and writes gpu.json
(every number, the machine) beside them in $RLMERGE_BENCH_WORK.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from harness import FLOOR, RLMERGE, WORK, machine, measure, save_json, settle, warm_cache
from torch import Tensor, nn

SIZES = {  # Llama shapes: TinyLlama-1.1B, and a tiny one for --small
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000,
                 num_attention_heads=32, num_key_value_heads=4),
    "small": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, vocab_size=512,
                  num_attention_heads=4, num_key_value_heads=4),
}  # fmt: skip
TAU_STD, LR, RESERVE_P = 0.002, 1e-5, 0.01


# ---- the model family ----------------------------------------------------------------------


def llama(size: str, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(tie_word_embeddings=False, **SIZES[size])
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).float()


def build_family(root: Path, size: str, device: torch.device) -> dict[str, Path]:
    """base, m1, m2, m3 as bf16 checkpoints: base weights plus N(0, 0.002^2) per fine-tune."""
    from safetensors.torch import save_file

    model = llama(size, device)
    paths = {name: root / name for name in ("base", "m1", "m2", "m3")}
    for i, path in enumerate(paths.values()):
        if (path / "model.safetensors").exists():
            continue
        gen = torch.Generator(device=device).manual_seed(i)
        state = {}
        for pname, p in model.state_dict().items():
            x = p.detach()
            if i:
                x = x + torch.randn(x.shape, generator=gen, device=device) * TAU_STD
            state[pname] = x.to(torch.bfloat16).cpu().contiguous()
        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(path)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        del state
    del model
    return paths


# ---- merges --------------------------------------------------------------------------------


def recipes(p: dict[str, Path]) -> dict[str, dict]:
    models = [str(p[m]) for m in ("m1", "m2", "m3")]
    densities = (0.5, 0.3, 0.7)

    def tv(method: str, extra: Callable[[int], dict]) -> dict:
        return {
            "merge_method": method,
            "base_model": str(p["base"]),
            "models": [{"model": m, "parameters": {"weight": 1 / 3, **extra(i)}}
                       for i, m in enumerate(models)],
            "seed": 0,
        }  # fmt: skip

    return {
        "soup": {"merge_method": "linear", "models": [{"model": m} for m in models]},
        "task_arithmetic": tv("task_arithmetic", lambda i: {}),
        "ties": tv("ties", lambda i: {"density": densities[i]}),
        "dare_ties": tv("dare_ties", lambda i: {"density": 0.5}),
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(p["base"]),
            "models": [{"model": str(p["base"])}, {"model": models[0]}],
            "parameters": {"t": 0.5},
        },
    }


def bench_merges(p: dict[str, Path], device: str, only: list[str] | None) -> list[dict]:
    rows = []
    out = WORK / "gpu" / "out"
    mergekit = shutil.which("mergekit-yaml") if device.startswith("cuda") else None
    warm_cache(list(p.values()))
    floors: dict[int, float] = {}
    for name, recipe in recipes(p).items():
        if only and name not in only:
            continue
        path = WORK / "gpu" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        inputs = [Path(m["model"]) for m in recipe["models"]]
        inputs += [Path(recipe["base_model"])] if "base_model" in recipe else []
        inputs = list(dict.fromkeys(inputs))
        if len(inputs) not in floors:
            cmd = [*FLOOR, "--inputs", *map(str, inputs), "--out", str(out), "--copies", "1"]
            floors[len(inputs)] = measure(cmd).seconds
            settle(out)
        cmd = [*RLMERGE, "merge", str(path), "-o", str(out), "--device", device, "--quiet"]
        ours = measure([*cmd, "--force"]).seconds
        settle(out)
        theirs = None
        if mergekit:
            theirs = measure([mergekit, str(path), str(out), "--cuda"]).seconds
            settle(out)
        floor = floors[len(inputs)]
        rows.append(
            {
                "recipe": name,
                "inputs": len(inputs),
                # seconds keep 4 decimals so a reader can recompute the ratio from them
                "floor_s": round(floor, 4),
                "rlmerge_s": round(ours, 4),
                "mergekit_s": None if theirs is None else round(theirs, 4),
                "rlmerge_x_floor": round(ours / floor, 2),
            }
        )
    return rows


# ---- optimizer steps -----------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ReleasedOnline:
    """The released OnDARE/OnTIES algorithm, written plainly (one tensor at a time): the Adam
    update, then a dense dropout mask (OnDARE) or a full argsort top-k (OnTIES) of it."""

    def __init__(self, params: list[Tensor], taus: list[Tensor], mode: str):
        self.params, self.taus, self.mode, self.t = params, taus, mode, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        size = LR * (1 - b2**self.t) ** 0.5 / (1 - b1**self.t)
        for p, tau, m, v in zip(self.params, self.taus, self.m, self.v, strict=True):
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            delta = -size * m / (v.sqrt() + 1e-8)
            if self.mode == "ondare":
                delta = nn.functional.dropout(delta, p=1 - RESERVE_P)  # dense mask, 1/p rescale
                p.add_(tau.to(p.dtype), alpha=1e-7).add_(delta, alpha=1 - 1e-7)
            else:
                k = max(1, int(RESERVE_P * delta.numel()))
                order = delta.abs().flatten().argsort(descending=True)
                keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
                keep[order[:k]] = True
                delta = delta * keep.view(delta.shape)
                t = tau.to(p.dtype)
                sign = torch.where(t + delta >= 0, 1.0, -1.0)
                p.add_(t * (t * sign > 0), alpha=1e-7).add_(
                    delta * (delta * sign > 0), alpha=1 - 1e-7
                )


def bench_optim(size: str, device: torch.device, steps: int) -> list[dict]:
    from mergekit_rl.merge import blend
    from mergekit_rl.train.optim import OnlineMergingAdamW

    model = llama(size, device)
    gen = torch.Generator(device=device).manual_seed(1)
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3)
    params = [p for _, p in named]
    taus = {n: (torch.randn(p.shape, generator=gen, device=device) * TAU_STD).bfloat16()
            for n, p in named}  # fmt: skip
    results: dict[str, float] = {}

    def run(name: str, make: Callable[[], Callable[[], object]]) -> None:
        snapshot = [p.detach().clone() for p in params]
        try:
            results[name] = timed_steps(make(), device, warmup=2, steps=steps)
        except (RuntimeError, NotImplementedError) as e:  # e.g. no fused AdamW for this device
            print(f"skipped {name}: {e}", file=sys.stderr)
        with torch.no_grad():
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
        del snapshot
        if device.type == "cuda":
            torch.cuda.empty_cache()

    run("torch AdamW fused", lambda: torch.optim.AdamW(params, lr=LR, fused=True).step)
    run("torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=LR, foreach=True).step)
    for mode in ("ondare", "onties"):
        run(
            f"rlmerge {'OnDARE' if mode == 'ondare' else 'OnTIES'}",
            lambda mode=mode: (
                OnlineMergingAdamW(
                    model.named_parameters(), taus, mode=mode, reserve_p=RESERVE_P, lr=LR
                ).step
            ),
        )
        label = "OnDARE (dense dropout)" if mode == "ondare" else "OnTIES (full argsort)"
        run(
            f"released {label}",
            lambda mode=mode: ReleasedOnline(params, [taus[n] for n, _ in named], mode).step,
        )
    ema = [p.detach().clone() for p in params]

    def ema_step() -> None:
        # what ElasticResetCallback runs every ema_every steps: one multi-tensor lerp
        with torch.no_grad():
            blend.ema_update_many_(ema, params, 0.995)

    run("Elastic Reset EMA update", lambda: ema_step)
    ref = results.get("torch AdamW fused") or results.get("torch AdamW foreach")
    return [
        {"optimizer": k, "step_ms": round(v * 1e3, 2), "x_fused_adamw": round(v / ref, 2)}
        for k, v in results.items()
    ]


# ---- report --------------------------------------------------------------------------------


def markdown(merges: list[dict], optim: list[dict], where: str) -> str:
    lines = [f"Merges ({where}; page cache warm; one run each)", ""]
    lines += ["| recipe | IO floor s | rlmerge s | x floor | mergekit s |", "|---|---|---|---|---|"]
    for r in merges:
        mk = "-" if r["mergekit_s"] is None else f"{r['mergekit_s']:.2f}"
        lines.append(
            f"| {r['recipe']} | {r['floor_s']:.2f} | {r['rlmerge_s']:.2f} "
            f"| {r['rlmerge_x_floor']} | {mk} |"
        )
    lines += ["", "Optimizer step (float32, fixed gradients, median)", ""]
    lines += ["| optimizer | step ms | x fused AdamW |", "|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['step_ms']} | {r['x_fused_adamw']} |" for r in optim]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU (smoke test)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps (median)")
    ap.add_argument("--keep", action="store_true", help="keep the built models")
    ap.add_argument("--recipes", nargs="*", help="only these merge recipes (default: all five)")
    args = ap.parse_args()
    if args.small:
        size, device = "small", torch.device("cpu")
    elif torch.cuda.is_available():
        size, device = "1.1B", torch.device("cuda")
    else:
        sys.exit("bench/gpu.py needs a CUDA GPU (or --small for the CPU smoke run).")
    t0 = time.time()
    root = WORK / "gpu" / size
    paths = build_family(root, size, device)
    build_s = time.time() - t0
    merges = bench_merges(paths, device.type, args.recipes)
    optim = bench_optim(size, device, args.steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(markdown(merges, optim, where))
    data = {
        "size": size,
        "device": where,
        "build_s": round(build_s, 1),
        "total_s": round(time.time() - t0, 1),
        "merges": merges,
        "optimizer": optim,
        "torch": torch.__version__,
        **machine(),
    }
    save_json(WORK / "gpu.json", data)
    (WORK / "gpu.md").write_text(markdown(merges, optim, where) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {data['total_s']} s; {WORK / 'gpu.json'}")


if __name__ == "__main__":
    main()
