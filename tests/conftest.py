"""Shared fixtures: isolation from the user's machine and tiny model families built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_rl.tiny import build_family


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network, no user cache, no telemetry, no CI progress bars."""
    hf_home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, sft1, sft2, rlhf: tiny float32 Llama checkpoints with an untied lm_head."""
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same family in bfloat16 with tied embeddings (no lm_head.weight stored)."""
    return build_family(tmp_path_factory.mktemp("tied"), tie=True, dtype=torch.bfloat16, seed=7)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A full state dict (the naive in-memory reference), from one file or all shards."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_states_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=atol, rtol=1e-6, msg=k)
