"""SIGTERM during `rlmerge train` (a real signal to a subprocess): a resumable checkpoint is
saved and the run exits 130; `--resume` from it ends with the weights of an uninterrupted run
(OnDARE's optimizer state with tau, Elastic Reset's EMA, scheduler, RNG and data position
all restored)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_rl.train.recipe import parse_train_recipe
from mergekit_rl.train.run import TrainOptions, train
from tests.conftest import load_state
from tests.faults.harness import RLMERGE
from tests.train.test_run import dpo_text

STEPS = 4


def recipe(family: dict[str, Path], out: Path) -> str:
    doc = yaml.safe_load(dpo_text(family, out, max_steps=STEPS, save_steps=None))
    doc["elastic_reset"] = {"ema_decay": 0.5, "reset_every": 2}
    return yaml.safe_dump(doc)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x)["step"] for x in lines if x.strip() and "loss" in json.loads(x)]


@pytest.mark.slow  # trains in a subprocess, twice
def test_sigterm_saves_a_checkpoint_and_resume_equals_uninterrupted(
    family: dict[str, Path], tmp_path: Path
) -> None:
    text = recipe(family, tmp_path / "straight")
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    want = load_state(tmp_path / "straight" / "final")

    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(recipe(family, out))
    proc = subprocess.Popen([*RLMERGE, "train", str(path)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not logged_steps(out) and time.monotonic() < deadline:
        time.sleep(0.02)  # step 1 is done: the signal lands in a later step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    (ckpt,) = out.glob("checkpoint-*")  # save_steps is off: this one is the signal's
    stopped = int(ckpt.name.split("-")[1])
    assert 1 <= stopped < STEPS and "SIGTERM" in err and str(ckpt) in err, err
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "elastic_reset.safetensors").is_file()
    assert not (out / "final").exists()

    text = path.read_text()  # resumed in this process: one interpreter start less
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None, resume=True))
    got = load_state(out / "final")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert logged_steps(out) == list(range(1, STEPS + 1))
