"""OnDARE / OnTIES training steps on FSDP2 shards against DDP replicas: 2 CPU processes, gloo.

    python -m torch.distributed.run --nproc_per_node 2 bench/bench_fsdp.py [--steps 6]

A Llama (hidden 512, 4 layers, vocab 8000: 19.8M float32 parameters) trains on random tokens
(4 sequences x 128 tokens per rank) with OnlineMergingAdamW, wrapped either in DDP or sharded
per decoder layer with `fully_shard`. Per rank: the median step time (forward, backward,
optimizer step) after one warm-up step, the peak resident memory above the model's, and the
optimizer state's bytes. Rank 0 prints one JSON line per (wrapper, mode). Run it with
MALLOC_MMAP_THRESHOLD_=65536 so resident memory follows live tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, LlamaConfig

from mergekit_rl.train.optim import OnlineMergingAdamW

CONFIG = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=False,
)  # fmt: skip


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key)).split()[1]) * 1024


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if isinstance(v, DTensor) else v
                total += t.numel() * t.element_size()
    return total


def run(wrapper: str, mode: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32)
    tau = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
    if wrapper == "fsdp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        named = model.named_parameters()
    else:
        model = DistributedDataParallel(model)
        named = model.named_parameters()
    opt = OnlineMergingAdamW(named, tau, mode=mode, reserve_p=0.01, alpha=1e-7, lr=1e-5)
    del tau
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 128))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "wrapper": wrapper,
        "mode": mode,
        "step_s": statistics.median(times[1:]),
        "peak_above_start_mb": (status("VmHWM") - base) / 2**20,
        "start_mb": base / 2**20,
        "optimizer_state_mb": state_bytes(opt) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for mode in ("ondare", "onties"):
        for wrapper in ("ddp", "fsdp"):
            got = run(wrapper, mode, args.steps)
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, got)
            if dist.get_rank() == 0:
                print(json.dumps({"ranks": every}), flush=True)
            gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
