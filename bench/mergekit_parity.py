"""Compare rlmerge with mergekit on the same recipes, tensor by tensor (not part of the tests).

mergekit lives in its own virtual environment, never in ours; it is only run as a program:

    python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit
    python bench/mergekit_parity.py --mergekit-venv /tmp/mk-venv [--work /tmp/mkparity]

Each case is one mergekit-format recipe on the tiny demo models (`rlmerge demo`), merged by
`mergekit-yaml` and by `rlmerge merge`. The report is one markdown table row per case: the
largest difference over all tensors, relative to each tensor's largest magnitude.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

# float32 rounding: a few ulps of the tensor's scale (one ulp is 1.2e-7 relative)
AGREE_REL = 1e-6

B, S1, S2, RL = "models/base", "models/sft1", "models/sft2", "models/rlhf"


def _models(*pairs: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": m, "parameters": p} if p else {"model": m} for m, p in pairs]


def _recipe(
    method: str, *pairs: tuple[str, dict[str, Any]], base: str | None = B, **params: Any
) -> dict[str, Any]:
    """A mergekit recipe: models with their parameters, a base model, global parameters."""
    recipe: dict[str, Any] = {"merge_method": method, "models": _models(*pairs)}
    if base is not None:
        recipe["base_model"] = base
    if params:  # lambda_ -> lambda (a Python keyword)
        recipe["parameters"] = {k.rstrip("_"): v for k, v in params.items()}
    return recipe


def _sft_pair(method: str, **per_model: Any) -> dict[str, Any]:
    """method on base + sft1 (weight 1) and sft2 (weight 0.6), same per-model parameters."""
    return _recipe(method, (S1, {"weight": 1.0, **per_model}), (S2, {"weight": 0.6, **per_model}))


CASES_LINEAR = _recipe("linear", (S1, {"weight": 1.0}), (S2, {"weight": 0.5}), base=None)

# (case name, recipe): random methods at density 1, where no mask is drawn
CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", CASES_LINEAR),
    (
        "linear (filtered weights)",
        _recipe(
            "linear",
            (S1, {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}]}),
            (S2, {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}]}),
            base=None,
        ),
    ),
    ("slerp", _recipe("slerp", (S1, {}), (RL, {}), base=S1, t=0.3)),
    ("slerp (gradient t)", _recipe("slerp", (S1, {}), (RL, {}), base=S1, t=[0.2, 0.9])),
    ("nuslerp (task vectors)", _sft_pair("nuslerp")),
    (
        "nuslerp (row vectors, no base)",
        _recipe(
            "nuslerp",
            (S1, {"weight": 0.4}),
            (S2, {"weight": 0.6}),
            base=None,
            nuslerp_flatten=False,
        ),
    ),
    (
        "task_arithmetic",
        _recipe("task_arithmetic", (S1, {"weight": 0.7}), (S2, {"weight": 0.5}), lambda_=0.9),
    ),
    (
        "ties",
        _recipe(
            "ties", (S1, {"weight": 1.0, "density": 0.5}), (S2, {"weight": 0.6, "density": 0.3})
        ),
    ),
    ("dare_ties (density 1)", _sft_pair("dare_ties", density=1.0)),
    ("dare_linear (density 1)", _sft_pair("dare_linear", density=1.0)),
    ("breadcrumbs (gamma 0.05)", _sft_pair("breadcrumbs", density=0.8, gamma=0.05)),
    ("breadcrumbs_ties (gamma 0.05)", _sft_pair("breadcrumbs_ties", density=0.8, gamma=0.05)),
    (
        "breadcrumbs (default gamma: no outlier in 64-entry norms)",
        _sft_pair("breadcrumbs", density=0.8),
    ),
    ("ties (density 0.01: k < 1 on the norms)", _sft_pair("ties", density=0.01)),
    ("della (density 1)", _sft_pair("della", density=1.0)),
    ("della_linear (density 1)", _sft_pair("della_linear", density=1.0)),
    ("model_stock", _recipe("model_stock", (S1, {}), (S2, {}))),
    (
        "model_stock (filter_wise)",
        _recipe("model_stock", (S1, {}), (S2, {}), (RL, {}), filter_wise=True),
    ),
    (
        "linear (dtype bfloat16)",
        {**CASES_LINEAR, "dtype": "bfloat16"},
    ),
    ("karcher", _recipe("karcher", (S1, {}), (S2, {}), (RL, {}), base=None)),
    (
        "passthrough (layer slices)",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": S1, "layer_range": [0, 2]}]},
                {"sources": [{"model": S2, "layer_range": [1, 2]}]},
            ],
        },
    ),
]


def _write_recipe(recipe: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump({"dtype": "float32", **recipe}, sort_keys=False))


def run_mergekit(venv: Path, recipe: Path, out: Path, cwd: Path) -> None:
    # no model card: mergekit's card asks the hub whether "models/base" is a repo id
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(recipe), str(out), "--quiet"]
    cmd += ["--no-write-model-card", "--no-copy-tokenizer"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=env)


def run_rlmerge_cli(recipe: Path, out: Path, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "mergekit_rl.cli.app", "merge", str(recipe), "-o", str(out)]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """(max over tensors of max|ours - theirs| / max|theirs|, name of the worst tensor)."""
    missing = set(theirs) ^ set(ours)
    if missing:
        return math.inf, f"tensor names differ: {sorted(missing)[:3]}"
    worst, worst_name = 0.0, ""
    for name, want in theirs.items():
        got, want64 = ours[name].double(), want.double()
        rel = float((got - want64).abs().max()) / max(float(want64.abs().max()), 1e-30)
        if rel > worst:
            worst, worst_name = rel, name
    return worst, worst_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mkparity"))
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    work: Path = args.work
    if not (work / "models" / "base").exists():
        subprocess.run([sys.executable, "-m", "mergekit_rl.cli.app", "demo", str(work)], check=True)
    print("\n| case | max rel diff | agrees to float32 rounding | worst tensor |")
    print("|---|---|---|---|")
    for i, (name, recipe) in enumerate(CASES):
        if args.only not in name:
            continue
        recipe_path = work / f"case{i}.yaml"
        _write_recipe(recipe, recipe_path)
        mk_out, rl_out = work / f"mk{i}", work / f"rl{i}"
        for d in (mk_out, rl_out):
            shutil.rmtree(d, ignore_errors=True)
        try:
            run_mergekit(args.mergekit_venv, recipe_path, mk_out, work)
        except subprocess.CalledProcessError as e:
            print(f"| {name} | - | - | mergekit failed: {e.stderr.strip().splitlines()[-1]} |")
            continue
        try:
            run_rlmerge_cli(recipe_path, rl_out, work)
        except subprocess.CalledProcessError as e:
            print(f"| {name} | - | - | rlmerge failed: {e.stderr.strip().splitlines()[-1]} |")
            continue
        rel, worst = compare(load_dir(rl_out), load_dir(mk_out))
        print(f"| {name} | {rel:.1e} | {'yes' if rel <= AGREE_REL else 'no'} | {worst} |")


if __name__ == "__main__":
    main()
