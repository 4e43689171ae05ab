"""OnlineMergingAdamW on FSDP2 (`fully_shard`) shards: 2 CPU processes over gloo give the
unsharded optimizer's weights bit for bit, with about half the optimizer state per rank.

One launch of `tests.train.fsdp_optim_worker` (about 15 s on 2 cores) runs every case:
OnDARE and OnTIES, float32 and bfloat16 (stochastic rounding), merge_every 1 and 3, on shapes
that shard unevenly (259 and 7 rows over 2 ranks) and a one-row parameter that rank 1 holds
nothing of; the sharded exact top-k on tensors full of ties; Elastic Reset across two resets;
a resume through torch.distributed.checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tests.train.fsdp_optim_worker import CASES, Net
from tests.train.test_ddp import ROOT, free_port, gloo_ranks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("fsdp_optim")
    torch.manual_seed(1)
    base = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    sft = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    for name, sd in (("base", base), ("sft", sft)):
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
    save_file(sft, root / "sft.safetensors")
    return gloo_ranks("tests.train.fsdp_optim_worker", str(root))


def test_shards_are_uneven_and_one_is_empty(results: list[dict]) -> None:
    rows = [r[f"{CASES[0][0]}-{CASES[0][1]}-{CASES[0][2]}"]["local_rows"] for r in results]
    assert (rows[0]["emb.weight"], rows[1]["emb.weight"]) == (130, 129)
    assert (rows[0]["gate"], rows[1]["gate"]) == (1, 0)


@pytest.mark.parametrize("case", [f"{m}-{d}-{k}" for m, d, k in CASES])
def test_sharded_equals_unsharded_bit_for_bit(results: list[dict], case: str) -> None:
    """Every parameter gathered from the shards equals the unsharded run's after 4 steps and a
    flush; the weights did move (4270 entries in all; fewer in bf16, where some updates round
    away)."""
    for r in results:
        assert r[case]["differ"] == []
        assert r[case]["moved"] > 2000


@pytest.mark.parametrize("case", [f"{m}-{d}-{k}" for m, d, k in CASES])
def test_optimizer_state_per_rank_is_half(results: list[dict], case: str) -> None:
    """Measured bytes of moments, tau, its indices and the merge_every buffer on each rank:
    about 1/2 of the unsharded optimizer's (the rows split 130/129)."""
    for r in results:
        ratio = r[case]["state_bytes"] / r[case]["plain_state_bytes"]
        assert 0.45 < ratio < 0.55, ratio


def test_sharded_top_k_breaks_ties_by_global_index(results: list[dict]) -> None:
    assert results[0]["top_k_failures"] == results[1]["top_k_failures"] == []


def test_task_vector_rows_are_read_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's rows of tau come from positional reads of those rows of the base and SFT
    safetensors (whole-tensor reads are made to fail), equal to the rows of the whole tau; a
    range past a resized tensor's end is clipped."""
    from mergekit_rl.io.reader import Checkpoint
    from mergekit_rl.train.taskvec import CheckpointTaskVectors, find_task_vector_rows

    torch.manual_seed(2)
    base = {"w": torch.randn(11, 3), "b": torch.randn(5)}
    sft = {k: v + torch.randn_like(v) for k, v in base.items()}
    for name, sd in (("base", base), ("sft", sft)):
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    with CheckpointTaskVectors(str(tmp_path / "base"), str(tmp_path / "sft")) as tv:
        whole = {k: tv.get(k) for k in base}

        def no_whole_reads(*a: object, **k: object) -> None:
            raise AssertionError("read the whole tensor")

        monkeypatch.setattr(Checkpoint, "read", no_whole_reads)
        for name, (a, b) in (("w", (6, 11)), ("w", (0, 6)), ("b", (3, 8)), ("w", (11, 12))):
            rows = find_task_vector_rows(tv, f"module.{name}", a, b)
            assert torch.equal(rows, whole[name][a:b]), (name, a, b)
        assert find_task_vector_rows(tv, "missing", 0, 1) is None


def test_elastic_reset_sharded_equals_unsharded_across_resets(results: list[dict]) -> None:
    """5 OnDARE steps with Elastic Reset every 2 (two resets, kl_anchor "ema" with a sharded
    reference model): weights, EMA and reference gathered from the shards equal the plain run's
    bit for bit; theta_0 was read row-wise (the plain run holds it whole on the host); the EMA
    holds each rank's rows only."""
    for r, rows in zip(results, (130, 129), strict=True):
        assert r["elastic"] == {"differ": [], "resets": 2, "ema_rows": rows}


def test_dcp_resume_ends_where_the_uninterrupted_run_ends(results: list[dict]) -> None:
    """2 sharded steps, a torch.distributed.checkpoint save of model and optimizer (moments and
    the open merge_every cycle sharded; tau rebuilt from the task vectors, not saved), a fresh
    model and optimizer loading it, 3 more steps: the weights of 5 uninterrupted steps, bit for
    bit (OnDARE bf16 with merge_every 3, OnTIES float32)."""
    for r in results:
        assert r["resume"] == {"ondare-bfloat16-3": [], "onties-float32-1": []}


def test_elastic_reset_resume_through_dcp_continues_exactly(results: list[dict]) -> None:
    """3 steps (a reset at 2), the callback's sharded EMA saved with torch.distributed.checkpoint
    beside the model and optimizer, fresh ones loading them, 2 more steps (a reset at 4):
    weights and EMA equal 5 uninterrupted steps bit for bit."""
    for r in results:
        assert r["elastic_resume"] == []


def test_reference_weights_copy_into_a_sharded_reference(results: list[dict]) -> None:
    """A soup reference copied into the trainer's FSDP2-sharded reference (`copy_weights_`):
    each rank takes its rows; the gathered reference equals the soup."""
    assert results[0]["reference_copy"] is results[1]["reference_copy"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP only on GPUs")
def test_rlmerge_train_under_accelerate_fsdp2_resumes_exactly(tmp_path: Path) -> None:
    """`rlmerge train` through `accelerate launch --config_file
    recipes/train/accelerate/fsdp2.yaml` (one process per GPU): DPO with OnDARE and GRPO with
    Elastic Reset train 4 steps and write a final model; --resume from checkpoint-2 (sharded
    model, optimizer and EMA state through torch.distributed.checkpoint) ends where the
    uninterrupted run ended."""
    from mergekit_rl.tiny import build_family
    from tests.conftest import load_state
    from tests.train.test_ddp import dpo_doc, grpo_doc, write

    fam = build_family(tmp_path / "family")
    gpus = torch.cuda.device_count()
    for name, doc_of in (("dpo", lambda out: dpo_doc(fam, out, "ondare", 2)), ("grpo", None)):
        finals = []
        for run in ("whole", "resumed"):
            out = tmp_path / name / run
            doc = doc_of(out) if doc_of else grpo_doc(fam, out)
            recipe = write(doc, tmp_path / f"{name}-{run}.yaml")
            cmd = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(ROOT / "recipes/train/accelerate/fsdp2.yaml"),
                "--num_processes", str(gpus), "--main_process_port", str(free_port()),
                "-m", "mergekit_rl.cli.app", "train", str(recipe),
            ]  # fmt: skip
            if run == "resumed":  # stop after checkpoint-2, then resume to the end
                res = subprocess.run(
                    [*cmd, "--max-steps", "2"], cwd=ROOT, capture_output=True, text=True
                )
                assert res.returncode == 0, res.stderr[-6000:]
                cmd.append("--resume")
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            assert res.returncode == 0, res.stderr[-6000:]
            finals.append(load_state(out / "final"))
        whole, resumed = finals
        for key in whole:  # two GPU runs differ in the last bits (atomic adds in backward)
            torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=1e-5, msg=key)
