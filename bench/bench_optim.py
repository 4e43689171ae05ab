"""Step time and memory of OnlineMergingAdamW (ondare, onties) against torch AdamW, and the cost
of one Elastic Reset, on a ~100M-parameter Llama on CPU, in the same run.

    python bench/bench_optim.py [--rounds 3] [--steps 10] [--size 100M] [--dtype bfloat16]

Every measurement runs in a fresh process (`--worker MODE`), rounds alternate the order of the
optimizers. A worker builds the model (float32, or --dtype, seeded), gives every parameter a fixed random
gradient (so only `optimizer.step()` is timed, no forward or backward), builds the optimizer,
runs `--warmup` steps, then times `--steps` steps one by one. It reports the median step, the
optimizer's state bytes (every tensor in `optimizer.state`), and the process's resident memory
after the steps minus before the optimizer existed. tau (for the merging optimizers) is a lazy
seeded random source, N(0, 0.002^2) per entry, generated one tensor at a time, so no dense copy
of it is held outside the optimizer.

The elastic worker saves the model as a bf16 checkpoint, attaches an `ElasticResetCallback` and
times `on_step` at a plain step (EMA update only) and at a reset step (EMA update, theta <- EMA,
EMA <- theta_0 read back from the checkpoint), warm and, as root, with the page cache dropped.
Results: a markdown table on stdout and in bench/_work/optim.md, every run in optim.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import WORK, can_drop_caches, drop_caches
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

MODES = ("adamw", "ondare", "onties")
# Llama shapes with a small vocabulary: hidden 768, 12 layers -> ~97M parameters
SIZES = {
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, vocab_size=8192),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, vocab_size=512),
}
LR = 1e-5
TAU_STD = 0.002


def make_model(size: str, dtype: str = "float32") -> nn.Module:
    cfg = LlamaConfig(
        num_attention_heads=12 if size == "100M" else 4,
        num_key_value_heads=12 if size == "100M" else 4,
        tie_word_embeddings=False,
        **SIZES[size],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(getattr(torch, dtype))


def fixed_grads_(model: nn.Module, seed: int = 1) -> None:
    """A fixed random gradient on every parameter, reused by every step."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(p.dtype)


class RandomTaskVectors:
    """A lazy task-vector source (the `TaskVectorSource` protocol): seeded tau per name."""

    def __init__(self, shapes: dict[str, torch.Size], seed: int = 2):
        self.shapes, self.seed = shapes, seed

    def get(self, name: str) -> Tensor | None:
        gen = torch.Generator().manual_seed(self.seed + sorted(self.shapes).index(name))
        return torch.randn(self.shapes[name], generator=gen).mul_(TAU_STD).to(torch.bfloat16)


def make_optimizer(mode: str, model: nn.Module) -> torch.optim.Optimizer:
    if mode == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    from mergekit_rl.train.optim import OnlineMergingAdamW

    shapes = {n: p.shape for n, p in model.named_parameters()}
    return OnlineMergingAdamW(model.named_parameters(), RandomTaskVectors(shapes), lr=LR, mode=mode)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, Tensor)
    )


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def worker_optim(mode: str, size: str, warmup: int, steps: int, dtype: str) -> dict:
    model = make_model(size, dtype)
    fixed_grads_(model)
    n_params = sum(p.numel() for p in model.parameters())
    before = rss_bytes()
    t0 = time.perf_counter()
    opt = make_optimizer(mode, model)
    build_s = time.perf_counter() - t0
    for _ in range(warmup):
        opt.step()
    step_s = [timed(opt.step) for _ in range(steps)]
    return {
        "mode": mode,
        "dtype": dtype,
        "params": n_params,
        "build_s": round(build_s, 3),
        "step_s": [round(s, 4) for s in step_s],
        "median_step_s": statistics.median(step_s),
        "state_bytes": state_bytes(opt),
        "rss_delta_bytes": rss_bytes() - before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def save_bf16(model: nn.Module, directory: Path) -> None:
    """The model as a bf16 Hugging Face checkpoint (config.json + model.safetensors)."""
    model.config.save_pretrained(directory)
    state = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def worker_elastic(size: str, repeats: int, cold: bool) -> dict:
    from mergekit_rl.train.elastic import ElasticResetCallback

    model = make_model(size)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        save_bf16(model, Path(tmp))
        cb = ElasticResetCallback(tmp, ema_decay=0.995, reset_every=2)
        attach_s = timed(cb.attach, model)
        ema_s, reset_s, cold_s = [], [], []
        step = 0
        for _ in range(repeats):
            ema_s.append(timed(cb.on_step, model, None, step := step + 1))  # odd: EMA only
            reset_s.append(timed(cb.on_step, model, None, step := step + 1))  # even: reset
        if cold:
            for _ in range(repeats):
                cb.on_step(model, None, step := step + 1)
                drop_caches()
                cold_s.append(timed(cb.on_step, model, None, step := step + 1))
    return {
        "mode": "elastic",
        "checkpoint_bytes": 2 * sum(p.numel() for p in model.parameters()),
        "attach_s": round(attach_s, 3),
        "ema_step_s": [round(s, 4) for s in ema_s],
        "reset_step_s": [round(s, 4) for s in reset_s],
        "reset_step_cold_s": [round(s, 4) for s in cold_s],
        "resets": cb.num_resets,
    }


# -- the parent: run the workers, summarise --------------------------------------------------
def run_worker(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--size", args.size]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
    cmd += [] if args.cold else ["--no-cold"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    load1 = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load1"] = round(load1, 2)
    return result


def summarize(runs: list[dict]) -> tuple[list[dict], dict]:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    adamw_step = statistics.median(r["median_step_s"] for r in by_mode["adamw"])
    adamw_state = by_mode["adamw"][0]["state_bytes"]
    bf16_copy = 2 * by_mode["adamw"][0]["params"]
    rows = []
    for mode, rs in by_mode.items():
        medians = [r["median_step_s"] for r in rs]
        step = statistics.median(medians)
        extra_state = rs[0]["state_bytes"] - adamw_state
        extra_rss = statistics.median(r["rss_delta_bytes"] for r in rs) - statistics.median(
            r["rss_delta_bytes"] for r in by_mode["adamw"]
        )
        rows.append(
            {
                "mode": mode,
                "step_s": round(step, 4),
                "step_spread": f"{min(medians):.3f}-{max(medians):.3f}",
                "ratio": round(step / adamw_step, 2),
                "time_ok": step / adamw_step <= 1.2,
                "build_s": statistics.median(r["build_s"] for r in rs),
                "state_mib": round(rs[0]["state_bytes"] / 2**20, 1),
                "state_bytes_per_param": round(rs[0]["state_bytes"] / rs[0]["params"], 2),
                "extra_state_mib": round(extra_state / 2**20, 1),
                "extra_rss_mib": round(extra_rss / 2**20, 1),
                "bf16_copy_mib": round(bf16_copy / 2**20, 1),
                "mem_ok": max(extra_state, extra_rss) <= bf16_copy,
            }
        )
    return rows, {"adamw_step_s": adamw_step}


def markdown(rows: list[dict], elastic: list[dict], adamw_step: float) -> str:
    ok = {True: "met", False: "**missed**"}
    out = (
        "| optimizer | step s (median) | spread of run medians | x AdamW | time <= 1.2x "
        "| state MiB | state B/param | extra state MiB | extra RSS MiB | one bf16 copy MiB "
        "| memory |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        out += (
            f"| {r['mode']} | {r['step_s']} | {r['step_spread']} | {r['ratio']}x "
            f"| {ok[r['time_ok']]} | {r['state_mib']} | {r['state_bytes_per_param']} "
            f"| {r['extra_state_mib']} "
            f"| {r['extra_rss_mib']} | {r['bf16_copy_mib']} | {ok[r['mem_ok']]} |\n"
        )
    if elastic:
        ema = statistics.median(s for e in elastic for s in e["ema_step_s"])
        reset = statistics.median(s for e in elastic for s in e["reset_step_s"])
        cold = [s for e in elastic for s in e["reset_step_cold_s"]]
        attach = statistics.median(e["attach_s"] for e in elastic)
        out += (
            f"\nElastic Reset (checkpoint {elastic[0]['checkpoint_bytes'] / 1e6:.0f} MB bf16): "
            f"attach {attach:.2f} s; EMA-only step {ema:.3f} s ({ema / adamw_step:.2f}x an AdamW "
            f"step); reset step, warm cache {reset:.3f} s ({reset / adamw_step:.2f}x)"
        )
        if cold:
            c = statistics.median(cold)
            out += f"; reset step, page cache dropped {c:.3f} s ({c / adamw_step:.2f}x)"
        out += ".\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="100M")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per optimizer")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--no-cold",
        dest="cold",
        action="store_false",
        help="skip the reset timed with the page cache dropped (root only; on by default as root)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype"
    )
    ap.add_argument("--no-elastic", dest="elastic", action="store_false", help="skip Elastic")
    ap.add_argument("--worker", choices=[*MODES, "elastic"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cold = args.cold and can_drop_caches()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "elastic":
        print(json.dumps(worker_elastic(args.size, repeats=3, cold=args.cold)))
        return
    if args.worker:
        print(json.dumps(worker_optim(args.worker, args.size, args.warmup, args.steps, args.dtype)))
        return
    torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}"
    print(torch_info, flush=True)
    runs, elastic = [], []
    for rnd in range(args.rounds):
        order = MODES[rnd % 3 :] + MODES[: rnd % 3]  # rotate who goes first
        for mode in order:
            r = run_worker(args, mode)
            runs.append(r)
            print(
                f"  round {rnd} {mode:7s} median step {r['median_step_s']:.3f} s, state "
                f"{r['state_bytes'] / 2**20:.0f} MiB, load {r['load1']}",
                flush=True,
            )
    if args.elastic:
        elastic.append(run_worker(args, "elastic"))
        print(f"  elastic {elastic[-1]}", flush=True)
    rows, extra = summarize(runs)
    table = markdown(rows, elastic, extra["adamw_step_s"])
    print(table)
    tag = (f"-t{args.threads}" if args.threads else "") + (
        "-bf16" if args.dtype != "float32" else ""
    )
    (WORK / f"optim{tag}.md").write_text(f"- {torch_info}\n\n{table}")
    (WORK / f"optim{tag}.json").write_text(json.dumps({"runs": runs, "elastic": elastic}, indent=2))


if __name__ == "__main__":
    main()
