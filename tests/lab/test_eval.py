"""`rlmerge eval` on the demo models against values computed here, one text at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mergekit_rl.cli.app import app
from typer.testing import CliRunner
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from mergekit_rl.errors import UsageError
from mergekit_rl.lab import evaluate as ev
from tests.cli.envelope import check

runner = CliRunner()
TEXTS = [
    "the policy model learns from human preferences",
    "a soup",
    "merging weights keeps the alignment tax small and elastic reset moves the policy back",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalfiles")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["the policy", "a reward model", "tax"])
    )
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(TEXTS) + "\n")
    return {"prompts": prompts, "heldout": heldout}


def _settings(files: dict[str, Path], **kw) -> ev.EvalSettings:  # noqa: ANN003
    base = dict(
        prompts=str(files["prompts"]),
        reward={"sentiment": {}},
        samples=2,
        max_new_tokens=6,
        batch_size=4,
    )
    return ev.EvalSettings(**(base | kw))


@torch.no_grad()
def test_perplexity_matches_unbatched_logits(family: dict[str, Path], files) -> None:  # noqa: ANN001
    tok, model = ev.load_model(str(family["sft1"]), "cpu")
    got = ev.perplexity(model, tok, TEXTS, _settings(files, batch_size=2))  # padded batches
    nll, n = 0.0, 0
    for text in TEXTS:
        ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids  # [1, T]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # [T-1, V]
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    assert math.isclose(got, math.exp(nll / n), rel_tol=1e-4)


@torch.no_grad()
def test_kl_matches_per_sequence_reference(family: dict[str, Path], files) -> None:  # noqa: ANN001
    s = _settings(files, samples=3)
    tok, model = ev.load_model(str(family["rlhf"]), "cpu")
    _, ref = ev.load_model(str(family["sft1"]), "cpu")
    got = ev.sample(model, tok, ev.read_prompts(s.prompts, "p").prompts, s, ref)
    total, count = 0.0, 0
    for prompt, ids in zip(got.prompts, got.ids, strict=True):
        p_ids = tok(prompt).input_ids  # as training feeds it
        seq = torch.tensor([p_ids + ids])  # no padding: one sequence
        start = len(p_ids) - 1
        lp = F.log_softmax(model(input_ids=seq).logits[0, start:-1].double(), -1)
        lq = F.log_softmax(ref(input_ids=seq).logits[0, start:-1].double(), -1)
        total += (lp.exp() * (lp - lq)).sum().item()
        count += len(ids)
    assert count == got.kl_tokens > 0
    assert math.isclose(got.kl_sum, total, rel_tol=1e-3)
    same = ev.sample(model, tok, got.prompts[::3], s, model)
    assert same.kl_sum == pytest.approx(0.0, abs=1e-6)  # KL of a model to itself


def test_sampling_is_seeded(family: dict[str, Path], files) -> None:  # noqa: ANN001
    tok, model = ev.load_model(str(family["sft1"]), "cpu")
    prompts = ev.read_prompts(files["prompts"], "p").prompts
    a = ev.sample(model, tok, prompts, _settings(files))
    b = ev.sample(model, tok, prompts, _settings(files))
    c = ev.sample(model, tok, prompts, _settings(files, seed=1))
    assert a.texts == b.texts
    assert a.texts != c.texts


def test_reward_of_fixed_completions() -> None:
    vader = SentimentIntensityAnalyzer()
    texts = ["the film was wonderful", "the film was awful", "the film"]
    scorer = ev.Scorer(ev.parse_reward("sentiment"), "cpu", False)
    got = scorer(["p"] * 3, texts, [[1]] * 3)
    assert got == [vader.polarity_scores(t)["compound"] for t in texts]
    assert got[0] > 0 > got[1] and got[2] == 0.0
    kw = ev.Scorer(ev.parse_reward("{keyword: {words: [film], weight: 2.0}}"), "cpu", False)
    assert kw(["p"] * 3, texts, [[1]] * 3) == [2.0, 2.0, 2.0]


def test_parse_reward_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="sentimnt"):
        ev.parse_reward("sentimnt")
    with pytest.raises(UsageError, match="not found"):
        ev.parse_reward(str(tmp_path / "missing.yaml"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: grpo\nreward:\n  length: {target: 4}\n")
    assert ev.parse_reward(str(recipe)) == {"length": {"target": 4, "penalty": 1.0, "weight": 1.0}}


def test_eval_rows(family: dict[str, Path], files) -> None:  # noqa: ANN001
    s = _settings(
        files, reference=str(family["sft1"]), heldout=str(files["heldout"]), win_rate=True
    )
    rows = ev.evaluate([str(family["sft1"]), str(family["rlhf"])], s)
    assert [r["model"] for r in rows] == [str(family["sft1"]), str(family["rlhf"])]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["win_rate"] == 0.5  # the reference against itself: every sample ties
    assert rows[1]["kl"] > 0
    assert rows[0]["samples"] == 6
    tok, model = ev.load_model(str(family["rlhf"]), "cpu")
    assert rows[1]["ppl"] == pytest.approx(ev.perplexity(model, tok, TEXTS, s))
    got = ev.sample(model, tok, ev.read_prompts(s.prompts, "p").prompts, s)
    vader = SentimentIntensityAnalyzer()
    want = [vader.polarity_scores(t)["compound"] for t in got.texts]
    assert rows[1]["reward"] == pytest.approx(sum(want) / len(want))


def test_eval_cli_json_and_csv(family: dict[str, Path], files, tmp_path: Path) -> None:  # noqa: ANN001
    csv = tmp_path / "rows.csv"
    args = ["eval", str(family["sft1"]), str(family["sft2"]), "--prompts", str(files["prompts"])]
    args += ["--reference", str(family["sft1"]), "--max-new-tokens", "4", "--json"]
    result = runner.invoke(app, [*args, "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    out = check(result.stdout, "eval")  # the documented --json envelope
    assert len(out["rows"]) == 2 and out["settings"]["max_new_tokens"] == 4
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("# settings: ") and len(lines) == 4


def test_eval_cli_bad_input(family: dict[str, Path], files, tmp_path: Path) -> None:  # noqa: ANN001
    missing = runner.invoke(app, ["eval", str(family["sft1"]), "--prompts", str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert "prompts file" in missing.stderr
    bad = runner.invoke(
        app, ["eval", str(family["sft1"]), "--prompts", str(files["prompts"]), "--reward", "nope"]
    )
    assert bad.exit_code == 2 and "--reward" in bad.stderr


@torch.no_grad()
def test_model_reward_scores_prompt_plus_completion(tmp_path: Path) -> None:
    from transformers import LlamaForSequenceClassification

    from mergekit_rl.tiny import build_tokenizer, tiny_config

    tok = build_tokenizer()
    config = tiny_config(len(tok))
    config.num_labels = 1
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = ev.Scorer({"model": {"path": str(tmp_path / "rm")}}, "cpu", False)
    prompts, completions = ["the policy", "a"], [" model learns from human preferences", " soup"]
    got = scorer(prompts, completions, [[1], [1]])
    want = [  # one text at a time: no padding
        rm(**tok(p + c, return_tensors="pt")).logits[0, 0].item()
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] != got[1]
