"""SALSA soup references: the soup's weights, and TRL trainers really using it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_rl.errors import OutputExistsError, UsageError
from mergekit_rl.train.reference import build_soup_reference, load_reference, use_reference
from tests.conftest import assert_states_close, load_state

PROMPTS = ["the policy", "a reward model", "merging weights", "elastic reset"]


def test_soup_is_the_mean_of_the_sft_models(family: dict[str, Path], tmp_path: Path) -> None:
    out = build_soup_reference([family["sft1"], family["sft2"]], tmp_path / "soup")
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    want = {k: (a[k].double() + b[k].double()) / 2 for k in a}
    assert_states_close(load_state(out), want, atol=1e-7)
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_soup_weights_reuse_and_force(family: dict[str, Path], tmp_path: Path) -> None:
    models, out = [family["sft1"], family["sft2"]], tmp_path / "soup"
    build_soup_reference(models, out, [3.0, 1.0])
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_soup_reference(models, out, [3.0, 1.0]) == out  # same inputs: reused
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError):
        build_soup_reference(models, out, [1.0, 1.0])  # different weights, no force
    build_soup_reference(models, out, [1.0, 3.0], force=True)
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    want = {k: 0.25 * a[k].double() + 0.75 * b[k].double() for k in a}
    assert_states_close(load_state(out), want, atol=1e-7)
    with pytest.raises(UsageError, match="weights"):
        build_soup_reference(models, tmp_path / "x", [1.0])


def test_load_reference_is_frozen(family: dict[str, Path]) -> None:
    ref = load_reference(family["sft1"])
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert_states_close(ref.state_dict(), load_state(family["sft1"]), atol=0)


# -- TRL trainers ------------------------------------------------------------------------------


def _online_trainer(kind: str, family: dict[str, Path], out: Path, beta: float = 0.1, **extra):
    """A GRPO or RLOO trainer on the tiny policy sft1: 1 step, 4-token completions, on CPU."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = {
        "grpo": (GRPOConfig, GRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
    }[kind]
    args = config_cls(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        beta=beta,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        **extra,
    )

    def length_reward(completions: list[str], **kw: object) -> list[float]:
        return [float(len(c)) for c in completions]

    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(family["sft1"], dtype=torch.float32),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=AutoTokenizer.from_pretrained(family["sft1"]),
    )


def _assert_same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k


def _first_kl(trainer) -> float:
    return next(log["kl"] for log in trainer.state.log_history if "kl" in log)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_online_trainer_uses_the_soup(kind: str, family: dict[str, Path], tmp_path: Path) -> None:
    soup = load_reference(build_soup_reference([family["sft1"], family["sft2"]], tmp_path / "s"))
    trainer = _online_trainer(kind, family, tmp_path / "run")
    # TRL built the reference from the policy's path: sft1, not the soup
    assert not torch.equal(trainer.ref_model.lm_head.weight, soup.lm_head.weight)
    use_reference(trainer, soup)
    _assert_same_weights(trainer.ref_model, soup)
    trainer.train()
    _assert_same_weights(trainer.ref_model, soup)  # the reference stays frozen
    # the policy starts at sft1: KL to an sft1 reference is 0 at step 1, to the soup it is not
    control = _online_trainer(kind, family, tmp_path / "control")
    control.train()
    assert _first_kl(control) == pytest.approx(0.0, abs=1e-6)
    assert abs(_first_kl(trainer)) > 1e-4


def test_online_trainer_without_reference_is_a_usage_error(
    family: dict[str, Path], tmp_path: Path
) -> None:
    soup = load_reference(family["sft2"])
    with pytest.raises(UsageError, match="beta = 0"):
        use_reference(_online_trainer("grpo", family, tmp_path / "a", beta=0.0), soup)
    with pytest.raises(UsageError, match="sync_ref_model"):
        use_reference(_online_trainer("grpo", family, tmp_path / "b", sync_ref_model=True), soup)


def test_dpo_with_a_soup_reference(family: dict[str, Path], tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    soup = load_reference(build_soup_reference([family["sft1"], family["sft2"]], tmp_path / "s"))
    data = Dataset.from_list(
        [{"prompt": p, "chosen": " good answer", "rejected": " bad"} for p in PROMPTS]
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        max_length=32,
    )

    def make(ref_model: torch.nn.Module | None) -> DPOTrainer:
        return DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(family["sft1"], dtype=torch.float32),
            ref_model=ref_model,
            args=args,
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(family["sft1"]),
        )

    trainer = make(soup)  # DPO takes the soup directly
    trainer.train()
    _assert_same_weights(trainer.ref_model, soup)
    late = make(None)  # or the adapter puts it in after construction
    use_reference(late, soup)
    _assert_same_weights(late.ref_model, soup)
    assert not torch.equal(late.model.lm_head.weight, soup.lm_head.weight)
