"""Task vectors read row by row (a sharded run's reads) equal the whole tensor's rows."""

from __future__ import annotations

from pathlib import Path

import torch

from mergekit_rl.train.taskvec import CheckpointTaskVectors, find_task_vector_rows
from tests.io.test_adapter import make_adapter


def test_rows_of_a_base_plus_adapter_task_vector_equal_the_whole_one(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """tau = (base + adapter) - base, read in row ranges of every size (the adapter's update
    merged into just those rows), concatenates to the whole tau bit for bit; a range past the
    last row is clipped."""
    make_adapter(family["base"], tmp_path / "lora", ["q_proj", "lm_head"])
    with CheckpointTaskVectors(
        str(family["base"]), f"{family['base']}+{tmp_path / 'lora'}", dtype=torch.float32
    ) as taus:
        for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
            whole = taus.get(name)
            assert whole is not None and whole.abs().max() > 0  # the adapter moved it
            rows = whole.shape[0]
            for step in (1, 3, rows):
                parts = [
                    find_task_vector_rows(taus, name, i, i + step) for i in range(0, rows, step)
                ]
                assert torch.equal(torch.cat(parts), whole), (name, step)
            past = find_task_vector_rows(taus, name, rows - 2, rows + 5)
            assert past is not None and torch.equal(past, whole[rows - 2 :])
