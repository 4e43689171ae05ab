"""`rlmerge train` under `accelerate launch`, plus a dump of every rank's parameters (test_ddp).

    python -m accelerate.commands.launch --num_processes 2 --cpu -m tests.train.ddp_worker \
        RECIPE.yaml DUMP_DIR [--resume]

Runs exactly what the command runs (`mergekit_rl.train.run.train`) with one extra callback: at
the end of training each rank saves its own parameters to DUMP_DIR/rank-<i>.safetensors and its
world size, backend and how many parameters are FSDP2 shards to DUMP_DIR/rank-<i>.json, so the test can compare
replicas bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback


class DumpRank(TrainerCallback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        from torch.distributed.tensor import DTensor

        rank = args.process_index
        named = list(model.named_parameters())
        sharded = [n for n, p in named if isinstance(p, DTensor)]  # FSDP2 parameters
        # a sharded parameter is gathered (a collective: every rank runs this callback)
        params = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
            for n, p in named
        }
        save_file(params, self.out / f"rank-{rank}.safetensors")
        dist = torch.distributed
        info = {
            "world_size": args.world_size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "global_step": state.global_step,
            "model_class": type(model).__name__,
            "sharded_parameters": len(sharded),
        }
        (self.out / f"rank-{rank}.json").write_text(json.dumps(info))


def main(argv: list[str]) -> None:
    from mergekit_rl.train.recipe import read_train_recipe
    from mergekit_rl.train.run import TrainOptions, train

    recipe_path, dump = argv[0], Path(argv[1])
    dump.mkdir(parents=True, exist_ok=True)
    recipe, text = read_train_recipe(recipe_path)
    opts = TrainOptions(
        resume="--resume" in argv,
        echo=lambda s: None,
        callbacks=[DumpRank(dump)],
        command=f"rlmerge train {recipe_path}",
    )
    train(recipe, text, opts)


if __name__ == "__main__":
    main(sys.argv[1:])
