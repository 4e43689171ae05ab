"""`peft:` in train recipes: LoRA through TRL's peft_config, with Elastic Reset on the adapter
weights; the final model is the policy with the trained adapter merged in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_rl.errors import RecipeError
from mergekit_rl.io.reader import open_checkpoint
from mergekit_rl.train.recipe import parse_train_recipe
from mergekit_rl.train.run import TrainOptions, train
from tests.conftest import load_state

pytest.importorskip("peft")
DATA = Path(__file__).resolve().parents[2] / "recipes" / "train" / "data"


def doc(family: dict[str, Path], out: Path, **extra: object) -> dict:
    return {
        "algorithm": "dpo",
        "policy": str(family["sft1"]),
        "peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"path": str(DATA / "prefs.jsonl")},
        "training": {
            "output_dir": str(out),
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "max_steps": 4,
            "batch_size": 4,
            "max_length": 48,
            "save_steps": None,
        },
        **extra,
    }


def test_dpo_lora_with_elastic_reset(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    er = {"ema_decay": 0.5, "reset_every": 2}
    text = yaml.safe_dump(doc(family, out, elastic_reset=er))
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in logged if "loss" in m]
    assert [m["elastic/num_resets"] for m in logged] == [0, 1, 1, 2]
    assert logged[-1]["loss"] < logged[0]["loss"]  # the adapter learns the preference

    # only the adapted matrices moved; the final model is POLICY + the saved adapter
    final, start = load_state(out / "final"), load_state(family["sft1"])
    moved = {k for k in start if not torch.equal(final[k], start[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    cfg = json.loads((out / "final-adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    with open_checkpoint(f"{family['sft1']}+{out / 'final-adapter'}") as merged:
        for k in start:
            torch.testing.assert_close(merged.read(k), final[k], atol=1e-6, rtol=1e-5, msg=k)


def test_peft_refusals(family: dict[str, Path], tmp_path: Path) -> None:
    bad = doc(family, tmp_path, base=str(family["base"]), optimizer={"name": "ondare"})
    with pytest.raises(RecipeError, match=r"peft: optimizer ondare merges every update"):
        parse_train_recipe(yaml.safe_dump(bad), "r.yaml")
    grpo = doc(family, tmp_path, algorithm="grpo", reference=str(family["sft2"]))
    grpo["reward"] = {"length": {"target": 4}}
    grpo["training"] |= {"beta": 0.1, "batch_size": 2, "num_generations": 2}
    with pytest.raises(RecipeError, match=r"reference: with peft, grpo takes the policy"):
        parse_train_recipe(yaml.safe_dump(grpo), "r.yaml")
    typo = doc(family, tmp_path)
    typo["peft"] = {"rank": 4}
    with pytest.raises(RecipeError, match=r"peft.rank: unknown key"):
        parse_train_recipe(yaml.safe_dump(typo), "r.yaml")


def test_policy_base_plus_adapter(family: dict[str, Path], tmp_path: Path) -> None:
    """policy: BASE+ADAPTER starts from the merged weights (lr 0 keeps them), and GRPO's KL
    reference is that merged model too (its KL at step 1 is 0, not the adapter's distance)."""
    from tests.io.test_adapter import make_adapter

    merged = make_adapter(family["sft1"], tmp_path / "lora", ["q_proj", "o_proj"], seed=8)
    policy = f"{family['sft1']}+{tmp_path / 'lora'}"
    d = doc(family, tmp_path / "dpo", policy=policy)
    del d["peft"]
    d["training"] |= {"learning_rate": 0.0, "max_steps": 1}
    text = yaml.safe_dump(d)
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None))
    final = load_state(tmp_path / "dpo" / "final")
    for k in final:
        torch.testing.assert_close(final[k], merged[k], atol=1e-5, rtol=1e-5, msg=k)
    card = (tmp_path / "dpo" / "final" / "README.md").read_text()
    assert str(tmp_path / "lora") in card

    g = doc(family, tmp_path / "grpo", policy=policy, algorithm="grpo")
    del g["peft"]
    g["reward"] = {"length": {"target": 4}}
    g["training"] |= {"beta": 0.1, "max_steps": 1, "batch_size": 2, "num_generations": 2}
    g["training"] |= {"max_completion_length": 4}
    del g["training"]["max_length"]
    text = yaml.safe_dump(g)
    train(parse_train_recipe(text, "g.yaml"), text, TrainOptions(echo=lambda s: None))
    (step1,) = [
        json.loads(x)
        for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert step1["kl"] == pytest.approx(0.0, abs=1e-6)
