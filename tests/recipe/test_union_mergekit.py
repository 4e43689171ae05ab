"""tokenizer_source: union against mergekit's own output on the same tiny models (skipped when
mergekit is not installed; `pip install mergekit==0.1.5` keeps torch 2.13 and is never a
dependency of ours).

The two tools may number the appended tokens differently (both append after the base's ids;
mergekit in the order of each tokenizer's vocabulary dict, we by id), so rows are compared
token by token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mergekit_rl.recipe.run import MergeOptions, merge_file
from tests.conftest import load_state
from tests.recipe.test_union import EMBED, HEAD, models, write  # noqa: F401 (fixture)

pytest.importorskip("mergekit")

PAD = "tokenizer: {source: union, pad_to_multiple_of: 64}\n"
METHODS = {
    "linear": """merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {extra}
    parameters: {{weight: 0.3}}
  - model: {other}
    parameters: {{weight: 0.5}}
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {extra}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {other}
    parameters: {{weight: 0.3, density: 0.8}}
""",
}


def mergekit_yaml(recipe: Path, out: Path) -> None:
    script = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(script), str(recipe), str(out)], check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "tok"),
    [
        ("linear", "tokenizer_source: union\n"),
        ("ties", "tokenizer_source: union\n"),
        ("linear", PAD),
    ],
)
def test_union_matches_mergekit(models, method, tok, tmp_path):  # noqa: F811
    mode, paths = models
    text = METHODS[method].format(**paths) + tok + "chat_template: chatml\n"
    recipe = write(tmp_path / "r.yaml", text + "dtype: float32\n")
    mergekit_yaml(recipe, tmp_path / "mk")
    merge_file(recipe, tmp_path / "ours", MergeOptions())
    theirs = AutoTokenizer.from_pretrained(tmp_path / "mk")
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours")
    tv, ov = theirs.get_vocab(), ours.get_vocab()
    assert set(tv) == set(ov)
    base = AutoTokenizer.from_pretrained(paths["base"]).get_vocab()
    assert all(tv[t] == ov[t] == i for t, i in base.items())
    specials = {i.content: i.special for i in theirs.added_tokens_decoder.values()}
    assert specials == {i.content: i.special for i in ours.added_tokens_decoder.values()}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert theirs.apply_chat_template(msgs, tokenize=False) == ours.apply_chat_template(
        msgs, tokenize=False
    )
    mk, us = load_state(tmp_path / "mk"), load_state(tmp_path / "ours")
    names = [t for t in tv]
    for key in (EMBED, HEAD):
        if key not in mk and key not in us:
            continue  # both tied
        a = mk.get(key, mk[EMBED])[torch.tensor([tv[t] for t in names])]
        b = us.get(key, us[EMBED])[torch.tensor([ov[t] for t in names])]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{mode} {key}")
        pad_a, pad_b = mk.get(key, mk[EMBED])[len(tv) :], us.get(key, us[EMBED])[len(ov) :]
        assert pad_b.shape[0] == (64 - len(ov) % 64 if tok == PAD else 0)
        torch.testing.assert_close(pad_a, pad_b, rtol=1e-5, atol=1e-6)
    for key in mk:
        if key not in (EMBED, HEAD):
            torch.testing.assert_close(mk[key], us[key], rtol=1e-5, atol=1e-6)
