"""The memory plan: its arithmetic against measured peak memory on the CPU, parameter counts of
published models from config.json alone, sharding, and the dry run that prints it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_rl.train.memory import (
    GIB,
    PlanSettings,
    local_numel,
    memory_plan,
    model_shapes,
    read_config,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "recipes" / "train" / "plans" / "models"
PLAN_RECIPE = ROOT / "recipes" / "train" / "plans" / "dpo-ondare-llama-3.1-8b.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("optimizer", "sequences", "tokens"),
    [("ondare", 4, 128), ("onties", 8, 128), ("adamw", 2, 64)],
)
def test_plan_is_within_20_percent_of_the_measured_peak(
    optimizer: str, sequences: int, tokens: int
) -> None:
    """A 19.8M-parameter Llama trains 3 steps on the CPU in float32 in a fresh process; its peak
    resident memory above the baseline is within 20% of the plan's peak."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "tests.train.memory_worker",
        optimizer,
        str(sequences),
        str(tokens),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.8 <= got["plan"] / got["measured"] <= 1.2, got


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("qwen2.5-7b", 7_615_616_512),
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.1-70b", 70_553_706_496),
    ],
)
def test_published_parameter_counts_from_config_alone(name: str, params: int) -> None:
    """The configs in recipes/train/plans/models (no weights) give the published models'
    parameter counts (tied embeddings counted once)."""
    shapes, _ = model_shapes(read_config(MODELS / name))
    assert sum(math.prod(s) for s in shapes.values()) == params


def test_full_sharding_divides_by_the_process_count() -> None:
    """FSDP2's rank 0 holds ceil(rows / W) rows (259 rows over 2: 130); the sharded items are
    about 1/8 of the single process's on 8 processes, the activations are not."""
    assert local_numel((259, 16), 2, True) == 130 * 16
    assert local_numel((259, 16), 2, False) == 259 * 16
    assert local_numel((1, 7), 8, True) == 7
    shapes, arch = model_shapes(read_config(MODELS / "llama-3.1-8b"))
    one = memory_plan(shapes, arch, PlanSettings(optimizer="ondare", reference=True))
    eight = memory_plan(
        shapes, arch, PlanSettings(optimizer="ondare", reference=True, processes=8, sharded=True)
    )
    for item in ("parameters", "gradients", "Adam moments", "reference model"):
        assert one.items[item] / 8 <= eight.items[item] < one.items[item] / 8 * 1.01, item
    assert eight.items["activations"] == one.items["activations"]
    assert eight.items["FSDP buffers"] > 0 == one.items["FSDP buffers"]
    # bf16 8.03B parameters: 2 + 2 bytes, 8 bytes of float32 moments
    assert one.items["parameters"] == 2 * 8_030_261_248
    assert one.items["Adam moments"] == 8 * 8_030_261_248


@pytest.mark.slow
def test_dry_run_prints_the_plan_from_a_config_only_model() -> None:
    """The plan recipe's policy and base hold a config.json alone: the dry run validates,
    prints the plan per process and what fits; --json carries the same numbers."""
    cmd = [sys.executable, "-m", "mergekit_rl.cli.app", "train", str(PLAN_RECIPE), "--dry-run"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith("# ")]
    lines = lines[[i for i, x in enumerate(lines) if "parameters," in x][0] :]  # the plan
    assert "8.03B parameters, bfloat16, 1 process" in lines[0]
    for item in ("parameters", "gradients", "Adam moments", "tau", "EMA", "reference model"):
        assert any(x.split()[1:2] == item.split()[:1] for x in lines[1:]), item
    assert "141 GB fits" in lines[-1] and "80 GB does not fit" in lines[-1]
    res = subprocess.run(
        [*cmd, "--processes", "8", "--fsdp", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    memory = json.loads(res.stdout)["memory"]
    assert memory["processes"] == 8 and memory["fsdp"] is True
    assert memory["fits_gb"] == {"24": False, "40": True, "80": True, "141": True}
    assert memory["bytes"]["Adam moments"] < 8 * GIB
