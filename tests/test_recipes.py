"""Every example recipe under recipes/ (recursively, except recipes/train/, which the training
tests run, and recipes/real/, which names Hub models) validates, dry-runs and merges the tiny
demo models from their directory, loads with transformers and has the property its comment
promises (checked against float64 references)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from torch import Tensor
from typer.testing import CliRunner

from tests.conftest import load_state
from tests.merge.test_methods import (
    ref_model_stock,
    ref_slerp,
    ref_task_vectors,
    ref_top_k,
    ref_uniform,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipes/train: the training tests; recipes/real: Hub models, run on the demo models by
# tests/test_real_models_doc.py
ALL = sorted(
    p for p in RECIPES.rglob("*.yaml") if p.relative_to(RECIPES).parts[0] not in ("train", "real")
)
runner = CliRunner()
State = dict[str, Tensor]


@pytest.fixture(scope="module")
def demo(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo directory laid out like `rlmerge demo DIR`: DIR/models/{base,sft1,sft2,rlhf}."""
    root = tmp_path_factory.mktemp("demo")
    (root / "models").symlink_to(family["base"].parent, target_is_directory=True)
    return root


def _in(where: Path, *args: str) -> tuple[int, str]:
    cwd = os.getcwd()
    os.chdir(where)
    try:
        result = runner.invoke(app, list(args))
    finally:
        os.chdir(cwd)
    return result.exit_code, result.stdout + result.stderr


def _models(demo: Path) -> dict[str, State]:
    return {m: load_state(demo / "models" / m) for m in ("base", "sft1", "sft2", "rlhf")}


# ---- the property each recipe promises, on float64 references ----------------------------------


def _linear(weights: dict[str, float]) -> Callable[[dict[str, State], str], Tensor]:
    total = sum(weights.values())
    return lambda m, k: sum(w * m[n][k].double() for n, w in weights.items()) / total


def _layerwise(m: dict[str, State], k: str) -> Tensor:
    # depth 0 (embeddings, layer 0): half SFT, half RLHF; depth 1 (layer 1, norm, lm_head): RLHF
    bottom = "embed" in k or ".layers.0." in k
    if bottom:
        return (m["sft1"][k].double() + m["rlhf"][k].double()) / 2
    return m["rlhf"][k].double()


def _warp(m: dict[str, State], k: str) -> Tensor:
    b = m["base"][k]
    slerped = b.double() + ref_slerp(m["sft1"][k] - b, m["sft2"][k] - b, 0.5)
    return 0.5 * b.double() + 0.5 * slerped


def _ties(m: dict[str, State], k: str) -> Tensor:
    xs, b = [m["sft1"][k], m["sft2"][k], m["rlhf"][k]], m["base"][k]
    keeps = [
        ref_top_k(x.double() - b.double(), d) for x, d in zip(xs, [0.5, 0.5, 0.3], strict=True)
    ]
    return ref_task_vectors(xs, b, [1.0, 1.0, 0.5], keeps, elect=True, normalize=True)


def _dare(
    seed: int, density: float, weights: list[float], **kw: object
) -> Callable[[dict[str, State], str], Tensor]:
    def want(m: dict[str, State], k: str) -> Tensor:
        xs, b = [m["sft1"][k], m["sft2"][k]], m["base"][k]
        ids = ["models/sft1", "models/sft2"]
        keeps = [ref_uniform(x.shape, seed, i, k) < density for x, i in zip(xs, ids, strict=True)]
        return ref_task_vectors(xs, b, weights, keeps, [density] * 2, **kw)  # type: ignore[arg-type]

    return want


def _model_stock(m: dict[str, State], k: str) -> Tensor:
    return ref_model_stock([m["sft1"][k], m["sft2"][k]], m["base"][k])


def _stack(m: dict[str, State], k: str) -> Tensor:
    # layers 0-1 of sft1, then layer 1 of sft2 as layer 2; embeddings from sft1, the final
    # norm and lm_head from sft2 (the last slice's model)
    if ".layers.2." in k:
        return m["sft2"][k.replace(".layers.2.", ".layers.1.")].double()
    return m["sft1" if ".layers." in k or "embed" in k else "sft2"][k].double()


EXPECTED: dict[str, Callable[[dict[str, State], str], Tensor]] = {
    "salsa-reference-soup": _linear({"sft1": 1.0, "sft2": 1.0}),
    "sft-to-rlhf-interpolation": _linear({"sft1": 0.7, "rlhf": 0.3}),
    "heterogeneous-layerwise": _layerwise,
    "warp-slerp-liti": _warp,
    "ties-sft": _ties,
    "dare-ties-sft": _dare(1234, 0.7, [1.0, 1.0], rescale="l1", elect=True),
    "dare-linear-sft": _dare(7, 0.5, [0.5, 0.5], rescale="inverse_density"),
    "model-stock": _model_stock,
    "passthrough-layer-stack": _stack,
}
LAYERS = {"passthrough-layer-stack": 3}  # num_hidden_layers of the output, if not the inputs' 2


def _id(p: Path) -> str:
    return str(p.relative_to(RECIPES))


def test_validate_takes_every_recipe_at_once(demo: Path) -> None:
    code, text = _in(demo, "validate", *map(str, ALL))
    assert code == 0, text


def test_recipes_are_found_and_documented() -> None:
    assert len(ALL) >= len(EXPECTED)
    for path in ALL:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} must open with a comment saying what it does"
        assert f"rlmerge merge ../recipes/{_id(path)}" in text, f"{path.name}: no exact command"
    assert set(EXPECTED) <= {p.stem for p in ALL}


@pytest.mark.parametrize("recipe", ALL, ids=_id)
def test_recipe_validates_dry_runs_and_merges(recipe: Path, demo: Path) -> None:
    out = demo / "out" / recipe.stem
    code, text = _in(demo, "validate", str(recipe))
    assert code == 0, text

    code, text = _in(demo, "merge", str(recipe), "-o", str(out), "--dry-run")
    assert code == 0, text
    assert "estimated peak memory" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert not out.exists()

    code, text = _in(demo, "merge", str(recipe), "-o", str(out), "--quiet")
    assert code == 0, text
    assert (out / "rlmerge_recipe.yaml").is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()

    got = load_state(out)
    models = _models(demo)
    layers = LAYERS.get(recipe.stem, 2)
    assert model.config.num_hidden_layers == layers
    per_layer = {k for k in models["base"] if ".layers.0." in k}
    assert len(got) == len(models["base"]) + (layers - 2) * len(per_layer)
    want = EXPECTED.get(recipe.stem)
    for k, v in got.items():
        assert torch.isfinite(v).all(), k
        if want is not None:
            ref = want(models, k)
            scale = float(ref.abs().max())
            torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-6 * scale, msg=k)
