"""tokenizer_source: union and chat_template, end to end on tiny models with different vocabularies.

Three models: `base`; `extra` = base's tokenizer plus "zebra", "<tool>" and a special token;
`other` = a BPE trained on another corpus (overlapping bytes and specials, distinct merges) plus
"zebra". Expected rows are computed per token string, independently of the code's permutations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_rl.errors import MismatchError, RecipeError
from mergekit_rl.merge.vocab import CHAT_TEMPLATES
from mergekit_rl.recipe.plan import PEAK_CONSTANT_BYTES
from mergekit_rl.recipe.run import MergeOptions, merge_file, plan_file
from mergekit_rl.tiny import build_tokenizer, save_model, tiny_config
from tests.conftest import load_state
from tests.recipe.test_run import naive_ties

OTHER_CORPUS = ["zebras graze quietly while parrots chatter about vocabulary"] * 30
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def build_models(root: Path, tied: dict[str, bool]) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    base = build_tokenizer(vocab_size=300)  # 41 merges of the default corpus
    extra = build_tokenizer(vocab_size=300)
    extra.add_tokens(["zebra", "<tool>"])
    extra.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    other = build_tokenizer(vocab_size=280, corpus=OTHER_CORPUS)
    other.add_tokens(["zebra"])
    other.chat_template = extra.chat_template = "{{ 'other' }}{% for m in messages %}{% endfor %}"
    paths = {}
    for seed, (name, tok) in enumerate({"base": base, "extra": extra, "other": other}.items()):
        config = tiny_config(len(tok), hidden=32, layers=1, tie=tied[name])
        torch.manual_seed(seed)
        state = LlamaForCausalLM(config).state_dict()
        paths[name] = root / name
        save_model(state, config, tok, paths[name])
    return paths


TIES = {
    "untied": dict.fromkeys(("base", "extra", "other"), False),
    "tied": dict.fromkeys(("base", "extra", "other"), True),
    "mixed": {"base": True, "extra": False, "other": False},
}


@pytest.fixture(scope="module", params=list(TIES))
def models(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    return request.param, build_models(tmp_path_factory.mktemp(request.param), TIES[request.param])


def expected_rows(
    paths: dict[str, Path], union: dict[str, int], key: str
) -> dict[str, torch.Tensor]:
    """Each model's [union size, hidden] tensor, token by token, by the rules."""
    info = {}
    for name, path in paths.items():
        state = load_state(path)
        rows = state.get(key, state[EMBED]).double()  # a tied lm_head is the embedding
        info[name] = (AutoTokenizer.from_pretrained(path).get_vocab(), rows)
    hidden = info["base"][1].shape[1]
    out = {name: torch.zeros(len(union), hidden, dtype=torch.float64) for name in paths}
    for tok, u in union.items():
        have = [n for n, (v, rows) in info.items() if v.get(tok, len(rows)) < len(rows)]
        mine = {n: info[n][1][info[n][0][tok]] for n in have}
        if not have:
            default = torch.zeros(hidden, dtype=torch.float64)
        elif len(have) == 1:
            default = mine[have[0]]
        elif "base" in have:
            default = mine["base"]
        else:
            default = torch.stack(list(mine.values())).mean(0)
        for n in paths:
            out[n][u] = mine.get(n, default)
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def linear_recipe(paths: dict[str, Path], tmp: Path, extra: str = "") -> Path:
    return write(
        tmp / "linear.yaml",
        f"""merge_method: linear
base_model: {paths["base"]}
models:
  - model: {paths["base"]}
    parameters: {{weight: 0.2}}
  - model: {paths["extra"]}
    parameters: {{weight: 0.3}}
  - model: {paths["other"]}
    parameters: {{weight: 0.5}}
tokenizer_source: union
{extra}""",
    )


def test_linear_union_end_to_end(models, tmp_path):
    mode, paths = models
    out = tmp_path / "out"
    merge_file(linear_recipe(paths, tmp_path, "chat_template: chatml\n"), out, MergeOptions())
    tok = AutoTokenizer.from_pretrained(out)
    union = tok.get_vocab()
    bases = AutoTokenizer.from_pretrained(paths["base"]).get_vocab()
    assert all(union[t] == i for t, i in bases.items())  # the base's ids are kept
    ids = tok.encode("zebra<tool>", add_special_tokens=False)
    assert ids == [union["zebra"], union["<tool>"]]
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(union)
    model = AutoModelForCausalLM.from_pretrained(out)
    w = {"base": 0.2, "extra": 0.3, "other": 0.5}
    for key, got in (
        (EMBED, model.get_input_embeddings().weight),
        (HEAD, model.get_output_embeddings().weight),
    ):
        rows = expected_rows(paths, union, key)
        want = sum(w[n] * rows[n] for n in w) / sum(w.values())
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    # a token only `extra` has: every input gets extra's row, so the merge gives it
    e = load_state(paths["extra"])[EMBED]
    zebra_tool = e[AutoTokenizer.from_pretrained(paths["extra"]).get_vocab()["<tool>"]]
    torch.testing.assert_close(model.get_input_embeddings().weight[union["<tool>"]], zebra_tool)
    stored = load_state(out)
    assert (HEAD in stored) == (mode != "tied")  # tied inputs give a tied output


def test_ties_union_end_to_end(models, tmp_path):
    _, paths = models
    recipe = write(
        tmp_path / "ties.yaml",
        f"""merge_method: ties
base_model: {paths["base"]}
models:
  - model: {paths["extra"]}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {paths["other"]}
    parameters: {{weight: 0.3, density: 0.8}}
tokenizer: {{source: union}}
""",
    )
    out = tmp_path / "out"
    merge_file(recipe, out, MergeOptions())
    union = AutoTokenizer.from_pretrained(out).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(out)
    rows = expected_rows(paths, union, EMBED)
    want = naive_ties(rows["base"], [rows["extra"], rows["other"]], [0.7, 0.3], [0.5, 0.8])
    got = model.get_input_embeddings().weight.detach().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dry_run_reports_the_union(models, tmp_path):
    _, paths = models
    plan = plan_file(linear_recipe(paths, tmp_path), tmp_path / "out", MergeOptions())
    [stage] = plan["stages"]
    union = len(AutoTokenizer.from_pretrained(paths["base"]))
    tok = stage["tokenizer"]
    assert tok["source"] == "union" and tok["vocab_size"] > union
    assert tok["added_tokens"] == tok["vocab_size"] - union and tok["padding_rows"] == 0
    assert stage["config_updates"]["vocab_size"] == tok["vocab_size"]
    shapes = {t["name"]: t["shape"] for t in stage["tensors"]}
    assert shapes[EMBED] == [tok["vocab_size"], 32]
    remapped = 4 * (2 * 3 + 4) * tok["vocab_size"] * 32  # 3 inputs, their copies, 4 more
    assert stage["peak_memory_bytes"] - PEAK_CONSTANT_BYTES == remapped
    assert not (tmp_path / "out").exists()


def test_chat_template_without_union(models, tmp_path):
    _, paths = models
    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for value, want in (
        ("llama3", CHAT_TEMPLATES["llama3"]),
        ("auto", "{{ 'other' }}{% for m in messages %}{% endfor %}"),  # 2 of 3 inputs use it
        (jinja, jinja),
    ):
        recipe = write(
            tmp_path / "r.yaml",
            f"merge_method: linear\nmodels: [{{model: {paths['base']}}}, "
            f"{{model: {paths['base']}}}]\nchat_template: {json.dumps(value)}\n"
            if value != "auto"
            else f"merge_method: linear\nbase_model: {paths['base']}\nmodels: "
            f"[{{model: {paths['extra']}}}, {{model: {paths['other']}}}]\n"
            "tokenizer_source: union\nchat_template: auto\n",
        )
        out = tmp_path / f"out-{len(want)}"
        merge_file(recipe, out, MergeOptions())
        assert AutoTokenizer.from_pretrained(out).chat_template == want


def test_bad_chat_template_is_named(models, tmp_path):
    _, paths = models
    recipe = linear_recipe(paths, tmp_path, "chat_template: chatlm\n")
    with pytest.raises(RecipeError) as err:
        merge_file(recipe, tmp_path / "out", MergeOptions())
    assert "chat_template: unknown template 'chatlm'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_without_union_different_vocabularies_are_refused(models, tmp_path):
    _, paths = models
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels: [{{model: {paths['base']}}}, {{model: {paths['other']}}}]\n",
    )
    with pytest.raises(MismatchError, match="vocabulary sizes differ.*tokenizer_source: union"):
        merge_file(recipe, tmp_path / "out", MergeOptions())


def test_pad_to_multiple_of(models, tmp_path):
    _, paths = models
    recipe = (
        linear_recipe(paths, tmp_path)
        .read_text()
        .replace("tokenizer_source: union", "tokenizer: {source: union, pad_to_multiple_of: 64}")
    )
    out = tmp_path / "out"
    merge_file(write(tmp_path / "pad.yaml", recipe), out, MergeOptions())
    union = AutoTokenizer.from_pretrained(out).get_vocab()
    n = len(union)
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.get_input_embeddings().weight.detach().double()
    rows = -(-n // 64) * 64
    assert got.shape[0] == rows == json.loads((out / "config.json").read_text())["vocab_size"]
    w = {"base": 0.2, "extra": 0.3, "other": 0.5}
    per_model = expected_rows(paths, union, EMBED)
    want = sum(w[k] * per_model[k] for k in w) / sum(w.values())
    torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-6)
    # linear: the merge of each model's mean row is the mean of the merged rows
    torch.testing.assert_close(got[n:], want.mean(0).expand(rows - n, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("block", "msg"),
    [
        ("tokenizer: {source: base, pad_to_multiple_of: 64}", "needs `source: union`"),
        ("tokenizer: {source: union, pad_to_multiple_of: 0}", "a positive integer, got 0"),
        ("tokenizer: {source: union, tokens: {x: {source: base}}}", "not supported yet"),
    ],
)
def test_tokenizer_block_problems_are_named(models, tmp_path, block, msg):
    _, paths = models
    recipe = linear_recipe(paths, tmp_path).read_text().replace("tokenizer_source: union", block)
    with pytest.raises(RecipeError) as err:
        merge_file(write(tmp_path / "bad.yaml", recipe), tmp_path / "out", MergeOptions())
    assert "tokenizer." in str(err.value) and msg in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_prints_the_tokenizer(models, tmp_path):
    from tests.cli.test_merge_cli import rl

    _, paths = models
    recipe = linear_recipe(paths, tmp_path, "chat_template: chatml\n")
    code, out, err = rl("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert code == 0, err
    n = len(AutoTokenizer.from_pretrained(paths["base"]))
    union = n + 21  # 18 merges only `other` has, zebra, <tool>, <|im_start|>
    line = f"tokenizer: union: {union} tokens (21 added to {paths['base']}); chat template chatml"
    assert line in out + err
    assert not (tmp_path / "out").exists()


def test_pipeline_dry_run_unions_a_planned_stage(models, tmp_path):
    """A later stage's union reads an earlier stage's tokenizer before it is written."""
    _, paths = models
    first = linear_recipe(paths, tmp_path).read_text()
    recipe = write(
        tmp_path / "p.yaml",
        "name: u\n" + first + "---\nmerge_method: linear\n"
        f"models: [{{model: u}}, {{model: {paths['base']}}}]\ntokenizer_source: union\n",
    )
    plan = plan_file(recipe, tmp_path / "out", MergeOptions())
    a, b = plan["stages"]
    assert b["tokenizer"]["vocab_size"] == a["tokenizer"]["vocab_size"]
    assert b["tokenizer"]["added_tokens"] == 0  # u (the first model) holds every base token
    merge_file(recipe, tmp_path / "out", MergeOptions())
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == a["tokenizer"]["vocab_size"]


def test_a_token_no_model_has_gets_zeros_and_a_warning(tmp_path):
    """The base's tokenizer holds '<late>' past its config vocab_size: no model has its row."""
    from transformers import LlamaForCausalLM

    paths = {}
    for seed, name in enumerate(("base", "other")):
        tok = (
            build_tokenizer(vocab_size=300)
            if name == "base"
            else build_tokenizer(280, OTHER_CORPUS)
        )
        config = tiny_config(len(tok), hidden=32, layers=1)
        torch.manual_seed(seed)
        state = LlamaForCausalLM(config).state_dict()
        if name == "base":
            tok.add_tokens(["<late>"])  # id 300; the embedding keeps 300 rows
        paths[name] = tmp_path / name
        save_model(state, config, tok, paths[name])
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['base']}}}, {{model: {paths['other']}}}]\n"
        "tokenizer_source: union\n",
    )
    with pytest.warns(UserWarning, match="1 tokens of the union vocabulary are in no model"):
        merge_file(recipe, tmp_path / "out", MergeOptions())
    union = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    state = load_state(tmp_path / "out")
    assert torch.equal(state[EMBED][union["<late>"]], torch.zeros(32))
    assert state[EMBED].shape[0] == len(union)
    rows = expected_rows(paths, union, EMBED)
    want = (rows["base"] + rows["other"]) / 2
    torch.testing.assert_close(state[EMBED].double(), want, rtol=1e-5, atol=1e-6)
