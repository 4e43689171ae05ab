"""The known-harmless library warnings are ignored by message and category, and nothing else."""

from __future__ import annotations

import warnings

import pytest

from mergekit_rl.known_warnings import HARMLESS, harmless_warnings_ignored


def _caught(fn) -> list[str]:  # noqa: ANN001
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in got if issubclass(w.category, FutureWarning)]


def test_trl_configs_gradient_checkpointing_warning_is_ignored_only_inside() -> None:
    trl = pytest.importorskip("trl")
    import transformers

    if "activation_checkpointing" not in transformers.TrainingArguments.__dataclass_fields__:
        pytest.skip("this transformers has no activation_checkpointing (nothing is deprecated)")

    def make() -> None:
        trl.DPOConfig(output_dir="unused", use_cpu=True, report_to="none")

    assert any("gradient_checkpointing" in m for m in _caught(make))  # TRL's default warns

    def inside() -> None:
        with harmless_warnings_ignored():
            make()
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
            warnings.warn(
                "`gradient_checkpointing` is deprecated", DeprecationWarning, stacklevel=1
            )

    assert _caught(inside) == ["another FutureWarning"]  # narrow: other warnings still show
    assert any("gradient_checkpointing" in m for m in _caught(make))  # and only inside


def test_every_entry_says_why() -> None:
    for category, message, why in HARMLESS:
        assert issubclass(category, Warning) and message and len(why) > 20


def test_the_labs_own_trainer_config_does_not_warn(tmp_path) -> None:  # noqa: ANN001
    """Our own call passes TRL's default under its new name: no warning to filter at all."""
    pytest.importorskip("trl")
    from mergekit_rl.lab.run import trl_args

    args = []
    got = _caught(lambda: args.append(trl_args(tmp_path, 2, 1e-3, 2, 0, 32)))
    assert not [m for m in got if "checkpointing" in m], got
    assert args[0].gradient_checkpointing is True  # TRL's default behaviour is kept


@pytest.mark.parametrize("algorithm", ["dpo", "kto", "grpo", "rloo"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_trainer_config_of_a_recipe_does_not_warn(algorithm: str, checkpointing: bool) -> None:
    """`rlmerge train` passes training.gradient_checkpointing under the name this transformers
    takes: no FutureWarning from our own call, and the setting arrives."""
    pytest.importorskip("trl")
    import yaml

    from mergekit_rl.train.recipe import parse_train_recipe
    from mergekit_rl.train.run import trainer_config

    doc: dict = {
        "algorithm": algorithm,
        "policy": "unused",
        "dataset": {"path": "unused.jsonl"},
        "training": {"output_dir": "unused", "gradient_checkpointing": checkpointing},
    }
    if algorithm in ("grpo", "rloo"):
        doc["reward"] = {"keyword": {"words": ["a"]}}
    recipe = parse_train_recipe(yaml.safe_dump(doc), "r.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = trainer_config(recipe, None)
    assert config.gradient_checkpointing is checkpointing
