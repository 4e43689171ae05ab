"""The train recipe schema: defaults, and every problem reported at once with its YAML path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mergekit_rl.errors import InputNotFoundError, RecipeError
from mergekit_rl.train.recipe import (
    DatasetSpec,
    OptimizerSpec,
    TrainRecipe,
    known_keys,
    parse_train_recipe,
    read_train_recipe,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "train"

DPO = {
    "algorithm": "dpo",
    "policy": "models/sft1",
    "base": "models/base",
    "optimizer": {"name": "ondare"},
    "dataset": {"path": "prefs.jsonl"},
    "training": {"output_dir": "runs/x"},
}


def problems(doc: dict | str, allow_code: bool = False) -> dict[str, str]:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    with pytest.raises(RecipeError) as info:
        parse_train_recipe(text, "r.yaml", allow_code)
    assert str(info.value).startswith("r.yaml: ")
    return dict(info.value.problems)


def with_(doc: dict, **changes: object) -> dict:
    return {**doc, **changes}


def test_minimal_recipe_gets_the_papers_defaults() -> None:
    recipe = parse_train_recipe(yaml.safe_dump(DPO), "r.yaml")
    opt = recipe.optimizer
    assert (opt.name, opt.reserve_p, opt.alpha, opt.rescale, opt.clip_val) == (
        "ondare",
        0.01,
        1e-7,
        True,
        1.0,
    )
    assert recipe.training.learning_rate == 1e-6 and recipe.training.lr_scheduler == "cosine"
    assert recipe.learning_rate == 1e-6  # optimizer.lr unset: training.learning_rate
    assert recipe.reference is None and recipe.elastic_reset is None and recipe.reward is None


def test_yaml_exponents_without_a_dot_are_numbers() -> None:
    # PyYAML reads 1e-6 as a string; the schema still takes it as the number it means
    doc = "algorithm: dpo\npolicy: p\ndataset: {path: d.jsonl}\ntraining:\n  output_dir: o\n"
    recipe = parse_train_recipe(doc + "  learning_rate: 1e-5\n", "r.yaml")
    assert recipe.training.learning_rate == pytest.approx(1e-5)


def test_reference_is_a_path_or_a_soup() -> None:
    ref = parse_train_recipe(yaml.safe_dump(with_(DPO, reference="models/sft2")), "r").reference
    assert ref is not None and (ref.path, ref.soup) == ("models/sft2", None)
    soup = {"soup": ["a", "b"], "weights": [0.25, 0.75]}
    ref = parse_train_recipe(yaml.safe_dump(with_(DPO, reference=soup)), "r").reference
    assert ref is not None and ref.soup == ["a", "b"] and ref.weights == [0.25, 0.75]
    assert "reference.soup" in problems(with_(DPO, reference={"soup": ["only-one"]}))


def test_every_problem_at_once_with_paths_and_hints() -> None:
    doc = {
        "algorithm": "grpo",
        "policy": "models/sft1",
        "optimizer": {"name": "ondare", "reserve_p": 1.5},
        "dataset": {"path": "p.jsonl"},
        "training": {"output_dir": "o", "lerning_rate": 1e-6},
        "elastic_reset": {"ema_decay": 0.99},
    }
    found = problems(doc)
    assert "less than or equal to 1" in found["optimizer.reserve_p"]
    assert found["training.lerning_rate"] == "unknown key (did you mean learning_rate?)"
    assert "required for algorithm grpo" in found["reward"]
    assert "tau = policy - base" in found["base"]
    assert found["elastic_reset.reset_every"] == "required key is missing"
    assert len(found) == 5


def test_did_you_mean_uses_the_train_keys_at_every_depth() -> None:
    assert problems(with_(DPO, algoritm="dpo"))["algoritm"] == (
        "unknown key (did you mean algorithm?)"
    )
    doc = with_(DPO, optimizer={"name": "ondare", "resreve_p": 0.1})
    assert problems(doc)["optimizer.resreve_p"] == "unknown key (did you mean reserve_p?)"
    grpo = with_(DPO, algorithm="grpo", reward={"keyword": {"wrods": ["a"]}})
    assert problems(grpo)["reward.keyword.wrods"] == "unknown key (did you mean words?)"
    assert "reserve_p" in known_keys(("optimizer", "x"))
    assert "words" in known_keys(("reward", "keyword", "x"))
    assert known_keys(("nothing", "x")) == []


def test_python_reward_needs_allow_code() -> None:
    doc = with_(DPO, algorithm="grpo", reward={"function": {"call": "mymod:score"}})
    assert "--allow-code" in problems(doc)["reward.function"]
    recipe = parse_train_recipe(yaml.safe_dump(doc), "r", allow_code=True)
    assert recipe.reward is not None and recipe.reward.function is not None
    assert "reward.function.call" in problems(
        with_(doc, reward={"function": {"call": "not a call"}}), allow_code=True
    )


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"reward": {"length": {"target": 5}}}, "reward", "used only by grpo and rloo"),
        ({"optimizer": {"name": "adamw", "alpha": 0.1}}, "optimizer.alpha", "only by ondare"),
        ({"task_vector": "tv.safetensors"}, "task_vector", "not both"),
        (
            {
                "optimizer": {"name": "ondare", "lr": 1e-3},
                "training": {"output_dir": "o", "learning_rate": 1e-6},
            },
            "optimizer.lr",
            "differs",
        ),
        (
            {"training": {"output_dir": "o", "max_steps": 5, "num_epochs": 1}},
            "training.num_epochs",
            "not both",
        ),
        (
            {"training": {"output_dir": "o", "deepspeed": "ds.json"}},
            "training.deepspeed",
            "DeepSpeed ZeRO",
        ),
        (
            {"reference": "models/sft2", "elastic_reset": {"reset_every": 5, "kl_anchor": "ema"}},
            "elastic_reset.kl_anchor",
            "drop `reference`",
        ),
    ],
)
def test_rules_across_keys(changes: dict, path: str, words: str) -> None:
    found = problems(with_(DPO, **changes))
    assert words in found[path], found


def test_sampling_rules() -> None:
    grpo = with_(
        DPO,
        algorithm="grpo",
        optimizer={"name": "adamw"},
        reward={"regex": {"pattern": "x"}},
        reference="models/sft2",
        training={"output_dir": "o", "batch_size": 6, "num_generations": 4},
    )
    found = problems(grpo)
    assert "beta > 0" in found["training.beta"]
    assert "must divide" in found["training.num_generations"]
    ema = with_(grpo, reference=None, elastic_reset={"reset_every": 2, "kl_anchor": "ema"})
    assert "EMA anchor" in problems(ema)["training.beta"]
    ok = with_(grpo, training={"output_dir": "o", "batch_size": 8, "beta": 0.04})
    assert parse_train_recipe(yaml.safe_dump(ok), "r").training.num_generations == 4


def test_not_a_mapping_empty_and_several_documents() -> None:
    assert "mapping of keys" in problems("- a\n- b\n")[""]
    assert "holds no recipe" in problems("")[""]
    assert "one YAML document" in problems("algorithm: dpo\n---\nalgorithm: kto\n")[""]
    assert "not valid YAML" in problems("a: [1, 2\n")["line 2"]


def with_models(root: Path, family: dict[str, Path]) -> None:
    """root/models/{base,sft1,...}: the demo layout the recipes' model paths refer to."""
    (root / "models").symlink_to(family["base"].parent, target_is_directory=True)


def test_missing_local_files_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    with_models(tmp_path, family)
    (tmp_path / "held.txt").write_text("some text\n")
    doc = with_(DPO, evaluation={"perplexity_text": "held.txt", "prompts": "p.jsonl"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as info:
        read_train_recipe(tmp_path / "r.yaml")
    found = dict(info.value.problems)
    assert set(found) == {"evaluation.prompts", "dataset.path"}
    assert "'p.jsonl' not found" in found["evaluation.prompts"]
    # a hub dataset id is resolved too: offline (as here) and not in the datasets cache, it fails
    # (tests/train/test_hub_dataset_check.py: a cached one passes)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(with_(DPO, dataset={"path": "org/prefs"})))
    with pytest.raises(RecipeError) as info:
        read_train_recipe(tmp_path / "r.yaml")
    assert [p for p, _ in info.value.problems] == ["dataset.path"]


def test_read_train_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    with_models(tmp_path, family)
    (tmp_path / "prefs.jsonl").write_text("")
    with pytest.raises(InputNotFoundError, match="not found"):
        read_train_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(DPO))
    recipe, text = read_train_recipe(path)
    assert isinstance(recipe, TrainRecipe) and text == path.read_text()


def test_shipped_recipes_are_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]
) -> None:
    # the demo layout: run from DIR with the recipes at DIR/../recipes (data files and models
    # must exist)
    (tmp_path / "recipes").symlink_to(RECIPES.parent, target_is_directory=True)
    (tmp_path / "demo").mkdir()
    with_models(tmp_path / "demo", family)
    monkeypatch.chdir(tmp_path / "demo")
    paths = sorted(RECIPES.glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        recipe, text = read_train_recipe(path)
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert text.startswith("#") and any("rlmerge train" in line for line in header), path
        assert recipe.dataset.path.startswith("../recipes/train/data/")


def test_specs_are_frozen_and_strict() -> None:
    with pytest.raises(Exception, match="frozen"):
        OptimizerSpec().reserve_p = 0.5  # type: ignore[misc]
    with pytest.raises(Exception, match="extra"):
        DatasetSpec(path="x", colums={})  # type: ignore[call-arg]


def test_the_deepspeed_refusal_recommends_only_engines_that_run_the_plugins() -> None:
    # accelerate's FSDP1 flat parameters are refused with the same plug-ins; DDP and FSDP2 run
    # them
    found = problems(with_(DPO, training={"output_dir": "o", "deepspeed": "ds.json"}))
    message = found["training.deepspeed"]
    assert "DDP" in message and "--multi_gpu" in message
    assert not re.search(r"FSDP(?!2)", message), message  # no plain "FSDP" recommendation
    assert "FSDP2" in message and "recipes/train/accelerate/fsdp2.yaml" in message
