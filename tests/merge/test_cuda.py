"""CUDA against the CPU: every merge method, the magnitude selection, the random masks and the
engine's pinned/asynchronous path. Skipped where CUDA is not available (the development
machines and CI); run them on a GPU machine with `python -m pytest -q tests/merge/test_cuda.py`.

Random methods must be bit-identical (counter-based masks) with `inverse_density` or no rescale;
with the L1 rescale their kept entries are identical but the norm ratio is a float32 reduction
whose grouping differs on the device, so they (and the deterministic methods) are compared up to
float32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_rl.merge import selection, sparsify
from mergekit_rl.merge.registry import TensorContext, get_method, list_methods

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "slerp": ({}, {"t": 0.4}),
    "ties": ({"density": 0.3}, {}),
    "dare_linear": ({"density": 0.5}, {"rescale_mode": "inverse_density"}),
    "dare_ties": ({"density": 0.5}, {"rescale": False}),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.1}, {}),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.1}, {}),
    "della": ({"density": 0.5, "epsilon": 0.1}, {"rescale_mode": "inverse_density"}),
    "della_linear": ({"density": 0.5, "epsilon": 0.1}, {"rescale": False}),
    "nuslerp": ({"weight": 0.5}, {}),
}


def _bf16_family(n: int, shape: tuple[int, ...], seed: int = 0):
    """bf16-valued base and fine-tunes in float32: task vectors with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    xs = [(base + torch.randn(shape, generator=g) * 1e-3).bfloat16().float() for _ in range(n)]
    return base, xs


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_every_method_on_cuda_equals_the_cpu(name: str) -> None:
    method = get_method(name)
    n = max(method.min_models, min(3, method.max_models or 3))
    base, xs = _bf16_family(n, (300, 257))
    mp, gp = PARAMS.get(name, ({}, {}))
    mps = [dict(mp) for _ in range(n)]
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", tuple(f"m{i}" for i in range(n)), 3)
    b = base if method.needs_base else None
    cpu = method.run(ctx, xs, b, mps, gp)
    gpu = method.run(ctx, [x.cuda() for x in xs], None if b is None else b.cuda(), mps, gp)
    assert gpu.device.type == "cuda"
    if name in RANDOM:
        assert torch.equal(gpu.cpu(), cpu)
        gp_l1 = {**gp, "rescale": True, "rescale_mode": "l1"}
        l1 = method.run(ctx, xs, b, mps, gp_l1)
        l1_gpu = method.run(ctx, [x.cuda() for x in xs], b.cuda(), mps, gp_l1)
        assert torch.equal(l1_gpu.cpu() == base, l1 == base)  # the same entries kept
        torch.testing.assert_close(l1_gpu.cpu(), l1, rtol=1e-5, atol=1e-6 * float(l1.abs().max()))
    else:
        scale = float(cpu.abs().max()) or 1.0
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("density", [0.01, 0.5, 0.9])
def test_magnitude_selection_on_cuda_is_the_cpu_selection(density: float) -> None:
    _, (d,) = _bf16_family(1, (1000, 513), seed=1)
    d = d - d.mean()
    k = int(density * d.numel())
    cpu_cut = selection.magnitude_cut(d, d.numel(), k)
    gpu_cut = selection.magnitude_cut(d.cuda(), d.numel(), k)
    assert (gpu_cut.threshold, gpu_cut.ties_left) == (cpu_cut.threshold, cpu_cut.ties_left)
    got = selection.magnitude_prune(d.cuda(), density).cpu()
    assert torch.equal(got, selection.magnitude_prune(d, density))
    assert int((got != 0).sum()) == int((d * selection.magnitude_mask(d, density) != 0).sum())
    assert float(selection.kth_largest(d.abs().cuda(), k)) == float(
        selection.kth_largest(d.abs(), k)
    )


def test_random_masks_on_cuda_are_bit_identical() -> None:
    _, (d,) = _bf16_family(1, (517, 300), seed=2)
    for offset in (0, 12345, (1 << 32) - 100):
        cpu = sparsify.bernoulli(d, 0.3, 5, "m0", "w", offset=offset).values
        gpu = sparsify.bernoulli(d.cuda(), 0.3, 5, "m0", "w", offset=offset).values
        assert torch.equal(gpu.cpu(), cpu)
    cpu = sparsify.della(d, 0.5, 0.2, 5, "m0", "w").values
    assert torch.equal(sparsify.della(d.cuda(), 0.5, 0.2, 5, "m0", "w").values.cpu(), cpu)


@pytest.mark.parametrize("recipe_method", ["dare_ties", "ties", "linear"])
def test_recipe_merge_on_cuda_with_row_blocks_equals_the_cpu(
    recipe_method: str, tied_family: dict[str, Path], tmp_path: Path
) -> None:
    from mergekit_rl.engine import RunOptions
    from mergekit_rl.ops import WriteOptions
    from mergekit_rl.recipe.run import MergeOptions, merge_file
    from tests.conftest import load_state

    fam = tied_family
    recipe = tmp_path / "r.yaml"
    base = f"base_model: {fam['base']}\n" if recipe_method != "linear" else ""
    params = "weight: 0.5" + (", density: 0.4" if recipe_method != "linear" else "")
    recipe.write_text(
        f"merge_method: {recipe_method}\n{base}seed: 1\n"
        + ("parameters: {rescale: false}\n" if recipe_method == "dare_ties" else "")
        + "models:\n"
        + "".join(
            f"  - model: {fam[m]}\n    parameters: {{{params}}}\n" for m in ("sft1", "sft2", "rlhf")
        )
    )
    outs = {}
    for device in ("cpu", "cuda"):
        run = RunOptions(device=device, progress="none", block_elems=1000)  # pinned row blocks
        merge_file(recipe, tmp_path / device, MergeOptions(write=WriteOptions(run=run)))
        outs[device] = load_state(tmp_path / device)
    for name, t in outs["cpu"].items():
        if recipe_method != "dare_ties":  # deterministic methods: up to rounding
            torch.testing.assert_close(outs["cuda"][name].float(), t.float(), rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(outs["cuda"][name], t), name
