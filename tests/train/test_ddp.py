"""Two-process DDP training on the CPU (gloo), launched the way users launch it:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m mergekit_rl.cli.app train R

(`--multi_gpu` starts torchrun's processes; on a machine without GPUs each trains on the CPU and
they talk over gloo. `--cpu` would not do: accelerate then starts a single process, since its
multi-CPU mode needs mpirun; test_cpu_flag_runs_one_process pins that down.)

For DPO+OnDARE, DPO+OnTIES and GRPO+Elastic Reset on the tiny family: after N steps both ranks hold
bit-identical parameters, DPO equals a 1-process run with the same global batch (to float
tolerance), only rank 0 writes, and --resume under DDP ends where the uninterrupted run ended.
Each launch costs about 25 s on 2 cores, so every run is made once (module fixtures).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from mergekit_rl.tiny import build_family
from mergekit_rl.train.recipe import parse_train_recipe
from mergekit_rl.train.run import TrainOptions, train
from tests.conftest import load_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
]
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "recipes" / "train" / "data"
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    module_args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `-m MODULE ARGS` in 2 CPU processes with accelerate; fail with its output."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *module_args,
    ]  # fmt: skip
    # CPU ranks even where a GPU exists: two ranks cannot share one GPU under NCCL
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    res = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def gloo_ranks(module: str, *args: str) -> list[dict]:
    """Run `-m MODULE ARGS` in 2 CPU processes with torch.distributed.run (FSDP2 over gloo:
    accelerate enables FSDP only with GPUs); each rank writes ARGS[-1]/rank-R.json, returned
    in rank order."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", module, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]
    return [json.loads((Path(args[-1]) / f"rank-{r}.json").read_text()) for r in (0, 1)]


def dpo_doc(fam: dict[str, Path], out: Path, opt: str, batch: int) -> dict:
    """4 preference pairs; a global batch of 4 makes every step see all of them (any order)."""
    return {
        "algorithm": "dpo",
        "policy": str(fam["sft1"]),
        "base": str(fam["base"]),
        "optimizer": {"name": opt, "reserve_p": 0.5, "alpha": 1e-3} if opt != "adamw" else {},
        "dataset": {"path": str(DATA / "prefs.jsonl"), "max_examples": 4},
        "training": {
            "output_dir": str(out),
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "max_steps": STEPS,
            "batch_size": batch,
            "max_length": 48,
            "save_steps": 2,
        },
    }


def grpo_doc(fam: dict[str, Path], out: Path) -> dict:
    return {
        "algorithm": "grpo",
        "policy": str(fam["sft1"]),
        "elastic_reset": {"ema_decay": 0.5, "reset_every": 2},
        "dataset": {"path": str(DATA / "prompts.jsonl"), "max_examples": 4},
        # rewards that differ between completions, so advantages (and updates) are not zero
        "reward": {
            "keyword": {"words": ["the", "a", "model", "policy", "reward", "to"], "mode": "count"},
            "regex": {"pattern": "[aeiou]{2}"},
        },
        "training": {
            "output_dir": str(out),
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "max_steps": STEPS,
            "batch_size": 4,
            "num_generations": 4,
            "max_completion_length": 8,
            "beta": 0.04,
            "save_steps": 2,
        },
    }


def write(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def ranks(dump: Path) -> list[dict[str, torch.Tensor]]:
    return [load_state(dump / f"rank-{r}.safetensors") for r in (0, 1)]


def steps_logged(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("ddp-family"))


def ddp_run(tmp: Path, doc: dict) -> Path:
    recipe = write(doc, tmp / "recipe.yaml")
    launch(["-m", "tests.train.ddp_worker", str(recipe), str(tmp / "dump")])
    return Path(doc["training"]["output_dir"])


@pytest.fixture(scope="module")
def dpo_ondare(fam: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp-ondare")
    ddp_run(tmp, dpo_doc(fam, tmp / "run", "ondare", batch=2))
    return tmp


@pytest.fixture(scope="module")
def dpo_onties(fam: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp-onties")
    doc = dpo_doc(fam, tmp / "run", "onties", batch=2)
    doc["reference"] = {"soup": [str(fam["sft1"]), str(fam["sft2"])]}  # SALSA, built once
    ddp_run(tmp, doc)
    return tmp


def one_process(fam: dict[str, Path], tmp: Path, opt: str) -> dict[str, torch.Tensor]:
    """The same recipe in this process with the global batch (2 ranks x 2) on one device."""
    text = yaml.safe_dump(dpo_doc(fam, tmp / "single", opt, batch=4))
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    return load_state(tmp / "single" / "final")


# -- DPO + OnDARE ------------------------------------------------------------------------------


def test_dpo_ondare_ran_on_two_gloo_ranks(dpo_ondare: Path) -> None:
    for r in (0, 1):
        info = json.loads((dpo_ondare / "dump" / f"rank-{r}.json").read_text())
        assert info == {
            "world_size": 2,
            "backend": "gloo",
            "global_step": STEPS,
            "model_class": "LlamaForCausalLM",
            "sharded_parameters": 0,
        }


def test_dpo_ondare_ranks_bit_identical(dpo_ondare: Path) -> None:
    r0, r1 = ranks(dpo_ondare / "dump")
    assert set(r0) == set(r1)
    differ = [n for n in r0 if not torch.equal(r0[n], r1[n])]
    assert not differ, f"ranks diverged in {len(differ)} tensors, e.g. {differ[:3]}"


def test_dpo_ondare_equals_one_process_run(dpo_ondare: Path, fam: dict[str, Path]) -> None:
    single = one_process(fam, dpo_ondare, "ondare")
    final = load_state(dpo_ondare / "run" / "final")
    start = load_state(fam["sft1"])
    assert set(final) == set(single)
    assert any((final[k] - start[k]).abs().max() > 1e-3 for k in start)  # it trained
    for k in single:
        torch.testing.assert_close(final[k], single[k], atol=2e-5, rtol=1e-4, msg=k)


def test_only_rank_zero_writes(dpo_ondare: Path) -> None:
    out = dpo_ondare / "run"
    assert steps_logged(out) == list(range(1, STEPS + 1))  # one line per step, not two
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # TRL's model card of the run
        "checkpoint-2",
        "checkpoint-4",
        "final",
        "metrics.jsonl",
    ]
    final = {p.name for p in (out / "final").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= final
    assert "rlmerge_recipe.yaml" in final
    # no second writer's leftovers: no temporary folders, no second final
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name]


# -- DPO + OnTIES, and --resume through the command line ---------------------------------------


def test_dpo_onties_ranks_bit_identical(dpo_onties: Path, fam: dict[str, Path]) -> None:
    r0, r1 = ranks(dpo_onties / "dump")
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    final = load_state(dpo_onties / "run" / "final")  # what rank 0 wrote is what both hold
    for n in r0:
        assert torch.equal(final[n], r0[n]), n


def test_soup_reference_built_once_under_ddp(dpo_onties: Path, fam: dict[str, Path]) -> None:
    out = dpo_onties / "run"
    soup = load_state(out / "reference")
    a, b = load_state(fam["sft1"]), load_state(fam["sft2"])
    for k in a:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, atol=1e-6, rtol=1e-6, msg=k)
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name]


def test_resume_under_ddp_through_the_command(dpo_onties: Path) -> None:
    """Kill the run after step 2 (drop checkpoint-4 and final), resume with the real command."""
    out = dpo_onties / "run"
    full = load_state(out / "final")
    resumed_dir = dpo_onties / "resumed"
    shutil.copytree(out, resumed_dir, ignore=shutil.ignore_patterns("checkpoint-4", "final"))
    doc = yaml.safe_load((dpo_onties / "recipe.yaml").read_text())
    doc["training"]["output_dir"] = str(resumed_dir)
    recipe = write(doc, dpo_onties / "resume.yaml")
    res = launch(["-m", "mergekit_rl.cli.app", "train", str(recipe), "--resume"])
    resumed = load_state(resumed_dir / "final")
    # one process prints: each resumed step's progress line once, the summary once
    shown = [x.split(":")[0] for x in res.stderr.splitlines() if x.startswith("step ")]
    assert shown == [f"step {i}/{STEPS}" for i in range(3, STEPS + 1)], res.stderr[-3000:]
    assert sum(x.startswith("trained ") for x in res.stderr.splitlines()) == 1
    assert set(resumed) == set(full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5, msg=k)
    assert steps_logged(resumed_dir) == list(range(1, STEPS + 1))


# -- GRPO + Elastic Reset ------------------------------------------------------------------------


def test_grpo_elastic_reset_ranks_bit_identical(
    fam: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("ddp-grpo")
    out = ddp_run(tmp, grpo_doc(fam, tmp / "run"))
    r0, r1 = ranks(tmp / "dump")
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resets = [m["elastic/num_resets"] for m in logged if "loss" in m]
    assert resets == [0, 1, 1, 2]  # reset_every: 2, on both ranks alike (else they would differ)
    # the EMA state saved with the checkpoints is rank 0's, once
    assert (out / "checkpoint-4" / "elastic_reset.safetensors").is_file()
    start = load_state(fam["sft1"])
    assert any(not torch.equal(r0[k], start[k]) for k in start if k in r0)


# -- what makes ranks agree beyond CPU DDP ---------------------------------------------------


def test_ondare_masks_do_not_depend_on_the_other_parameters_a_rank_holds() -> None:
    """Under FSDP each rank's optimizer holds other shards, and on GPUs another device (cuda:0,
    cuda:1): the fresh per-step OnDARE mask of a parameter must depend only on (seed, parameter
    name, step), not on what else the optimizer draws masks for. Here one optimizer holds two
    parameters and the other only the second; the second must get the same update in both."""
    from mergekit_rl.train.optim import OnlineMergingAdamW

    def run(names: list[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        params = {n: torch.nn.Parameter(torch.randn(64, 32, generator=g)) for n in ("a", "b")}
        grads = {n: torch.randn(64, 32, generator=g) for n in ("a", "b")}
        tau = {n: torch.zeros(64, 32) for n in names}
        opt = OnlineMergingAdamW(
            [(n, params[n]) for n in names], tau, lr=1e-2, mode="ondare", reserve_p=0.5, seed=3
        )
        for _ in range(2):
            for n in names:
                params[n].grad = grads[n].clone()
            opt.step()
        return params["b"].detach().clone()

    torch.testing.assert_close(run(["a", "b"]), run(["b"]), atol=0, rtol=0)


# -- FSDP2 --------------------------------------------------------------------------------------


def test_fsdp2_fully_shard_trains_on_gloo_like_one_process(
    fam: dict[str, Path], tmp_path: Path
) -> None:
    """The installed torch runs FSDP2 on CPU processes over gloo: every parameter becomes a
    DTensor holding half the rows on each rank, and 3 sharded AdamW steps give the same weights
    as the unsharded model (float tolerance)."""
    infos = gloo_ranks("tests.train.fsdp2_worker", str(fam["sft1"]), str(tmp_path))
    assert all(i["backend"] == "gloo" and i["dtensor"] for i in infos)
    name = "model.layers.0.mlp.up_proj.weight"  # [128, 64]: 64 rows on each rank
    assert infos[0]["local_shapes"][name] == infos[1]["local_shapes"][name] == [64, 64]
    fsdp, single = (
        load_state(tmp_path / "fsdp.safetensors"),
        load_state(tmp_path / "single.safetensors"),
    )
    start = load_state(fam["sft1"])
    assert any(not torch.allclose(fsdp[k], start[k]) for k in start)  # it trained
    for k in single:
        torch.testing.assert_close(fsdp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_refuses_only_what_shards_cannot_run(
    fam: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under accelerate's FSDP, OnDARE, OnTIES, Elastic Reset and plain AdamW pass the check
    (they run on FSDP2 shards: tests/train/test_fsdp_optim.py); OnTIES' tau_l1_rescale, which
    needs whole-tensor norms, stops with its recipe key named (exit 2) before any model loads."""
    from mergekit_rl.errors import UsageError
    from mergekit_rl.train.run import check_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for opt in ("ondare", "onties", "adamw"):
        check_fsdp(parse_train_recipe(yaml.safe_dump(dpo_doc(fam, tmp_path, opt, 2)), "r.yaml"))
    check_fsdp(parse_train_recipe(yaml.safe_dump(grpo_doc(fam, tmp_path / "g")), "g.yaml"))
    doc = dpo_doc(fam, tmp_path / "l1", "onties", batch=2)
    doc["optimizer"]["tau_l1_rescale"] = True
    text = yaml.safe_dump(doc)
    with pytest.raises(UsageError, match="optimizer.tau_l1_rescale .with FSDP"):
        train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    assert not (tmp_path / "l1").exists()
