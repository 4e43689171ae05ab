"""The final model written from FSDP2 shards, streaming, against the gathered write
(test_shard_write).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.train.shard_write_worker DIR

DIR holds recipe files `CASE.yaml` (written by the test) whose policy is a bfloat16 tiny Llama
(259 vocabulary rows: 130 + 129 over 2 ranks). For each case every rank loads the policy in
float32, moves every weight by a small seeded amount (mostly less than a bfloat16 ulp, so the
stochastic rounding of the write decides), keeps an unsharded copy, shards the model per decoder
layer with `fully_shard`, and writes it with `stream_full_tensors` to DIR/CASE/sharded (rank 0
writes, rank 1 only gathers; the tied case goes through `run.write_final`, as the trainer does).
Rank 0 also writes the unsharded copy through `run._write` (the DDP / one-process path) to
DIR/CASE/plain and saves its float32 weights to DIR/CASE/weights.safetensors. While streaming,
rank 0 counts the gathered tensors still alive at each gather and at each
`CheckpointWriter.add`. A last run puts a NaN into rank 1's rows of the embedding: both ranks
must stop with a RunError and nothing may appear at the output.
Writes DIR/rank-<r>.json.
"""

from __future__ import annotations

import copy
import json
import sys
import weakref
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from mergekit_rl.errors import RunError
from mergekit_rl.io.writer import CheckpointWriter
from mergekit_rl.train.recipe import parse_train_recipe
from mergekit_rl.train.run import (
    TrainOptions,
    _write,
    final_writer,
    unique_tensors,
    write_final,
)
from mergekit_rl.train.shard_write import sharded_state, stream_full_tensors

CASES = ("untied", "tied")
OPTS = TrainOptions(command="rlmerge train (shard write test)")


class GatherSpy:
    """Counts the tensors `DTensor.full_tensor` returned that are still alive: before each
    gather (the previous ones must be gone) and inside each `CheckpointWriter.add` (exactly the
    one being written)."""

    def __init__(self) -> None:
        self.alive: list[weakref.ref] = []
        self.gathers = 0
        self.live_at_gather: list[int] = []
        self.live_at_add: list[int] = []

    def live(self) -> int:
        return sum(r() is not None for r in self.alive)

    def install(self) -> None:
        full_tensor, add = DTensor.full_tensor, CheckpointWriter.add

        def spy_full(t: DTensor, *a: object, **k: object) -> torch.Tensor:
            self.live_at_gather.append(self.live())
            out = full_tensor(t, *a, **k)
            self.gathers += 1
            self.alive.append(weakref.ref(out))
            return out

        def spy_add(writer: CheckpointWriter, name: str, tensor: torch.Tensor) -> None:
            self.live_at_add.append(self.live())
            add(writer, name, tensor)

        DTensor.full_tensor, CheckpointWriter.add = spy_full, spy_add
        self.restore = lambda: (
            setattr(DTensor, "full_tensor", full_tensor),
            setattr(CheckpointWriter, "add", add),
        )


def trainer_of(model: torch.nn.Module) -> SimpleNamespace:
    """What `run.write_final` uses of a trainer under accelerate's FSDP2: the model (not
    wrapped), the main process flag and the barrier."""
    accelerator = SimpleNamespace(
        unwrap_model=lambda m: m,
        is_main_process=dist.get_rank() == 0,
        wait_for_everyone=dist.barrier,
    )
    return SimpleNamespace(model=model, accelerator=accelerator)


def load(recipe_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The policy in float32, every weight moved by 3e-4 * N(0, 1) (seeded), and a copy that
    stays unsharded."""
    recipe = parse_train_recipe(recipe_path.read_text(), str(recipe_path))
    model = AutoModelForCausalLM.from_pretrained(recipe.policy, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3e-4 * torch.randn(p.shape, generator=gen))
    plain = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, plain


def run_case(root: Path, case: str) -> dict:
    rank = dist.get_rank()
    recipe_path = root / f"{case}.yaml"
    text = recipe_path.read_text()
    recipe = parse_train_recipe(text, str(recipe_path))
    model, plain = load(recipe_path)
    state = sharded_state(model)
    out = root / case
    spy = GatherSpy()
    spy.install()
    try:
        if case == "tied":  # through run.write_final, as `rlmerge train` calls it
            write_final(trainer_of(model), recipe, text, out / "sharded", OPTS)
        else:
            sink = partial(final_writer, state, recipe, text, out / "sharded", OPTS)
            stream_full_tensors(state, sink if rank == 0 else None)
    finally:
        spy.restore()
    if rank == 0:
        _write(unique_tensors(plain.state_dict()), recipe, text, out / "plain", OPTS)
        weights = {n: t.contiguous() for n, t in unique_tensors(plain.state_dict()).items()}
        save_file(weights, out / "weights.safetensors")
    dist.barrier()
    return {
        "names": list(state),
        "dtensors": sum(isinstance(t, DTensor) for t in state.values()),
        "gathers": spy.gathers,
        "live_at_gather": spy.live_at_gather,
        "live_at_add": spy.live_at_add,
        "embed_rows": state["model.embed_tokens.weight"].to_local().shape[0],
    }


def run_nan(root: Path) -> dict:
    """A NaN in rank 1's rows of the embedding: rank 0 finds it in the gathered tensor."""
    recipe_path = root / "untied.yaml"
    text = recipe_path.read_text()
    recipe = parse_train_recipe(text, str(recipe_path))
    model, _ = load(recipe_path)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.model.embed_tokens.weight.to_local()[-1, 0] = float("nan")
    state = sharded_state(model)
    out = root / "nan"
    sink = partial(final_writer, state, recipe, text, out, OPTS)
    try:
        stream_full_tensors(state, sink if dist.get_rank() == 0 else None)
    except RunError as e:
        error = str(e)
    else:
        error = ""
    dist.barrier()
    return {"error": error, "output_exists": out.exists()}


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    result = {case: run_case(root, case) for case in CASES}
    result["nan"] = run_nan(root)
    (root / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
