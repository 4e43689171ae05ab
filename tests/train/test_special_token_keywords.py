"""A keyword that is a special token of the policy's tokenizer (`<answer>` registered with
add_tokens(special_tokens=True)): TRL, eval and held-out evaluation decode completions without
special tokens, so the tag is not in the text they score; the keyword reward decodes the
completion's ids again with the special tokens its words name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergekit_rl.lab import evaluate as ev
from mergekit_rl.train import evaluate, rewards
from mergekit_rl.train.callbacks import EvalCallback, MetricsLog
from mergekit_rl.train.recipe import KeywordReward, parse_train_recipe
from tests.train.test_evaluation import grpo_recipe, jsonl
from tests.train.test_run import sampling_doc

REWARD = {"keyword": {"words": ["<answer>", "</answer>"], "mode": "count"}}
TEXTS = ["the soup <answer> 4 </answer>", "no tags here", "<answer> soup"]
WANT = [2.0, 0.0, 1.0]  # tags per completion; the eos appended to each is dropped


@pytest.fixture
def answer_tokenizer(family: dict[str, Path]) -> Any:
    """The tiny family's tokenizer with <answer> and </answer> registered as special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["sft1"])
    assert tok.add_tokens(["<answer>", "</answer>"], special_tokens=True) == 2
    return tok


def completions(tok: Any) -> tuple[list[list[int]], list[str]]:
    """Each text's ids with eos appended, and the text as TRL decodes it (no special tokens)."""
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in TEXTS]
    return ids, tok.batch_decode(ids, skip_special_tokens=True)


def test_keyword_reward_keeps_the_special_tokens_its_words_name(answer_tokenizer: Any) -> None:
    tok = answer_tokenizer
    ids, decoded = completions(tok)
    assert "<answer>" not in decoded[0]  # what TRL scores: the tag is gone
    spec = KeywordReward(words=["<answer>", "</answer>"], mode="count")
    assert rewards.keyword_reward(spec)([], decoded, completion_ids=ids) == [0.0, 0.0, 0.0]
    got = rewards.keyword_reward(spec, tok)([], decoded, completion_ids=ids)
    assert got == WANT
    # a special token is kept only where a word names it: eos when named, not for "soup"
    eos = rewards.keyword_reward(KeywordReward(words=["<|eos|>"], mode="count"), tok)
    assert eos([], decoded, completion_ids=ids) == [1.0, 1.0, 1.0]
    soup = rewards.keyword_reward(KeywordReward(words=["soup"], mode="count"), tok)
    assert soup([], decoded, completion_ids=ids) == [1.0, 0.0, 1.0]


def test_training_rewards_see_special_token_keywords(
    family: dict[str, Path], answer_tokenizer: Any, tmp_path: Path
) -> None:
    """The GRPO trainer `rlmerge train` builds, scoring completions as TRL 1.16 does."""
    from transformers import AutoModelForCausalLM

    from mergekit_rl.train.data import load_train_dataset
    from mergekit_rl.train.run import build_trainer

    tok = answer_tokenizer
    recipe = parse_train_recipe(
        yaml.safe_dump(sampling_doc("grpo", family, tmp_path / "run", REWARD)), "r.yaml"
    )
    model = AutoModelForCausalLM.from_pretrained(family["sft1"])
    dataset = load_train_dataset(recipe.dataset, "grpo")
    trainer = build_trainer(recipe, model, tok, dataset, None, [], 1)
    ids, decoded = completions(tok)
    inputs = [{"prompt": "p"} for _ in TEXTS]
    got = trainer._calculate_rewards(inputs, ["p"] * len(TEXTS), decoded, ids)  # [N, funcs]
    assert got[:, 0].tolist() == WANT


def test_heldout_evaluation_sees_special_token_keywords(
    family: dict[str, Path], answer_tokenizer: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tok = answer_tokenizer
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "p"} for _ in TEXTS])
    recipe = grpo_recipe(family, tmp_path, REWARD, {"prompts": str(prompts), "kl": False})
    callback = EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print))
    ids, decoded = completions(tok)
    prompt = torch.tensor(tok("p").input_ids)
    done = [
        evaluate.Completion(prompt, torch.tensor(i), t) for i, t in zip(ids, decoded, strict=True)
    ]
    model = AutoModelForCausalLM.from_pretrained(family["sft1"])
    assert callback._mean_reward(model, tok, done, {}) == pytest.approx(sum(WANT) / len(WANT))


def test_eval_sees_special_token_keywords(answer_tokenizer: Any) -> None:
    tok = answer_tokenizer
    ids, decoded = completions(tok)
    got = ev.Samples(["p"] * len(TEXTS), [0] * len(TEXTS), decoded, ids)
    data = ev.Prompts(["p"], {}, "p.jsonl")
    assert ev.Scorer(REWARD, "cpu", False).samples(got, data, tok) == WANT
