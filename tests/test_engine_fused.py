"""The engine's fused pass (`engine._fused`): row-local blends read from pooled raw buffers and
merged by `blend.blend_into`, whole, in row blocks and on the device read path, give the bits
of the torch path (the C library switched off: no compiler, RLMERGE_NATIVE=0)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_rl.engine import RunOptions
from mergekit_rl.errors import RunError
from mergekit_rl.merge import blend, native
from mergekit_rl.ops import WriteOptions, apply_task_vectors, extract_task_vector, interpolate, soup
from mergekit_rl.recipe.run import MergeOptions, merge_file
from tests.conftest import load_state

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

RECIPES = {
    "linear": "merge_method: linear\nparameters: {normalize: true}",
    "linear_raw": "merge_method: linear\nparameters: {normalize: false}",
    "linear_f32_out": "merge_method: linear\nout_dtype: float32",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}",
    "task_lambda_norm": (
        "merge_method: task_arithmetic\nbase_model: {base}\n"
        "parameters: {normalize: true, lambda: 0.6}"
    ),
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters: {t: 0.3}",
}
OPS = ("soup", "interpolate", "extract_apply")
PATHS = {
    "whole": RunOptions(progress="none"),
    "blocks": RunOptions(progress="none", block_elems=1000),  # the embedding: 15-row blocks
    "device_reads": RunOptions(progress="none", device_reads=True),
}


def run_case(case: str, fam: dict[str, Path], out: Path, run: RunOptions) -> Path:
    """Merge `case` of the family into out; the folder whose tensors are compared."""
    opts = WriteOptions(run=run)
    models = [fam["sft1"], fam["sft2"], fam["rlhf"]]
    if case == "soup":
        soup(models, out, weights=[0.3, 0.7, 1.0], opts=opts)
    elif case == "interpolate":
        interpolate(fam["sft1"], fam["rlhf"], out, [0.25, 0.7], opts=opts)
    elif case == "extract_apply":  # bf16 -> float32 task vector, then bf16 + float32
        extract_task_vector(fam["base"], fam["sft1"], out / "tau.safetensors", opts)
        apply_task_vectors(fam["base"], [out / "tau.safetensors"], out / "m", [0.7], opts)
    else:
        header = RECIPES[case].replace("{base}", str(fam["base"]))
        listed = models[1:] if "slerp" in case else models
        body = "".join(f"  - model: {m}\n    parameters: {{weight: 0.4}}\n" for m in listed)
        if "slerp" in case:
            body = f"  - model: {fam['rlhf']}\n"
        recipe = out.parent / f"{out.name}.yaml"
        recipe.write_text(f"{header}\nmodels:\n{body}")
        merge_file(recipe, out, MergeOptions(write=opts))
    return out


def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the blends the engine hands to the fused primitive."""
    calls: list[int] = []
    real = blend.blend_into

    def spy(spec, raws, out):  # noqa: ANN001, ANN202
        calls.append(out.numel())
        return real(spec, raws, out)

    monkeypatch.setattr(blend, "blend_into", spy)
    return calls


def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """RLMERGE_NATIVE=0: no C library, as on a machine without a compiler."""
    monkeypatch.setenv("RLMERGE_NATIVE", "0")
    native.library.cache_clear()
    assert native.library() is None


@pytest.fixture(autouse=True)
def _reload_library() -> Iterator[None]:
    """The library as the environment gives it, after a test that switched it off."""
    yield
    native.library.cache_clear()


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.safetensors"))
    for rel in files:
        a, b = load_state(a_dir / rel), load_state(b_dir / rel)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@needs_native
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [*OPS, *RECIPES])
def test_fused_merges_equal_the_torch_path_bit_for_bit(
    case: str,
    path: str,
    tied_family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = fused_calls(monkeypatch)
    fused = run_case(case, tied_family, tmp_path / "fused", PATHS[path])
    n_fused = len(calls)
    # every float tensor went through the fused pass (the blocks of the large ones apart)
    assert n_fused >= len(load_state(tied_family["base"]))
    if path == "blocks":
        assert calls.count(15 * 64) >= 17  # the 259 x 64 embedding in blocks of 15 rows
    torch_path(monkeypatch)
    reference = run_case(case, tied_family, tmp_path / "torch", PATHS["whole"])
    assert len(calls) == n_fused  # the reference did not use it
    assert_same_tensors(fused, reference)


@needs_native
def test_float32_inputs_fuse_too(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float32 inputs are their own compute tensors: the pooled raw slots must hold them
    calls = fused_calls(monkeypatch)
    for path in ("whole", "blocks"):
        run_case("task_lambda_norm", family, tmp_path / path, PATHS[path])
    assert calls
    torch_path(monkeypatch)
    run_case("task_lambda_norm", family, tmp_path / "torch", PATHS["whole"])
    assert_same_tensors(tmp_path / "whole", tmp_path / "torch")
    assert_same_tensors(tmp_path / "blocks", tmp_path / "torch")


def with_tensor(src: Path, dst: Path, name: str, edit: Callable[[torch.Tensor], None]) -> Path:
    """A copy of checkpoint src with one tensor edited in place."""
    shutil.copytree(src, dst)
    state = load_state(dst)
    edit(state[name])
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block_elems", [1 << 30, 1000])
def test_a_nan_input_warns_naming_it_and_the_output_error_writes_nothing(
    fused: bool,
    block_elems: int,
    tied_family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if fused and native.library() is None:
        pytest.skip("no C compiler here")
    if not fused:
        torch_path(monkeypatch)
    name = "model.embed_tokens.weight"
    bad = with_tensor(tied_family["sft2"], tmp_path / "bad", name, lambda t: t[200, 3].fill_(1e38))
    bad = with_tensor(bad, tmp_path / "worse", name, lambda t: t[250, 5].fill_(float("nan")))
    out = tmp_path / "out"
    opts = WriteOptions(run=RunOptions(progress="none", block_elems=block_elems))
    with (
        pytest.warns(UserWarning, match=f"{bad}: tensor '{name}' contains NaN or Inf") as seen,
        pytest.raises(RunError, match=f"output tensor '{name}' .* contains NaN or Inf"),
    ):
        soup([tied_family["sft1"], bad], out, opts=opts)
    assert not out.exists()
    assert sum("contains NaN or Inf values" in str(w.message) for w in seen) == 1


@pytest.mark.parametrize("fused", [True, False])
def test_an_output_past_bf16_names_its_peak(
    fused: bool, tied_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # finite inputs whose float32 sum rounds past bf16: the torch path's message, its peak
    if fused and native.library() is None:
        pytest.skip("no C compiler here")
    if not fused:
        torch_path(monkeypatch)
    name = "model.layers.0.mlp.up_proj.weight"
    big = with_tensor(tied_family["sft1"], tmp_path / "big", name, lambda t: t[3, 3].fill_(3e38))
    out, recipe = tmp_path / "out", tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\nparameters: {normalize: false}\nmodels:\n"
        f"  - model: {big}\n  - model: {big}\n    parameters: {{weight: 0.131}}\n"
    )
    opts = WriteOptions(run=RunOptions(progress="none"))
    with pytest.raises(RunError, match=f"'{name}' .* does not fit in bfloat16: it reaches 3.39"):
        merge_file(recipe, out, MergeOptions(write=opts))
    assert not out.exists()
