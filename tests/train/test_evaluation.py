"""Issue 12: what held-out evaluation, rewards and the data helpers feed and log. Each test
names the item it covers; all failed on the code before the fix (commit 2e0952a)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mergekit_rl.errors import UsageError
from mergekit_rl.train import evaluate, rewards
from mergekit_rl.train.callbacks import EvalCallback, MetricsLog
from mergekit_rl.train.data import load_train_dataset, prompt_ids, read_records, truncate_prompts
from mergekit_rl.train.recipe import DatasetSpec, KeywordReward, parse_train_recipe
from tests.conftest import load_state
from tests.train.test_run import DATA, dpo_text, metrics, run

REPO = Path(__file__).resolve().parents[2]


def tokenizer_and_model(family: dict[str, Path]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family["sft1"])
    return tok, AutoModelForCausalLM.from_pretrained(family["sft1"]).eval()


def grpo_recipe(family: dict[str, Path], tmp: Path, reward: dict, evaluation: dict, **training):
    doc = {
        "algorithm": "grpo",
        "policy": str(family["sft1"]),
        "dataset": {"path": str(DATA / "prompts.jsonl")},
        "reward": reward,
        "training": {"output_dir": str(tmp / "run"), "batch_size": 2, "num_generations": 2},
        "evaluation": {"max_new_tokens": 4, **evaluation},
    }
    doc["training"].update(training)
    return parse_train_recipe(yaml.safe_dump(doc), "r.yaml", allow_code=True)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- 1: keyword edges ------------------------------------------------------------------------


def test_keywords_with_non_word_edges_match() -> None:
    words = ["<answer>", "</think>", "C++", "merge"]
    count = rewards.keyword_reward(KeywordReward(words=words, mode="count"))
    texts = ["</think> in C++: <answer>42</answer>", "we merged, then merge", "c++ and <ANSWER>"]
    # a word edge still needs a boundary ("merged" is not "merge"); case-insensitive by default
    assert count([], texts) == [3.0, 1.0, 2.0]


# -- 2: reward models are scored ---------------------------------------------------------------


def test_eval_reward_scores_a_reward_model(family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaForSequenceClassification,
    )

    config = AutoConfig.from_pretrained(family["base"], num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(family["base"]).save_pretrained(tmp_path / "rm")
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "a reward"}, {"prompt": "merging the soup"}])
    reward = {"model": {"path": str(tmp_path / "rm"), "weight": 2.0}}
    recipe = grpo_recipe(family, tmp_path, reward, {"prompts": str(prompts), "kl": False})
    tok, model = tokenizer_and_model(family)
    got = EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print)).measure(model, tok)

    # reference: each prompt + its greedy completion scored alone (no padding), weight 2
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    want = []
    for p in ["a reward", "merging the soup"]:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        text = p + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        with torch.no_grad():
            want.append(2.0 * rm(**tok(text, return_tensors="pt")).logits[0, 0].item())
    assert want[0] != 0.0
    assert got["eval/reward"] == pytest.approx(sum(want) / 2, rel=1e-5)


# -- 3: dataset columns reach function rewards --------------------------------------------------


REWARDS_MODULE = """
calls = []
def correct(prompts, completions, answer, **kw):
    calls.append((list(prompts), list(answer), kw["trainer_state"]))
    return [float(a in c) for a, c in zip(answer, completions)]
"""


def test_eval_passes_dataset_columns_to_function_rewards(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "colrewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "colrewards", raising=False)
    rows = [{"prompt": "two plus two", "answer": "4"}, {"prompt": "a soup", "answer": "soup"}]
    prompts = jsonl(tmp_path / "p.jsonl", rows)
    reward = {"function": {"call": "colrewards:correct"}}
    recipe = grpo_recipe(family, tmp_path, reward, {"prompts": str(prompts), "kl": False})
    tok, model = tokenizer_and_model(family)
    out = EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print)).measure(
        model, tok, trainer_state="STATE"
    )
    import colrewards  # type: ignore[import-not-found]

    assert colrewards.calls == [(["two plus two", "a soup"], ["4", "soup"], "STATE")]
    assert 0.0 <= out["eval/reward"] <= 1.0

    # a held-out file without the column is refused when the callback is built (start-up)
    bare = jsonl(tmp_path / "bare.jsonl", [{"prompt": "x"}])
    recipe = grpo_recipe(family, tmp_path, reward, {"prompts": str(bare)})
    with pytest.raises(UsageError, match=r"correct.*\['answer'\].*bare.jsonl"):
        EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print))
    # and so is a training dataset without it (TRL would fail at step 1)
    with pytest.raises(UsageError, match=r"\['answer'\].*dataset.path"):
        rewards.check_columns([colrewards.correct], ["prompt"], "dataset.path prompts.jsonl")


# -- 4: conversational eval prompts -------------------------------------------------------------


def test_conversational_eval_prompts_use_the_chat_template(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a soup?"}]
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": chat}])
    seen: list = []
    original = evaluate.greedy_completions

    def spy(model, tokenizer, prompts, max_new_tokens):  # noqa: ANN001, ANN202
        seen.append([list(p) for p in prompts])
        return original(model, tokenizer, prompts, max_new_tokens)

    monkeypatch.setattr(evaluate, "greedy_completions", spy)
    got: list = []

    def record(prompts, completions, **kw):  # noqa: ANN001, ANN202
        got.append(completions)
        return [1.0] * len(completions)

    recipe = grpo_recipe(family, tmp_path, {"keyword": {"words": ["x"]}}, {"prompts": str(prompts)})
    tok, model = tokenizer_and_model(family)
    cb = EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print))
    cb.funcs, cb.weights = [record], [1.0]
    cb.measure(model, tok)
    templated = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert templated.startswith("system: be brief\nuser: a soup?\nassistant:")
    assert seen == [[tok(templated, add_special_tokens=False)["input_ids"]]]
    # completions of chat prompts reach reward functions as assistant messages, as in TRL
    assert got[0][0][0]["role"] == "assistant" and isinstance(got[0][0][0]["content"], str)


# -- 5: prompt truncation ------------------------------------------------------------------------


def test_truncation_cuts_at_token_boundaries_within_the_limit(family: dict[str, Path]) -> None:
    from datasets import Dataset

    tok, _ = tokenizer_and_model(family)
    text = "Quel est le …résumé?"
    (cut,) = truncate_prompts(Dataset.from_list([{"prompt": text}]), tok, 7)["prompt"]
    assert "\ufffd" not in cut and text.endswith(cut)
    assert len(prompt_ids(tok, cut)) <= 7
    # the longest such suffix: one more character no longer fits
    longer = text[len(text) - len(cut) - 1 :]
    assert len(prompt_ids(tok, longer)) > 7


def test_truncation_of_chat_prompts_keeps_the_template(family: dict[str, Path]) -> None:
    from datasets import Dataset

    tok, _ = tokenizer_and_model(family)
    chat = [
        {"role": "system", "content": "answer in one line"},
        {"role": "user", "content": "the policy model learns from human preferences, so what?"},
    ]
    ds = Dataset.from_list([{"prompt": chat, "chosen": [{"role": "assistant", "content": "ok"}]}])
    (got,) = truncate_prompts(ds, tok, 50)["prompt"]
    assert got[0] == chat[0] and got[1]["role"] == "user"
    assert chat[1]["content"].endswith(got[1]["content"]) and got[1]["content"]
    assert len(prompt_ids(tok, got)) <= 50
    rendered = tok.apply_chat_template(got, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("system: answer in one line\nuser: ")
    with pytest.raises(UsageError, match="template and other turns"):
        truncate_prompts(ds, tok, 10)


def test_dpo_trains_on_conversational_data_with_max_prompt_length(
    family: dict[str, Path], tmp_path: Path
) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"] * 3}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in read_records(DATA / "prefs.jsonl", "prefs", "prompt")
    ]
    data = jsonl(tmp_path / "chat.jsonl", rows)
    doc = yaml.safe_load(dpo_text(family, tmp_path / "run", max_steps=1, save_steps=None))
    doc["dataset"] = {"path": str(data)}
    doc["training"].update(max_prompt_length=40, max_length=200)
    run(yaml.safe_dump(doc))
    (record,) = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert math.isfinite(record["loss"])


# -- 6: perplexity window -----------------------------------------------------------------------


def test_sliding_window_perplexity_scores_every_token_once(family: dict[str, Path]) -> None:
    tok, model = tokenizer_and_model(family)
    ids = tok("elastic reset moves the policy back to its moving average")["input_ids"]
    T, W, S = len(ids), 16, 8
    assert T > 3 * W
    # reference: token t predicted from the window that first reaches it (starts at j * S)
    nll = 0.0
    for t in range(1, T):
        j = next(j for j in range(T) if j * S + W > t)
        ctx = torch.tensor([ids[j * S : t]])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ctx).logits[0, -1], -1)
        nll -= logp[ids[t]].item()
    assert evaluate.perplexity(model, [ids], W) == pytest.approx(math.exp(nll / (T - 1)), rel=1e-5)


def test_eval_perplexity_uses_the_model_context_not_training_max_length(
    family: dict[str, Path], tmp_path: Path
) -> None:
    doc = "the policy model learns from human preferences and merging weights keeps the tax small"
    (tmp_path / "held.txt").write_text(doc + "\n")
    text = yaml.safe_load(dpo_text(family, tmp_path / "run", max_length=8))
    text["evaluation"] = {"perplexity_text": str(tmp_path / "held.txt")}
    recipe = parse_train_recipe(yaml.safe_dump(text), "r.yaml")
    tok, model = tokenizer_and_model(family)
    ids = tok(doc, return_tensors="pt")["input_ids"]
    assert 8 < ids.shape[1] <= model.config.max_position_embeddings
    with torch.no_grad():
        want = math.exp(model(input_ids=ids, labels=ids).loss.item())  # every token scored
    got = EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print)).measure(model, tok)
    assert got["eval/perplexity"] == pytest.approx(want, rel=1e-5)


# -- 7, 8: eval records under their step, kept on resume ------------------------------------------


def eval_doc(family: dict[str, Path], out: Path, every: int, logging: int, **training) -> str:
    doc = yaml.safe_load(dpo_text(family, out, logging_steps=logging, **training))
    doc["evaluation"] = {
        "perplexity_text": str(DATA / "heldout.txt"),
        "kl": False,
        "eval_every": every,
        "max_examples": 1,
    }
    return yaml.safe_dump(doc)


def eval_steps(out: Path) -> list[int]:
    return [m["step"] for m in metrics(out) if "eval/perplexity" in m]


@pytest.mark.slow  # trains end to end with a TRL trainer
def test_eval_records_carry_the_step_they_measured(family: dict[str, Path], tmp_path: Path):
    run(eval_doc(family, tmp_path / "a", every=3, logging=2, save_steps=None))
    assert eval_steps(tmp_path / "a") == [3]
    run(eval_doc(family, tmp_path / "b", every=1, logging=4, save_steps=None))
    assert eval_steps(tmp_path / "b") == [1, 2, 3, 4]  # none overwritten by the next


@pytest.mark.slow  # trains end to end with a TRL trainer
def test_resume_keeps_eval_records(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = eval_doc(family, out, every=2, logging=3, save_steps=2)
    run(text)
    full = load_state(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    run(text, resume=True)
    assert eval_steps(out) == [2, 4]
    resumed = load_state(out / "final")  # evaluating drew no random numbers
    assert all(torch.equal(resumed[k], full[k]) for k in full)


# -- 9: a partial last line of metrics.jsonl -------------------------------------------------------


def test_resume_drops_a_partial_last_metrics_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        MetricsLog(path, print, resumed_at=2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UsageError, match="line 2"):
        MetricsLog(path, print, resumed_at=2)


# -- 10: shipped held-out data is held out ------------------------------------------------------


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def test_shipped_eval_files_are_held_out() -> None:
    for recipe_path in sorted((REPO / "recipes" / "train").glob("*.yaml")):
        doc = yaml.safe_load(recipe_path.read_text())
        ev = doc.get("evaluation")
        if not ev:
            continue
        data = (
            REPO
            / "recipes"
            / "train"
            / Path(doc["dataset"]["path"]).relative_to("../recipes/train")
        )
        train_rows = read_records(data, "train", "prompt")
        train_text = [" ".join(str(v) for v in r.values()) for r in train_rows]
        if "prompts" in ev:
            held = REPO / "recipes" / "train" / Path(ev["prompts"]).relative_to("../recipes/train")
            shared = {r["prompt"] for r in read_records(held, "p", "prompt")}
            assert not shared & {r["prompt"] for r in train_rows}, recipe_path.name
        if "perplexity_text" in ev:
            held = (
                REPO
                / "recipes"
                / "train"
                / Path(ev["perplexity_text"]).relative_to("../recipes/train")
            )
            # no held-out document shares four consecutive words with any training example
            grams = {
                tuple(w[i : i + 4]) for t in train_text for w in [words(t)] for i in range(len(w))
            }
            for r in read_records(held, "h", "text"):
                w = words(r["text"])
                assert not {tuple(w[i : i + 4]) for i in range(len(w) - 3)} & grams, r["text"]


def test_overlapping_eval_prompts_warn(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = grpo_recipe(
        family, tmp_path, {"keyword": {"words": ["x"]}}, {"prompts": str(DATA / "prompts.jsonl")}
    )
    train_prompts = [r["prompt"] for r in read_records(DATA / "prompts.jsonl", "d", "prompt")]
    with pytest.warns(UserWarning, match="12 of 12 eval prompts are also training prompts"):
        EvalCallback(recipe, MetricsLog(tmp_path / "m.jsonl", print), train_prompts)


# -- where cheap: dataset.split for local files, .json held-out files -----------------------------


def test_local_dataset_split_is_honoured() -> None:
    prefs = str(DATA / "prefs.jsonl")
    assert len(load_train_dataset(DatasetSpec(path=prefs, split="train[:3]"), "dpo")) == 3
    assert len(load_train_dataset(DatasetSpec(path=prefs, split="train[10:]"), "dpo")) == 2
    with pytest.raises(UsageError, match="dataset.split 'test'.*one split"):
        load_train_dataset(DatasetSpec(path=prefs, split="test"), "dpo")


def test_json_eval_files_are_parsed(tmp_path: Path) -> None:
    rows = [{"prompt": "one", "answer": "1"}, {"prompt": [{"role": "user", "content": "two"}]}]
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
    assert read_records(tmp_path / "p.json", "evaluation.prompts", "prompt") == rows
    jsonl(tmp_path / "lines.json", rows)  # JSON lines in a .json file, as datasets reads it
    assert read_records(tmp_path / "lines.json", "evaluation.prompts", "prompt") == rows
    (tmp_path / "one.json").write_text(json.dumps({"prompt": rows}, indent=2))
    with pytest.raises(UsageError, match="one.json: expected a list of objects or JSON lines"):
        read_records(tmp_path / "one.json", "evaluation.prompts", "prompt")


def test_train_warns_on_overlap_and_refuses_missing_reward_columns(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = yaml.safe_load(dpo_text(family, tmp_path / "a", max_steps=1, save_steps=None))
    # the first two training prompts, longer than max_prompt_length: compared uncut
    rows = read_records(DATA / "prefs.jsonl", "prefs", "prompt")[:2]
    doc["evaluation"] = {"prompts": str(jsonl(tmp_path / "p.jsonl", rows)), "eval_every": 50}
    doc["training"]["max_prompt_length"] = 5
    with pytest.warns(UserWarning, match="2 of 2 eval prompts are also training prompts"):
        run(yaml.safe_dump(doc))

    (tmp_path / "colrewards2.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = grpo_recipe(
        family, tmp_path, {"function": {"call": "colrewards2:correct"}}, {}, max_steps=1
    )
    with pytest.raises(UsageError, match=r"\['answer'\].*dataset.path .*prompts.jsonl"):
        from mergekit_rl.train.run import TrainOptions, train

        train(recipe, "", TrainOptions(echo=lambda s: None))
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # nothing trained
