"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on 2 CPU processes over gloo (test_fsdp2).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.train.fsdp2_worker MODEL OUT

Shards a tiny Llama per decoder layer, trains it 3 AdamW steps on one fixed batch (the same on
both ranks, so the averaged gradient is the full batch's), gathers the parameters and, on rank
0, trains an unsharded copy the same way. Writes OUT/fsdp.safetensors, OUT/single.safetensors
and OUT/rank-<i>.json (local shard shapes), for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

STEPS = 3


def train(model: torch.nn.Module) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.arange(4 * 12).reshape(4, 12) % 200 + 3  # [batch 4, seq 12]
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def main(model_dir: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model)
    local = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    info = {
        "backend": dist.get_backend(),
        "dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "local_shapes": local,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        save_file(full, out / "fsdp.safetensors")
        single = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        train(single)
        save_file(
            {n: p.detach().clone() for n, p in single.named_parameters()},
            out / "single.safetensors",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
