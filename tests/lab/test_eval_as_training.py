"""`rlmerge eval` measures what training measures, on a tokenizer that adds BOS and has no pad
token: prompt encoding, reward-model scoring, reward functions with dataset columns, and the KL
of the distributions actually sampled from. Every expected value is computed here one sequence
at a time, without padding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from typer.testing import CliRunner

from mergekit_rl.errors import UsageError
from mergekit_rl.lab import evaluate as ev
from mergekit_rl.train import evaluate as train_eval
from mergekit_rl.train.data import prompt_ids
from tests.cli.envelope import check

from .conftest import bos_tokenizer

runner = CliRunner()
PROMPTS = ["the policy", "a reward model scores", "tax"]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["model", "each", "x"], strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _settings(prompts: Path, **kw) -> ev.EvalSettings:  # noqa: ANN003
    base = dict(prompts=str(prompts), reward={"sentiment": {}}, max_new_tokens=6, batch_size=2)
    return ev.EvalSettings(**(base | kw))


@torch.no_grad()
def test_prompts_are_encoded_as_training_feeds_them(bos_family, prompts_file) -> None:  # noqa: ANN001
    """Greedy eval completions equal training's held-out greedy completions (BOS included)."""
    tok, model = ev.load_model(str(bos_family["sft1"]), "cpu")
    fed = []
    generate = model.generate

    def spy(**kw):  # noqa: ANN003, ANN202
        fed.extend(
            row[mask.bool()].tolist()
            for row, mask in zip(kw["input_ids"], kw["attention_mask"], strict=True)
        )
        return generate(**kw)

    model.generate = spy
    got = ev.sample(model, tok, PROMPTS, _settings(prompts_file, temperature=0.0))
    want_ids = [tok(p).input_ids for p in PROMPTS]
    assert want_ids[0][0] == tok.bos_token_id
    assert fed == want_ids  # BOS first, no padding inside a prompt
    done = train_eval.greedy_completions(model, tok, [prompt_ids(tok, p) for p in PROMPTS], 6)
    eos = tok.eos_token_id
    want = []
    for c in done:  # up to and including the first eos, as eval keeps it
        ids = c.completion_ids.tolist()
        want.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
    assert got.ids == want


def test_chat_prompts_use_the_chat_template(bos_family, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "a soup"}]
    path.write_text(json.dumps({"prompt": chat}) + "\n")
    tok, model = ev.load_model(str(bos_family["sft1"]), "cpu")
    data = ev.read_prompts(path, "prompts file")
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert ev.encode(tok, data.prompts) == [list(want["input_ids"])]
    got = ev.sample(model, tok, data.prompts, _settings(path))
    assert got.completions[0] == [{"role": "assistant", "content": got.texts[0]}]


@torch.no_grad()
def test_perplexity_counts_the_bos_token(bos_family, prompts_file) -> None:  # noqa: ANN001
    tok, model = ev.load_model(str(bos_family["rlhf"]), "cpu")
    texts = ["the policy model learns", "a soup", "merging weights keeps the alignment tax small"]
    got = ev.perplexity(model, tok, texts, _settings(prompts_file, batch_size=2))
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids  # [1, T], BOS first
        assert ids[0, 0] == tok.bos_token_id
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    assert math.isclose(got, math.exp(nll / n), rel_tol=1e-4)


def _reward_model(path: Path, labels: int = 1) -> Path:
    from transformers import LlamaForSequenceClassification

    from mergekit_rl.tiny import tiny_config

    tok = bos_tokenizer()  # adds BOS, no pad token
    config = tiny_config(len(tok))
    config.num_labels = labels
    config.pad_token_id = None
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def test_model_reward_is_scored_as_trl_scores_it(tmp_path: Path) -> None:
    """TRL 1.16: prompt + completion, no added special tokens, one logit at the last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _reward_model(tmp_path / "rm")
    scorer = ev.Scorer({"model": {"path": str(path)}}, "cpu", False)
    prompts = ["the policy", "a", "tax"]
    completions = [" model learns from human preferences", " soup", " small"]
    got = scorer(prompts, completions, [[1]] * 3)  # one padded batch: no pad token to pad with
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    want = [  # one text at a time: no padding at all
        rm(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert got == pytest.approx(want, abs=1e-5)
    with_bos = rm(**tok(prompts[0] + completions[0], return_tensors="pt")).logits[0, 0].item()
    assert abs(with_bos - want[0]) > 1e-4  # the BOS would change the score


def test_multi_label_classifier_is_refused(tmp_path: Path) -> None:
    path = _reward_model(tmp_path / "clf", labels=3)
    with pytest.raises(UsageError, match=r"reward.model.path .* 3 labels"):
        ev.Scorer({"model": {"path": str(path)}}, "cpu", False)


def test_function_reward_gets_the_prompts_file_columns(
    family, prompts_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    (tmp_path / "myrewards.py").write_text(
        "def exact(prompts, completions, answer, **kw):\n"
        "    return [float(a in c) + len(a) for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    s = _settings(prompts_file, reward={"function": {"call": "myrewards:exact"}}, samples=2)
    s = ev.EvalSettings(**{**s.__dict__, "allow_code": True})
    row = ev.evaluate([str(family["sft1"])], s)[0]
    tok, model = ev.load_model(str(family["sft1"]), "cpu")
    got = ev.sample(model, tok, PROMPTS, s)
    answers = ["model", "model", "each", "each", "x", "x"]  # each prompt's column, per sample
    want = [float(a in c) + len(a) for c, a in zip(got.texts, answers, strict=True)]
    assert row["reward"] == pytest.approx(sum(want) / len(want))
    lacking = tmp_path / "plain.txt"
    lacking.write_text("the policy\n")
    with pytest.raises(UsageError, match=r"takes column\(s\) \['answer'\]"):
        ev.evaluate(
            [str(family["sft1"])], ev.EvalSettings(**{**s.__dict__, "prompts": str(lacking)})
        )


def _filtered(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Log-probabilities of logits / T with all but the k largest removed, via a full sort."""
    x = logits.double() / temperature
    if top_k:
        order = x.argsort(dim=-1, descending=True)
        drop = torch.ones_like(x, dtype=torch.bool)
        drop.scatter_(-1, order[..., :top_k], False)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


@pytest.fixture(scope="module")
def sharper(bos_family, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """rlhf with its logits scaled by 1.5: the same top-k at every position (so the KL of the
    top-k samplers is finite), another distribution within it."""
    tok, model = ev.load_model(str(bos_family["rlhf"]), "cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    path = tmp_path_factory.mktemp("sharper") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("reference", "temperature", "top_k"),
    [("sft1", 0.7, 0), ("sft1", 1.3, 0), ("sharper", 0.7, 5), ("sharper", 1.0, 40)],
)
@torch.no_grad()
def test_kl_is_between_the_sampling_distributions(
    bos_family, sharper, prompts_file, reference: str, temperature: float, top_k: int
) -> None:  # noqa: ANN001
    s = _settings(prompts_file, samples=3, temperature=temperature, top_k=top_k)
    tok, model = ev.load_model(str(bos_family["rlhf"]), "cpu")
    ref_path = sharper if reference == "sharper" else bos_family["sft1"]
    _, ref = ev.load_model(str(ref_path), "cpu")
    got = ev.sample(model, tok, PROMPTS, s, ref)
    total, count = 0.0, 0
    for prompt, ids in zip(got.prompts, got.ids, strict=True):
        p_ids = tok(prompt).input_ids
        seq = torch.tensor([p_ids + ids])  # one sequence, no padding
        start = len(p_ids) - 1
        lp = _filtered(model(input_ids=seq).logits[0, start:-1], temperature, top_k)
        lq = _filtered(ref(input_ids=seq).logits[0, start:-1], temperature, top_k)
        p = lp.exp()
        total += torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum().item()
        count += len(ids)
    assert count == got.kl_tokens > 0
    assert math.isfinite(total) and total > 0
    assert math.isclose(got.kl_sum, total, rel_tol=1e-3)


def test_kl_is_infinite_where_the_reference_cannot_sample() -> None:
    from mergekit_rl.lab import metrics

    p = torch.tensor([[[3.0, 2.0, 0.0, -1.0]]])  # top-2: tokens 0, 1
    q = torch.tensor([[[3.0, -1.0, 2.0, 0.0]]])  # top-2: tokens 0, 2
    kl, n = metrics.token_kl(p, q, torch.ones(1, 1), 1.0, 2)
    assert math.isinf(kl.item()) and n.item() == 1
    masked, _ = metrics.token_kl(p, q, torch.zeros(1, 1), 1.0, 2)
    assert masked.item() == 0.0  # an uncounted position adds nothing (not nan)


def test_eval_names_its_kl(bos_family, prompts_file) -> None:  # noqa: ANN001
    args = ["eval", str(bos_family["rlhf"]), "--prompts", str(prompts_file)]
    args += ["--reference", str(bos_family["sft1"]), "--temperature", "0.7", "--top-k", "5"]
    out = check(runner.invoke(app, [*args, "--json"]).stdout, "eval")
    assert out["rows"][0]["kl_definition"].startswith(
        "KL(model || reference) per token between the sampling distributions "
        "(softmax(logits / 0.7), top-5"
    )
    table = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "KL/token (T=0.7, top-5)" in table.stdout
    assert "inf: the model's top-k held a token outside" in table.stdout  # sft1's top-5 differs


def test_empty_keyword_is_refused_at_validation(tmp_path: Path) -> None:
    from mergekit_rl.errors import RecipeError
    from mergekit_rl.train.recipe import parse_train_recipe

    with pytest.raises(UsageError, match=r"keyword\.words: Value error, word 1 is empty"):
        ev.parse_reward("{keyword: {words: ['<answer>', '']}}")
    text = (
        "algorithm: grpo\npolicy: p\ndataset: {path: d.jsonl}\n"
        "reward: {keyword: {words: ['']}}\ntraining: {output_dir: o}\n"
    )
    with pytest.raises(
        RecipeError, match=r"(?s)r\.yaml.*reward\.keyword\.words: Value error, word 0 is empty"
    ):
        parse_train_recipe(text, "r.yaml")
