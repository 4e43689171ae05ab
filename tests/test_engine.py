"""The streaming engine: order, memory-relevant behaviour, multiple outputs, devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_rl.engine import (
    OutputSpec,
    RunOptions,
    TensorJob,
    identity_jobs,
    parse_dtype,
    run_jobs,
)
from mergekit_rl.errors import RunError, UsageError
from mergekit_rl.io.reader import open_checkpoint
from tests.conftest import load_state

QUIET = RunOptions(progress="none")


def _ckpt(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]):
    save_file(tensors, tmp_path / f"{name}.safetensors")
    return open_checkpoint(tmp_path / f"{name}.safetensors")


def test_jobs_follow_storage_order_and_integers_pass_through(tmp_path: Path) -> None:
    a = _ckpt(tmp_path, "a", {"w": torch.ones(4), "ids": torch.arange(3), "b": torch.zeros(2)})
    seen: list[str] = []

    def compute(job: TensorJob, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(job.name)
        assert all(x.dtype == torch.float32 for x in xs)
        return [xs[0] * 2, xs[0] * 3]

    jobs = identity_jobs(a, a.names(), 1)
    specs = [
        OutputSpec(tmp_path / "x2.safetensors", single_file=True),
        OutputSpec(tmp_path / "x3", dtype=torch.bfloat16),
    ]
    summary = run_jobs([a], jobs, compute, specs, QUIET)
    assert seen == [n for n in a.names() if n != "ids"]  # integer tensors skip the math
    x2, x3 = load_state(tmp_path / "x2.safetensors"), load_state(tmp_path / "x3")
    assert torch.equal(x2["ids"], torch.arange(3)) and torch.equal(x3["ids"], torch.arange(3))
    assert torch.equal(x2["w"], torch.full((4,), 2.0)) and x3["w"].dtype == torch.bfloat16
    assert summary.tensors == 3 and summary.bytes_written == (16 + 24 + 8) + (8 + 24 + 4)


def test_failure_midway_leaves_no_output(tmp_path: Path) -> None:
    a = _ckpt(tmp_path, "a", {f"t{i}": torch.ones(2) for i in range(5)})

    def compute(job: TensorJob, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if job.name == "t3":
            raise RunError("boom at t3")
        return [xs[0]]

    with pytest.raises(RunError, match="t3"):
        run_jobs([a], identity_jobs(a, a.names(), 1), compute, [OutputSpec(tmp_path / "o")], QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_wrong_result_shape_is_a_run_error(tmp_path: Path) -> None:
    a = _ckpt(tmp_path, "a", {"w": torch.ones(4)})
    with pytest.raises(RunError, match="shape"):
        run_jobs(
            [a],
            identity_jobs(a, ["w"], 1),
            lambda j, xs: [xs[0][:2]],
            [OutputSpec(tmp_path / "o")],
            QUIET,
        )


def test_dtype_names() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(UsageError, match="int4"):
        parse_dtype("int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(family: dict[str, Path], tmp_path: Path) -> None:
    from mergekit_rl import ops

    for dev in ("cpu", "cuda"):
        opts = ops.WriteOptions(run=RunOptions(device=dev, progress="none"))
        ops.soup([family["sft1"], family["sft2"], family["rlhf"]], tmp_path / dev, None, opts)
    a, b = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


# ---- row blocks and device transfers ------------------------------------------------------------


def _spy_row_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Record every row-range read the engine makes (name, start, stop)."""
    import mergekit_rl.io.reader as reader

    calls: list[tuple[str, int, int]] = []
    real = reader.read_rows

    def spy(info, start, stop, pin=False, out=None):  # noqa: ANN001, ANN202
        calls.append((info.name, start, stop))
        return real(info, start, stop, pin=pin, out=out)

    monkeypatch.setattr(reader, "read_rows", spy)
    return calls


# recipe merges with whole-tensor quantities (cuts, L1 norms, the slerp angle): every one
# streams the vocabulary tensor in row blocks, first passes included
RECIPE_CASES = {
    "ties": "parameters: {rescale: false}",
    "dare_ties": "parameters: {rescale: false}",
    "dare_ties_l1": "merge_method: dare_ties",  # the default L1 rescale
    "ties_l1": "merge_method: ties\nparameters: {rescale: true}",
    "della_l1": "merge_method: della\nparameters: {epsilon: 0.1}",
    "slerp": "parameters: {t: 0.3}",
}


@pytest.mark.parametrize("kind", ["soup", "interpolate", *RECIPE_CASES])
def test_row_blocks_equal_whole_tensors_bit_for_bit(
    kind: str, tied_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergekit_rl.ops import WriteOptions, interpolate, soup
    from mergekit_rl.recipe.run import MergeOptions, merge_file

    fam = tied_family  # bf16 with tied embeddings: the vocabulary tensor is the largest
    recipe = tmp_path / "r.yaml"
    extra = RECIPE_CASES.get(kind, "")
    models = ["rlhf"] if kind == "slerp" else list(fam)
    recipe.write_text(
        ("" if "merge_method" in extra else f"merge_method: {kind}\n")
        + f"{extra}\nbase_model: {fam['base']}\nseed: 3\nmodels:\n"
        + "".join(
            f"  - model: {fam[m]}\n"
            + ("" if kind == "slerp" else "    parameters: {density: 0.4}\n")
            for m in models
        )
    )

    def run(out: Path, block_elems: int) -> None:
        opts = WriteOptions(run=RunOptions(progress="none", block_elems=block_elems))
        if kind == "soup":
            soup([fam["sft1"], fam["sft2"], fam["rlhf"]], out, opts=opts)
        elif kind == "interpolate":
            interpolate(fam["sft1"], fam["rlhf"], out, [0.25, 0.5], opts=opts)
        else:
            merge_file(recipe, out, MergeOptions(write=opts))

    run(tmp_path / "whole", 1 << 30)
    calls = _spy_row_reads(monkeypatch)
    run(tmp_path / "blocks", 1000)  # the 256 x 64 embedding goes through in blocks of 15 rows
    embed = [c for c in calls if c[0] == "model.embed_tokens.weight"]
    assert embed and max(stop - start for _, start, stop in embed) == 15
    outs = sorted(p.parent for p in (tmp_path / "whole").rglob("*.safetensors"))
    assert outs
    for whole_dir in outs:
        blocks_dir = tmp_path / "blocks" / whole_dir.relative_to(tmp_path / "whole")
        a, b = load_state(whole_dir), load_state(blocks_dir)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_pinned_reads_and_asynchronous_copies_only_for_cuda() -> None:
    from mergekit_rl.engine import device_reads, pinned_reads, to_device

    assert pinned_reads(torch.device("cuda:0")) and not pinned_reads(torch.device("cpu"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert device_reads(cuda, QUIET) and not device_reads(cpu, QUIET)  # the default: CUDA only
    assert device_reads(cpu, RunOptions(device_reads=True))  # forced: tests run it on the CPU
    assert not device_reads(cuda, RunOptions(device_reads=False))
    raw = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    out = to_device(raw, torch.device("cpu"))
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -2.0]
    ids = torch.arange(3)
    assert to_device(ids, torch.device("cpu")) is ids  # integers pass through, no copy


# ---- reused buffers ------------------------------------------------------------------------------


def test_buffer_pool_reuses_one_buffer_per_slot_and_grows() -> None:
    from mergekit_rl.engine import BufferPool

    pool, cpu = BufferPool(), torch.device("cpu")
    a = pool.take("in", 0, (4, 8), torch.float32, cpu)
    b = pool.take("in", 0, (2, 3), torch.bfloat16, cpu)  # smaller: a view of the same bytes
    assert a.shape == (4, 8) and b.shape == (2, 3) and b.dtype == torch.bfloat16
    assert b.data_ptr() == a.data_ptr()
    c = pool.take("in", 1, (4, 8), torch.float32, cpu)  # another slot: its own buffer
    assert c.data_ptr() != a.data_ptr()
    d = pool.take("in", 0, (100,), torch.float32, cpu)  # larger: the slot grows
    assert d.numel() == 100 and pool.take("in", 0, (3,), torch.float32, cpu).data_ptr() == (
        d.data_ptr()
    )
    x = torch.randn(5)
    assert pool.cast(x, torch.float32, 0) is x  # same dtype: no copy
    y = pool.cast(x, torch.bfloat16, 0)
    assert torch.equal(y, x.bfloat16()) and pool.cast(x, torch.bfloat16, 0).data_ptr() == (
        y.data_ptr()
    )


@pytest.mark.parametrize("stored", ["tied_family", "family"])  # bf16, float32
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block_elems", [1 << 30, 1000])
def test_the_engine_converts_and_casts_into_reused_buffers(
    block_elems: int,
    fused: bool,
    stored: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every job's float32 inputs and output land in the same few buffers (one per input and
    # output), not in new tensors: the fused pass (the C kernel) reads the stored inputs into
    # pooled buffers and makes no float32 copies; otherwise a float32 read is pooled (it is
    # the compute tensor) and a bf16 one is read into one staging buffer and converted into
    # its pooled float32 copy;
    # the soup is still exactly the independent reference
    import mergekit_rl.engine as engine
    from mergekit_rl.merge import native
    from mergekit_rl.ops import WriteOptions, soup

    if fused and native.library() is None:
        pytest.skip("no C compiler here")
    if not fused:
        monkeypatch.setattr(native, "library", lambda: None)

    storages: set[int] = set()
    takes = []
    slots: set[tuple[str, int]] = set()
    real = engine.BufferPool.take

    def spy(self, role, k, shape, dtype, device):  # noqa: ANN001, ANN202
        t = real(self, role, k, shape, dtype, device)
        storages.add(t.untyped_storage().data_ptr())
        takes.append(role)
        slots.add((role, k))
        return t

    monkeypatch.setattr(engine.BufferPool, "take", spy)
    fam = [request.getfixturevalue(stored)[m] for m in ("sft1", "sft2", "rlhf")]
    opts = WriteOptions(run=RunOptions(progress="none", block_elems=block_elems))
    soup(fam, tmp_path / "out", opts=opts)
    n_tensors = len(load_state(fam[0]))
    assert takes.count("out") >= n_tensors or stored == "family"  # float32 out: no cast
    reads = "raw" if fused or stored == "family" else "in"  # the pooled compute tensors
    assert takes.count(reads) >= 3 * n_tensors
    assert takes.count("in" if reads == "raw" else "raw") == 0
    # a bf16 read converted by torch goes through the one staging slot, not a new tensor
    assert takes.count("stage") == (0 if reads == "raw" else takes.count("in"))
    assert {k for role, k in slots if role == "stage"} <= {0}
    assert len(storages) <= 2 * len(slots)  # one per slot, and a regrowth at most per slot
    got = load_state(tmp_path / "out")
    states = [load_state(p) for p in fam]
    for name, t in got.items():
        want = sum(s[name].double() for s in states) / 3
        torch.testing.assert_close(t.double(), want.to(t.dtype).double(), rtol=8e-3, atol=1e-6)


# ---- what is written is checked, and every read path handles every shape ---------------------


@pytest.mark.parametrize("block_elems", [1 << 30, 1000])
def test_a_cast_that_overflows_is_an_error_and_writes_nothing(
    family: dict[str, Path], tmp_path: Path, block_elems: int
) -> None:
    """base + 1e7 * tau is finite in float32 but past float16's range: the check runs on
    what would be written (after the cast), names the tensor, and leaves nothing behind."""
    from mergekit_rl import ops

    opts = ops.WriteOptions(run=RunOptions(progress="none", block_elems=block_elems))
    tau = tmp_path / "tau.safetensors"
    ops.extract_task_vector(family["base"], family["sft1"], tau, opts)
    out = tmp_path / "out"
    f16 = ops.WriteOptions(run=opts.run, dtype=torch.float16)
    with pytest.raises(
        RunError, match=r"output tensor '[^']+' .* does not fit in float16.*6.55e\+04"
    ):
        ops.apply_task_vectors(family["base"], [tau], out, [1e7], f16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.safetensors"]
    ops.apply_task_vectors(family["base"], [tau], out, [1e7], opts)  # float32 holds it


def test_a_saturating_float8_cast_is_an_error(tmp_path: Path) -> None:
    """float8_e4m3fn has no Inf: its cast clamps to 448 silently, so the range is checked."""
    a = _ckpt(tmp_path, "a", {"w": torch.tensor([1.0, 300.0]).to(torch.float8_e4m3fn)})
    jobs = identity_jobs(a, ["w"], 1)
    for factor, ok in ((1.5, True), (2.0, False)):  # 450 rounds to 448; 600 does not fit
        out = tmp_path / f"x{factor}"

        def run(out: Path = out, factor: float = factor) -> None:
            compute = lambda j, xs: [xs[0] * factor]  # noqa: E731
            run_jobs([a], jobs, compute, [OutputSpec(out)], QUIET)

        if ok:
            run()
            assert load_state(out)["w"].float().tolist() == [1.5, 448.0]
        else:
            with pytest.raises(RunError, match="'w'.*does not fit in float8_e4m3fn"):
                run()
            assert not out.exists()


@pytest.mark.parametrize("device_reads", [False, True])
def test_empty_tensors_on_every_read_path(tmp_path: Path, device_reads: bool) -> None:
    """A tensor whose first dimension is 0 (and one with a later 0) reads on the device path
    as on the whole-tensor path."""
    tensors = {"e0": torch.ones(0, 4), "e1": torch.ones(3, 0), "w": torch.arange(6.0)}
    a = _ckpt(tmp_path, "a", tensors)
    opts = RunOptions(progress="none", device_reads=device_reads, block_elems=2)
    run_jobs(
        [a],
        identity_jobs(a, a.names(), 1),
        lambda j, xs: [xs[0] * 2],
        [OutputSpec(tmp_path / "o")],
        opts,
    )
    got = load_state(tmp_path / "o")
    assert got["e0"].shape == (0, 4) and got["e1"].shape == (3, 0)
    assert got["w"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_a_merge_that_streams_the_blocks_thrice_checks_each_input_block_once(
    tied_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # TIES, L1 rescales and slerp read the blocks in first passes, then merge them: every
    # block of every input is checked for NaN/Inf once (its first read), not once per pass
    import mergekit_rl.engine as engine

    name = "model.embed_tokens.weight"
    ckpts = [open_checkpoint(tied_family[m]) for m in ("sft1", "sft2", "rlhf")]
    (job,) = engine.identity_jobs(ckpts[0], [name], 3)
    checked: list[tuple[int, ...]] = []
    real = engine.all_finite
    monkeypatch.setattr(engine, "all_finite", lambda t: checked.append(t.shape) or real(t))

    def compute(job, xs):  # noqa: ANN001, ANN202
        raise AssertionError("the blocked path must be taken")

    def blocked(job, stream, n_blocks):  # noqa: ANN001, ANN202
        for _ in range(2):  # two first passes
            assert sum(1 for _ in stream()) == n_blocks
        return ([xs[0].clone()] for _, xs in stream())  # (the pooled block is reused)

    compute.blocked = blocked  # type: ignore[attr-defined]
    pool = engine.BufferPool()
    parts = engine._blocked(ckpts, job, compute, torch.device("cpu"), 1000, pool)
    assert parts is not None
    merged = torch.cat([p[0] for p in parts])
    n_blocks = -(-job.shape[0] // max(1, 1000 // job.shape[1]))
    assert n_blocks > 2 and len(checked) == 3 * n_blocks  # not 3 x 3 passes x n_blocks
    assert torch.equal(merged, ckpts[0].read(name).float())
