"""Input fingerprints: hashed in a background thread while the output is written, recorded in
every shard exactly as a direct hash would give, and a failed hash leaves no output."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mergekit_rl import ops
from mergekit_rl.engine import RunOptions
from mergekit_rl.errors import RunError
from mergekit_rl.io import reference
from mergekit_rl.io.reference import fingerprint, resolve
from tests.conftest import load_state

QUIET = ops.WriteOptions(run=RunOptions(progress="none"), command="rlmerge test")


@pytest.fixture(autouse=True)
def _fresh_hashes() -> Iterator[None]:
    """Each test hashes its inputs itself (fingerprints are cached per file state)."""
    reference._fingerprint_future.cache_clear()
    yield
    reference._fingerprint_future.cache_clear()


def naive_fingerprint(
    files: Sequence[Path], whole: int, blocks: int = 64, block: int = 2**20
) -> str:
    """The documented fingerprint, written out independently: name, size, then the whole file
    (up to `whole` bytes) or `blocks` evenly spaced blocks of `block` bytes."""
    h = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        if len(data) <= whole:
            h.update(data)
            continue
        step = (len(data) - block) // (blocks - 1)
        for i in range(blocks):
            h.update(data[i * step : i * step + block])
    return "sha256:" + h.hexdigest()


def recorded(out: Path) -> list[str]:
    """The fingerprints in every shard of an output (all shards must agree)."""
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    records = set()
    for f in files:
        with safe_open(f, "pt") as g:
            records.add(g.metadata()["rlmerge_inputs"])
    assert len(records) == 1, records
    return [r["fingerprint"] for r in json.loads(records.pop())]


def test_whole_and_sampled_fingerprints_match_the_naive_hash(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = resolve(family["sft1"])
    assert fingerprint(src) == naive_fingerprint(src.weight_files, 64 * 2**20)
    # files over the whole-file size: sampled blocks (both sizes lowered to fit a tiny model)
    monkeypatch.setattr(reference, "FINGERPRINT_WHOLE", 4096)
    monkeypatch.setattr(reference, "FINGERPRINT_BLOCK", 1000)
    reference._fingerprint_future.cache_clear()
    sampled = fingerprint(src)
    assert sampled == naive_fingerprint(src.weight_files, 4096, 64, 1000)
    assert sampled != naive_fingerprint(src.weight_files, 64 * 2**20)


def test_hashing_overlaps_the_write_and_records_the_same_fingerprint(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash waits until the output's first shard is on disk: it can finish only when it
    runs beside the write (a hash before the run times out and fails it)."""
    real = reference._hash_files
    out = tmp_path / "soup"

    def after_first_shard(files: Sequence[Path]) -> str:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(f".{out.name}.rlmerge-tmp-*/*.safetensors")):
            if time.monotonic() > deadline:
                raise TimeoutError("the output was not being written while hashing")
            time.sleep(0.01)
        return real(files)

    monkeypatch.setattr(reference, "_hash_files", after_first_shard)
    models = [family["sft1"], family["sft2"], family["rlhf"]]
    ops.soup(models, out, opts=QUIET)
    want = [naive_fingerprint(resolve(m).weight_files, 64 * 2**20) for m in models]
    assert recorded(out) == want
    model = AutoModelForCausalLM.from_pretrained(out)  # the rewritten header loads
    state = load_state(out)
    for k, v in model.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k].to(v.dtype)), k


def test_sharded_and_single_file_outputs_record_the_fingerprints(
    family: dict[str, Path], tmp_path: Path
) -> None:
    opts = ops.WriteOptions(run=RunOptions(progress="none", max_shard_size=20_000), command="x")
    ops.soup([family["sft1"], family["sft2"]], tmp_path / "sharded", opts=opts)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    tv = tmp_path / "tau.safetensors"
    ops.extract_task_vector(family["base"], family["rlhf"], tv, opts=QUIET)
    sft = [fingerprint(resolve(family[k])) for k in ("sft1", "sft2")]
    assert recorded(tmp_path / "sharded") == sft
    assert recorded(tv) == [fingerprint(resolve(family[k])) for k in ("base", "rlhf")]


def test_a_failing_hash_fails_the_run_and_leaves_nothing(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(files: Sequence[Path]) -> str:
        raise OSError(5, "Input/output error", str(files[0]))

    monkeypatch.setattr(reference, "_hash_files", unreadable)
    out = tmp_path / "out" / "soup"
    with pytest.raises(RunError, match=r"hashing the input '.*sft1' .*Input/output error"):
        ops.soup([family["sft1"], family["sft2"]], out, opts=QUIET)
    assert list((tmp_path / "out").iterdir()) == []  # no output, temp folder or lock
    res = CliRunner().invoke(
        app, ["soup", str(family["sft1"]), str(family["sft2"]), "-o", str(out)]
    )
    assert res.exit_code == 1 and "hashing the input" in res.stderr
    assert list((tmp_path / "out").iterdir()) == []
