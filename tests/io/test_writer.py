from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_rl.errors import OutputExistsError, RunError
from mergekit_rl.io.reference import resolve
from mergekit_rl.io.writer import CheckpointWriter, Deferred, check_output_path, plan_shards
from tests.conftest import load_state

TENSORS = {
    f"layers.{i}.w": torch.randn(10, 10, generator=torch.Generator().manual_seed(i))
    for i in range(5)
}
ENTRIES = [(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]


def test_plan_shards_is_greedy_and_bounded() -> None:
    shards = plan_shards(ENTRIES, max_shard_size=900)  # 400 bytes per tensor: 2 per shard
    assert [len(s.entries) for s in shards] == [2, 2, 1]
    assert [s.filename for s in shards][0] == "model-00001-of-00003.safetensors"
    assert plan_shards(ENTRIES, 10)[0].entries == (ENTRIES[0],)  # oversize tensor: own shard
    assert plan_shards(ENTRIES)[0].filename == "model.safetensors"


def test_sharded_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(
        out, ENTRIES, metadata={"format": "pt", "k": "v"}, max_shard_size=900
    ) as w:
        for k, v in TENSORS.items():
            w.add(k, v)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert set(index["weight_map"].values()) == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    }
    got = load_state(out)  # read back with the reference safetensors library
    assert all(torch.equal(got[k], v) for k, v in TENSORS.items())
    with safe_open(out / "model-00002-of-00003.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    assert not list(tmp_path.glob(".*rlmerge-tmp*"))


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(out, ENTRIES, max_shard_size=900) as w:
        for i, (k, v) in enumerate(TENSORS.items()):
            if i == 3:
                raise KeyboardInterrupt
            w.add(k, v)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_is_not_committed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RunError, match="never written"), CheckpointWriter(out, ENTRIES) as w:
        w.add("layers.0.w", TENSORS["layers.0.w"])
    assert not out.exists()


def test_wrong_order_or_shape_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(RunError, match="expected tensor 'layers.0.w'"),
        CheckpointWriter(tmp_path / "o", ENTRIES) as w,
    ):
        w.add("layers.1.w", TENSORS["layers.1.w"])
    assert not (tmp_path / "o").exists()


def test_force_replaces_and_refuses_without(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with CheckpointWriter(out, ENTRIES[:1], force=True) as w:
        w.add(*next(iter(TENSORS.items())))
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(OutputExistsError, match="--force"):
        check_output_path(out, [], force=False)


def test_output_overlapping_an_input_is_always_refused(family: dict[str, Path]) -> None:
    src = resolve(family["sft1"])
    for bad in (family["sft1"], family["sft1"] / "sub", family["sft1"].parent):
        with pytest.raises(OutputExistsError, match="input"):
            check_output_path(bad, [src], force=True)
    check_output_path(family["sft1"].parent / "elsewhere", [src], force=False)


def test_single_file_output(tmp_path: Path) -> None:
    out = tmp_path / "tau.safetensors"
    with CheckpointWriter(out, ENTRIES, single_file=True, max_shard_size=10) as w:
        for k, v in TENSORS.items():
            w.add(k, v)
    assert out.is_file() and torch.equal(load_state(out)["layers.4.w"], TENSORS["layers.4.w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.safetensors"]


def test_bfloat16_and_empty_tensors(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 2).bfloat16(), "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5)}
    with CheckpointWriter(
        tmp_path / "o", [(k, tuple(v.shape), v.dtype) for k, v in t.items()]
    ) as w:
        for k, v in t.items():
            w.add(k, v)
    got = load_state(tmp_path / "o")
    assert all(torch.equal(got[k], v) for k, v in t.items())


def _deferred_write(out: Path, value, **kw) -> None:  # noqa: ANN001 - a callable or str
    late = Deferred("x" * 12, value if callable(value) else lambda: value)
    with CheckpointWriter(out, ENTRIES, metadata={"format": "pt", "late": late}, **kw) as w:
        for k, v in TENSORS.items():
            w.add(k, v)


@pytest.mark.parametrize("kw", [{"max_shard_size": 900}, {"single_file": True}])
def test_deferred_metadata_is_written_over_its_placeholder(tmp_path: Path, kw: dict) -> None:
    """Headers go out with the placeholder; the commit writes the value in place (same length),
    so every shard parses with the reference library and holds the final value."""
    out = tmp_path / ("out.safetensors" if kw.get("single_file") else "out")
    _deferred_write(out, "sha256:abcde", **kw)
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    assert len(files) == (1 if out.is_file() else 3)
    for f in files:
        with safe_open(f, "pt") as g:
            assert g.metadata() == {"format": "pt", "late": "sha256:abcde"}
    got = load_state(out)
    assert all(torch.equal(got[k], v) for k, v in TENSORS.items())


def test_failing_deferred_value_leaves_nothing(tmp_path: Path) -> None:
    def fail() -> str:
        raise RunError("hashing the input 'x' failed")

    with pytest.raises(RunError, match="hashing the input 'x' failed"):
        _deferred_write(tmp_path / "out", fail, max_shard_size=900)
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir, no lock


def test_deferred_value_of_another_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="internal: the final header"):
        _deferred_write(tmp_path / "out", "sha256:" + "a" * 20)  # 15 bytes longer
    assert list(tmp_path.iterdir()) == []
