"""OnlineMergingAdamW on FSDP2 shards against the unsharded optimizer (test_fsdp_optim).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.train.fsdp_optim_worker DIR

DIR holds base.safetensors and sft.safetensors of `Net` (written by the test). For every case
(mode, dtype, merge_every) each rank builds the SFT model twice: one copy sharded with
`fully_shard` (every parameter a DTensor split on dim 0: 259 rows are 130 + 129, the one-row
parameter lives on rank 0 only), one plain. Both get an OnlineMergingAdamW with tau from the
checkpoints (read row-wise for the shards). Each step the sharded model runs forward and
backward; the plain copy gets the gathered gradient, so the two optimizers see the same
gradients and any difference is the optimizer's. Writes DIR/rank-<r>.json: per case the
parameters whose gathered weights differ from the plain run's (bit for bit), how many weights
moved, and the bytes of optimizer state each keeps on this rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mergekit_rl.merge import selection
from mergekit_rl.train.elastic import ElasticResetCallback
from mergekit_rl.train.optim import OnlineMergingAdamW
from mergekit_rl.train.reference import copy_weights_
from mergekit_rl.train.taskvec import CheckpointTaskVectors

STEPS = 4
CASES = [
    (mode, dtype, k)
    for mode in ("ondare", "onties")
    for dtype in ("float32", "bfloat16")
    for k in (1, 3)
]


class Net(nn.Module):
    """Shapes that shard unevenly over 2 ranks: 259 and 7 rows, and a parameter of 1 row."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(259, 16)
        self.proj = nn.Linear(16, 7)
        self.gate = nn.Parameter(torch.ones(1, 7))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.emb(ids)) * self.gate  # [batch, seq, 7]
        return (h.float() ** 2).mean() + h.float().sum() * 0.01


def build(sft: dict[str, torch.Tensor], dtype: torch.dtype) -> Net:
    net = Net()
    net.load_state_dict(sft)
    return net.to(dtype)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state held on this rank (local shards)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if isinstance(v, DTensor) else v
                total += t.numel() * t.element_size()
    return total


def run_case(root: Path, mode: str, dtype: torch.dtype, merge_every: int) -> dict:
    sft = load_file(root / "sft.safetensors")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded, plain = build(sft, dtype), build(sft, dtype)
    fully_shard(sharded.proj, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    kw = dict(
        mode=mode, reserve_p=0.1, alpha=1e-2, lr=1e-2, weight_decay=0.1,
        merge_every=merge_every, seed=7,
    )  # fmt: skip
    with CheckpointTaskVectors(str(root / "base"), str(root / "sft")) as tv:
        opt = OnlineMergingAdamW(sharded.named_parameters(), tv, **kw)
        ref = OnlineMergingAdamW(plain.named_parameters(), tv, **kw)
    ids = torch.arange(6 * 5).reshape(6, 5) * 37 % 259  # the same batch on both ranks
    params = dict(plain.named_parameters())
    for _ in range(STEPS):
        sharded(ids).backward()
        for name, p in sharded.named_parameters():
            params[name].grad = p.grad.full_tensor()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    opt.flush()
    ref.flush()
    differ, moved = [], 0
    for name, p in sharded.named_parameters():
        full = p.detach().full_tensor()
        if not torch.equal(full, params[name].detach()):
            differ.append(name)
        moved += int((full.float() != sft[name].to(dtype).float()).sum())
    return {
        "differ": differ,
        "moved": moved,
        "state_bytes": state_bytes(opt),
        "plain_state_bytes": state_bytes(ref),
        "local_rows": {n: p.to_local().shape[0] for n, p in sharded.named_parameters()},
    }


def check_top_k() -> list[str]:
    """`selection.top_magnitude_indices_sharded` against the unsharded selection, on tensors full of
    ties (small integers, signs mixed) split unevenly and with an empty shard: the failures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    gen = torch.Generator().manual_seed(3)
    for numel, k, cut in ((1000, 10, 600), (1000, 333, 500), (37, 5, 37), (64, 64, 10), (9, 1, 0)):
        x = torch.randint(-4, 5, (numel,), generator=gen).float()
        bounds = [0, cut, numel] if world == 2 else [0, numel]
        lo, hi = bounds[rank], bounds[rank + 1]
        idx, pos = selection.top_magnitude_indices_sharded(x[lo:hi], k, lo, None)
        want = selection.top_magnitude_indices(x, k)
        mine = want[(want >= lo) & (want < hi)]
        if not torch.equal(idx + lo, mine) or pos != int((want < lo).sum()):
            failures.append(f"numel {numel} k {k} rows {lo}:{hi}")
    return failures


def run_elastic(root: Path) -> dict:
    """Elastic Reset (EMA every step, reset every 2 of 5 steps, kl_anchor "ema" with a sharded
    reference) on the shards and on the plain model, driven by OnDARE steps: the parameters
    whose gathered weights, EMA or reference differ from the plain run's."""
    sft = load_file(root / "sft.safetensors")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    models = {k: build(sft, torch.float32) for k in ("sharded", "plain", "ref_s", "ref_p")}
    for key in ("sharded", "ref_s"):
        fully_shard(models[key].proj, mesh=mesh)
        fully_shard(models[key], mesh=mesh)
    kw = dict(mode="ondare", reserve_p=0.5, alpha=1e-2, lr=1e-2, seed=3)
    ids = torch.arange(6 * 5).reshape(6, 5) * 37 % 259
    with CheckpointTaskVectors(str(root / "base"), str(root / "sft")) as tv:
        opts = {
            k: OnlineMergingAdamW(models[k].named_parameters(), tv, **kw)
            for k in ("sharded", "plain")
        }
    cbs = {}
    for key, ref in (("sharded", "ref_s"), ("plain", "ref_p")):
        cbs[key] = ElasticResetCallback(
            root / "sft",
            ema_decay=0.7,
            reset_every=2,
            kl_anchor="ema",
            keep_init_on_cpu=key == "plain",
        )
        cbs[key].attach(models[key])
        cbs[key].bind_reference(models[ref])
    params = dict(models["plain"].named_parameters())
    for step in range(1, 6):
        models["sharded"](ids).backward()
        for name, p in models["sharded"].named_parameters():
            params[name].grad = p.grad.full_tensor()
        for key in ("sharded", "plain"):
            opts[key].step()
            opts[key].zero_grad()
            cbs[key].on_step(models[key], opts[key], step)
    refs = {k: dict(models[k].named_parameters()) for k in ("ref_s", "ref_p")}
    differ = []
    for name, p in models["sharded"].named_parameters():
        pairs = {
            "weights": (p, params[name]),
            "ema": (cbs["sharded"].ema[name], cbs["plain"].ema[name]),
            "reference": (refs["ref_s"][name], refs["ref_p"][name]),
        }
        for what, (a, b) in pairs.items():
            if not torch.equal(a.detach().full_tensor(), b.detach()):
                differ.append(f"{what} {name}")
    ema_local = cbs["sharded"].ema["emb.weight"].to_local().shape[0]
    return {"differ": differ, "resets": cbs["sharded"].num_resets, "ema_rows": ema_local}


def run_resume(root: Path, mode: str, dtype: torch.dtype, merge_every: int) -> list[str]:
    """5 sharded steps in one go, against 2 steps, a `torch.distributed.checkpoint` save of
    the model and optimizer (sharded), a fresh model and optimizer loading it, and 3 more steps
    (a merge_every cycle open across the save), both flushed: the parameters that differ."""
    sft = load_file(root / "sft.safetensors")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw = dict(
        mode=mode, reserve_p=0.1, alpha=1e-2, lr=1e-2, weight_decay=0.1, merge_every=merge_every
    )
    ids = torch.arange(6 * 5).reshape(6, 5) * 37 % 259

    def fresh() -> tuple[Net, OnlineMergingAdamW]:
        net = build(sft, dtype)
        fully_shard(net.proj, mesh=mesh)
        fully_shard(net, mesh=mesh)
        with CheckpointTaskVectors(str(root / "base"), str(root / "sft")) as tv:
            return net, OnlineMergingAdamW(net.named_parameters(), tv, **kw)

    def steps(net: Net, opt: OnlineMergingAdamW, n: int) -> None:
        for _ in range(n):
            net(ids).backward()
            opt.step()
            opt.zero_grad()

    whole, whole_opt = fresh()
    steps(whole, whole_opt, 5)
    whole_opt.flush()
    first, first_opt = fresh()
    steps(first, first_opt, 2)
    ckpt = root / f"dcp-{mode}-{merge_every}-{dtype}"
    msd, osd = get_state_dict(first, first_opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    second, second_opt = fresh()
    msd, osd = get_state_dict(second, second_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(
        second, second_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    steps(second, second_opt, 3)
    second_opt.flush()
    got = dict(second.named_parameters())
    return [
        name
        for name, p in whole.named_parameters()
        if not torch.equal(p.detach().full_tensor(), got[name].detach().full_tensor())
    ]


def run_elastic_resume(root: Path) -> list[str]:
    """Elastic Reset (reset every 2) with OnDARE on shards: 5 steps in one go, against 3 steps,
    a save of the callback (its EMA through torch.distributed.checkpoint, sharded) and of the
    model and optimizer, fresh ones loading them, and 2 more steps: what differs (weights, EMA)."""
    sft = load_file(root / "sft.safetensors")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ids = torch.arange(6 * 5).reshape(6, 5) * 37 % 259

    def fresh() -> tuple[Net, OnlineMergingAdamW, ElasticResetCallback]:
        net = build(sft, torch.float32)
        fully_shard(net.proj, mesh=mesh)
        fully_shard(net, mesh=mesh)
        with CheckpointTaskVectors(str(root / "base"), str(root / "sft")) as tv:
            opt = OnlineMergingAdamW(net.named_parameters(), tv, reserve_p=0.5, alpha=1e-2, lr=1e-2)
        cb = ElasticResetCallback(root / "sft", ema_decay=0.7, reset_every=2)
        cb.attach(net)
        return net, opt, cb

    def steps(net: Net, opt: OnlineMergingAdamW, cb: ElasticResetCallback, at: range) -> None:
        for step in at:
            net(ids).backward()
            opt.step()
            opt.zero_grad()
            cb.on_step(net, opt, step)

    whole = fresh()
    steps(*whole, range(1, 6))
    first = fresh()
    steps(*first, range(1, 4))
    ckpt = root / "elastic-resume"
    first[2].save(ckpt)
    msd, osd = get_state_dict(first[0], first[1])
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt / "trainer")
    second = fresh()
    msd, osd = get_state_dict(second[0], second[1])
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt / "trainer")
    set_state_dict(
        second[0], second[1], model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    second[2].load(ckpt)
    steps(*second, range(4, 6))
    got = dict(second[0].named_parameters())
    differ = []
    for name, p in whole[0].named_parameters():
        if not torch.equal(p.detach().full_tensor(), got[name].detach().full_tensor()):
            differ.append(f"weights {name}")
        if not torch.equal(whole[2].ema[name].full_tensor(), second[2].ema[name].full_tensor()):
            differ.append(f"ema {name}")
    if second[2].num_resets != 2:
        differ.append(f"resets {second[2].num_resets}")
    return differ


def check_reference_copy(root: Path) -> bool:
    """`copy_weights_` of a plain model into a sharded reference: each rank copies its rows, and
    the gathered reference equals the source."""
    sft = load_file(root / "sft.safetensors")
    source = build({k: v * 2 for k, v in sft.items()}, torch.float32)
    ref = build(sft, torch.float32)
    fully_shard(ref, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    copy_weights_(ref, source)
    want = dict(source.named_parameters())
    return all(torch.equal(p.full_tensor(), want[n]) for n, p in ref.named_parameters())


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = {"top_k_failures": check_top_k(), "elastic": run_elastic(root)}
    out["elastic_resume"] = run_elastic_resume(root)
    out["reference_copy"] = check_reference_copy(root)
    out["resume"] = {
        f"{mode}-{dtype}-{k}": run_resume(root, mode, getattr(torch, dtype), k)
        for mode, dtype, k in (("ondare", "bfloat16", 3), ("onties", "float32", 1))
    }
    for mode, dtype, k in CASES:
        out[f"{mode}-{dtype}-{k}"] = run_case(root, mode, getattr(torch, dtype), k)
    (root / f"rank-{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
