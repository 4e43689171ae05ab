"""Training runs on the tiny family: losses move, resume equals an uninterrupted run, the final
model loads; and the pieces (rewards, data, held-out measures, optimizer wiring) on their own."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mergekit_rl.errors import InputNotFoundError, OutputExistsError, UsageError
from mergekit_rl.train import evaluate, rewards
from mergekit_rl.train.data import load_train_dataset, read_records, truncate_prompts
from mergekit_rl.train.recipe import (
    DatasetSpec,
    KeywordReward,
    LengthReward,
    RegexReward,
    RewardSpec,
    parse_train_recipe,
)
from mergekit_rl.train.run import TrainOptions, make_optimizer, train, unique_tensors
from tests.conftest import load_state

DATA = Path(__file__).resolve().parents[2] / "recipes" / "train" / "data"


def dpo_text(family: dict[str, Path], out: Path, **training: object) -> str:
    doc = {
        "algorithm": "dpo",
        "policy": str(family["sft1"]),
        "base": str(family["base"]),
        "optimizer": {"name": "ondare", "reserve_p": 0.5, "alpha": 1e-4},
        "dataset": {"path": str(DATA / "prefs.jsonl")},
        "training": {
            "output_dir": str(out),
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "max_steps": 4,
            "batch_size": 4,
            "max_length": 48,
            "save_steps": 2,
            **training,
        },
    }
    return yaml.safe_dump(doc)


def sampling_doc(algorithm: str, family: dict[str, Path], out: Path, reward: dict) -> dict:
    """One step of GRPO / RLOO on 2 prompts x 2 completions of 4 tokens."""
    return {
        "algorithm": algorithm,
        "policy": str(family["sft1"]),
        "dataset": {"path": str(DATA / "prompts.jsonl")},
        "reward": reward,
        "training": {
            "output_dir": str(out),
            "max_steps": 1,
            "batch_size": 2,
            "num_generations": 2,
            "max_completion_length": 4,
            "learning_rate": 1e-3,
        },
    }


def run(text: str, **opts: object) -> None:
    train(parse_train_recipe(text, "r.yaml"), text, TrainOptions(echo=lambda s: None, **opts))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow  # trains end to end with a TRL trainer
def test_dpo_ondare_loss_moves_and_final_model_loads(family: dict[str, Path], tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    text = dpo_text(family, out)
    run(text)
    logged = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.05  # the preference is being learned
    assert all("lr" in m and "rewards/margins" in m for m in logged)

    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    start = load_state(family["sft1"])
    got = {k: v for k, v in model.state_dict().items() if k in start}
    assert any(not torch.equal(got[k], start[k]) for k in start)  # trained
    assert (final / "rlmerge_recipe.yaml").read_text() == text
    card = (final / "README.md").read_text()
    assert "## Recipe" in card and "ondare" in card
    assert (final / "tokenizer.json").is_file()


def test_resumed_run_equals_uninterrupted_run(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = dpo_text(family, out)
    run(text)  # steps 1-4, checkpoints at 2 and 4
    full = load_state(out / "final")
    # pretend the run died after step 2's checkpoint
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    run(text, resume=True)
    resumed = load_state(out / "final")
    assert set(resumed) == set(full)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4]  # the log is cut after step 2, then steps 3-4 logged anew


def test_trainer_steps_with_online_merging(family: dict[str, Path], tmp_path: Path) -> None:
    """Oracle through the whole pipeline: with lr = 0 the Adam part is zero, so after T steps
    OnDARE(reserve_p=1) has added exactly T * alpha * (sft1 - base) to every weight."""
    doc = yaml.safe_load(dpo_text(family, tmp_path / "run", learning_rate=0.0, max_steps=3))
    doc["optimizer"] = {"name": "ondare", "reserve_p": 1.0, "alpha": 0.01, "tau_dtype": "float32"}
    doc["optimizer"]["clip_val"] = 100.0
    text = yaml.safe_dump(doc)
    run(text)
    got = load_state(tmp_path / "run" / "final")
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    for k in sft:
        torch.testing.assert_close(got[k], sft[k] + 0.03 * (sft[k] - base[k]), atol=1e-6, rtol=0)


def test_restart_needs_resume_or_force(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = dpo_text(family, out, max_steps=1, save_steps=1)
    with pytest.raises(UsageError, match="no checkpoint"):
        run(text, resume=True)
    run(text)
    with pytest.raises(OutputExistsError, match="--resume"):
        run(text)
    shutil.rmtree(out / "final")
    run(text, force=True)  # starts over
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1]


def test_rloo_with_a_reference_checkpoint_and_output_option(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    reward = {"keyword": {"words": ["soup"]}, "length": {"target": 4, "weight": 0.5}}
    doc = sampling_doc("rloo", family, tmp_path / "run", reward)
    doc["reference"] = str(family["sft2"])
    text = yaml.safe_dump(doc)
    run(text, output=tmp_path / "model")
    assert not (tmp_path / "run" / "final").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    (record,) = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert {"rewards/keyword/mean", "rewards/length/mean", "kl"} <= set(record)


def test_tied_bf16_policy_stays_tied_and_bf16(tied_family: dict[str, Path], tmp_path: Path):
    from transformers import AutoModelForCausalLM

    text = dpo_text(tied_family, tmp_path / "run", max_steps=1, save_steps=None)
    run(text)
    final = tmp_path / "run" / "final"
    got, start = load_state(final), load_state(tied_family["sft1"])
    assert set(got) == set(start) and "lm_head.weight" not in got  # stored once, as before
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_grpo_with_a_reward_model_and_a_python_reward(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(family["base"], num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(family["base"]).save_pretrained(tmp_path / "rm")
    (tmp_path / "my_rewards.py").write_text(
        "calls = []\n"
        "def shout(prompts, completions, **kw):\n"
        "    calls.append(len(completions))\n"
        "    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = {
        "model": {"path": str(tmp_path / "rm")},
        "function": {"call": "my_rewards:shout", "weight": 0.5},
    }
    doc = sampling_doc("grpo", family, tmp_path / "run", reward)
    text = yaml.safe_dump(doc)
    recipe = parse_train_recipe(text, "r.yaml", allow_code=True)
    train(recipe, text, TrainOptions(echo=lambda s: None))
    import my_rewards  # type: ignore[import-not-found]

    assert my_rewards.calls == [2]  # one batch of 2 completions scored
    (record,) = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert record["rewards/shout/mean"] == 1.0 and "rewards/rm/mean" in record


@pytest.mark.slow  # trains end to end with a TRL trainer
def test_dpo_with_elastic_reset_and_an_ema_anchor(family: dict[str, Path], tmp_path: Path):
    doc = yaml.safe_load(dpo_text(family, tmp_path / "run", max_steps=2, save_steps=None))
    doc["elastic_reset"] = {"ema_decay": 0.5, "reset_every": 2, "kl_anchor": "ema"}
    text = yaml.safe_dump(doc)
    run(text)
    resets = [m["elastic/num_resets"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert resets == [0, 1]


def test_deepspeed_with_online_merging_is_refused(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UsageError, match="ACCELERATE_USE_DEEPSPEED: DeepSpeed ZeRO"):
        run(dpo_text(family, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_optimizer_gets_tau_from_the_policy_and_base(family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    doc = yaml.safe_load(dpo_text(family, Path("unused")))
    doc["optimizer"] = {"name": "onties", "reserve_p": 1.0, "tau_dtype": "float32", "lr": 1e-3}
    recipe = parse_train_recipe(yaml.safe_dump(doc), "r")
    model = AutoModelForCausalLM.from_pretrained(family["sft1"])
    opt = make_optimizer(recipe, model, decay_names=[])
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    for name, p in model.named_parameters():
        tau = opt.state[p]["tau"]
        torch.testing.assert_close(tau, (sft[name] - base[name]).reshape(tau.shape), msg=name)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.mode == "onties"


def test_unique_tensors_drops_tied_twins() -> None:
    emb = torch.zeros(4, 2)
    state = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(2)}
    assert list(unique_tensors(state)) == ["embed.weight", "norm.weight"]


# -- rewards ---------------------------------------------------------------------------------


def test_builtin_rewards() -> None:
    texts = [
        "Merge the soup, merge again",
        "nothing here",
        [{"role": "assistant", "content": "a soup"}],
    ]
    count = rewards.keyword_reward(KeywordReward(words=["merge", "soup"], mode="count"))
    assert count([], texts) == [3.0, 0.0, 1.0]
    presence = rewards.keyword_reward(KeywordReward(words=["MERGE"], case_sensitive=True))
    assert presence([], texts) == [0.0, 0.0, 0.0]
    regex = rewards.regex_reward(RegexReward(pattern=r"^noth"))
    assert regex([], texts) == [0.0, 1.0, 0.0]
    length = rewards.length_reward(LengthReward(target=4, penalty=2.0))
    assert length([], ["x"] * 3, completion_ids=[[1] * 4, [1] * 2, [1] * 10]) == [0.0, -1.0, -3.0]
    assert length([], ["one two", "a b c d"]) == [-1.0, 0.0]  # words when no ids


def test_build_rewards_order_weights_and_score() -> None:
    spec = RewardSpec.model_validate(
        {
            "length": {"target": 2, "weight": 0.5},
            "keyword": {"words": ["a"], "weight": 2.0},
            "model": {"path": "rm"},
        }
    )
    funcs, weights = rewards.build_rewards(spec)
    assert [getattr(f, "__name__", f) for f in funcs] == ["keyword", "length", "rm"]
    assert weights == [2.0, 0.5, 1.0]
    # 2 * [a present] + 0.5 * (-|n - 2| / 2); the reward model (a path) is loaded by the caller
    got = rewards.score(funcs[:2], weights[:2], ["p", "p"], ["a b", "c"], [[1, 2], [1, 2, 3, 4]])
    assert got == [2.0, -0.5]


def test_python_reward_import_errors() -> None:
    assert rewards.import_function("math:sqrt") is math.sqrt
    with pytest.raises(UsageError, match="cannot be imported"):
        rewards.import_function("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="not callable"):
        rewards.import_function("math:pi")


# -- data ------------------------------------------------------------------------------------


def test_load_dataset_renames_checks_and_limits(tmp_path: Path) -> None:
    ds = load_train_dataset(DatasetSpec(path=str(DATA / "prefs.jsonl"), max_examples=5), "dpo")
    assert len(ds) == 5 and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    with pytest.raises(UsageError, match=r"lacks column\(s\) \['completion', 'label'\]"):
        load_train_dataset(DatasetSpec(path=str(DATA / "prefs.jsonl")), "kto")
    renamed = DatasetSpec(path=str(DATA / "prefs.jsonl"), columns={"chosen": "completion"})
    with pytest.raises(UsageError, match="'label'"):
        load_train_dataset(renamed, "kto")
    with pytest.raises(UsageError, match="renames"):
        load_train_dataset(DatasetSpec(path=str(DATA / "prefs.jsonl"), columns={"x": "y"}), "dpo")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UsageError, match="unknown file type"):
        load_train_dataset(DatasetSpec(path=str(tmp_path / "d.txt")), "grpo")
    with pytest.raises(InputNotFoundError, match="dataset.path"):
        load_train_dataset(DatasetSpec(path=str(tmp_path / "missing.jsonl")), "grpo")


def test_truncate_prompts_keeps_the_end(family: dict[str, Path]) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["sft1"])
    long = "the policy model learns from human preferences"
    ds = truncate_prompts(Dataset.from_list([{"prompt": long}, {"prompt": "a"}]), tok, 3)
    ids = tok(long, add_special_tokens=False)["input_ids"]
    assert ds[0]["prompt"] == tok.decode(ids[-3:]) and ds[1]["prompt"] == "a"


def test_read_records(tmp_path: Path) -> None:
    got = read_records(DATA / "prompts.jsonl", "p", "prompt", limit=2)
    assert got == [
        {"prompt": "Tell me about merging weights."},
        {"prompt": "Describe the reward model."},
    ]
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert read_records(tmp_path / "t.txt", "t", "text") == [{"text": "one"}, {"text": "two"}]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(UsageError, match="line 1"):
        read_records(tmp_path / "bad.jsonl", "evaluation.prompts", "prompt")


# -- held-out measures -----------------------------------------------------------------------


def test_perplexity_and_kl_against_independent_references(family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["sft1"])
    policy = AutoModelForCausalLM.from_pretrained(family["sft1"]).eval()
    other = AutoModelForCausalLM.from_pretrained(family["rlhf"]).eval()
    texts = ["a reward model scores each answer", "merging weights keeps the tax small"]
    # reference: HF's own mean loss, token-weighted across texts
    losses, counts = [], []
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        losses.append(policy(input_ids=ids, labels=ids).loss.item())
        counts.append(ids.shape[1] - 1)
    want = math.exp(sum(x * n for x, n in zip(losses, counts, strict=True)) / sum(counts))
    docs = [tok(t)["input_ids"] for t in texts]
    assert evaluate.perplexity(policy, docs, 64) == pytest.approx(want, rel=1e-5)

    done = evaluate.greedy_completions(policy, tok, [tok("the policy")["input_ids"]], 5)
    assert done[0].completion_ids.numel() == 5
    assert evaluate.kl_to(policy, policy, done) == pytest.approx(0.0, abs=1e-6)
    seq = torch.cat([done[0].prompt_ids, done[0].completion_ids])[None]
    n = done[0].prompt_ids.numel()
    with torch.no_grad():
        logp = F.log_softmax(policy(input_ids=seq).logits[0, n - 1 : -1], -1)
        logq = F.log_softmax(other(input_ids=seq).logits[0, n - 1 : -1], -1)
    want_kl = F.kl_div(logq, logp, log_target=True, reduction="sum").item()
    got_kl = evaluate.kl_to(policy, other, done)
    assert got_kl > 0 and got_kl == pytest.approx(want_kl, rel=1e-4)


# -- the final model's dtypes ----------------------------------------------------------------


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance from |x| (bf16 values, as float32) to the next bf16 number above it."""
    a = x.float().abs()
    return (a.view(torch.int32) + (1 << 16)).view(torch.float32) - a


def test_the_final_write_keeps_sub_ulp_movement_in_expectation() -> None:
    from mergekit_rl.train.run import saved_tensor

    gen = torch.Generator().manual_seed(0)
    policy = (torch.randn(200_000, generator=gen) * 0.05).bfloat16().float()
    direction = torch.randint(0, 2, policy.shape, generator=gen).float() * 2 - 1
    step = 0.1 * bf16_spacing(policy)  # a fifth of half an ulp: below what nearest keeps
    trained = policy + direction * step  # float32 training moved every weight this much
    assert torch.equal(trained.bfloat16().float(), policy)  # rounding to nearest loses it all
    saved = saved_tensor("model.w", trained, torch.bfloat16, seed=3)
    assert saved.dtype == torch.bfloat16
    kept = float(((saved.float() - policy) * direction).sum() / (step.sum()))
    assert abs(kept - 1.0) < 0.03, kept  # the movement survives on average
    # unbiased entry by entry: over seeds, the mean saved weight is the trained one
    few = trained[:40]
    runs = torch.stack(
        [saved_tensor("w", few, torch.bfloat16, seed=s).float() for s in range(1000)]
    )
    err = (runs.mean(0) - few).abs() / bf16_spacing(policy[:40])
    assert float(err.max()) < 0.05, float(err.max())  # 5 standard deviations
    # reproducible, keyed by the seed and the tensor name
    assert torch.equal(saved_tensor("model.w", trained, torch.bfloat16, 3), saved)
    assert not torch.equal(saved_tensor("model.v", trained, torch.bfloat16, 3), saved)
    assert not torch.equal(saved_tensor("model.w", trained, torch.bfloat16, 4), saved)
    # casts that lose nothing stay casts
    assert torch.equal(saved_tensor("w", trained, torch.float32, 3), trained)
    assert torch.equal(saved_tensor("w", saved, torch.bfloat16, 3), saved)
    ids = torch.arange(5)
    assert torch.equal(saved_tensor("ids", ids, torch.int64, 3), ids)


def test_final_model_of_float32_training_on_a_bf16_policy(
    tied_family: dict[str, Path], tmp_path: Path
) -> None:
    # the default writes the policy's bf16, rounded stochastically from the float32 training;
    # output_dtype float32 writes what training ended with
    from transformers import AutoModelForCausalLM

    from mergekit_rl.train.run import saved_tensor

    finals = {}
    for output_dtype in ("float32", "policy"):
        out = tmp_path / output_dtype
        run(dpo_text(tied_family, out, max_steps=2, save_steps=None, output_dtype=output_dtype))
        finals[output_dtype] = load_state(out / "final")
    policy = load_state(tied_family["sft1"])
    trained, written = finals["float32"], finals["policy"]
    assert trained.keys() == written.keys() == policy.keys()
    moved = 0
    for name, t in trained.items():
        assert t.dtype == torch.float32 and written[name].dtype == torch.bfloat16, name
        want = saved_tensor(name, t, torch.bfloat16, seed=0)
        assert torch.equal(written[name].view(torch.int16), want.view(torch.int16)), name
        moved += int((written[name] != policy[name]).sum())
    assert moved > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float32" / "final")
    assert next(model.parameters()).dtype == torch.float32
