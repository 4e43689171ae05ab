"""Union vocabularies and chat templates (merge/vocab.py) against naive per-token references."""

from __future__ import annotations

import warnings

import pytest
import torch

from mergekit_rl.merge.vocab import (
    CHAT_TEMPLATES,
    absent_tokens,
    build_union,
    chat_template_problem,
    padded_size,
    pick_chat_template,
    remap_rows,
)
from mergekit_rl.tiny import build_tokenizer

OTHER_CORPUS = ["zebras graze quietly while parrots chatter about vocabulary"] * 30


@pytest.fixture(scope="module")
def toks():
    """base; `extra` = base + two regular tokens + one special; `other` = another BPE."""
    base = build_tokenizer(vocab_size=300)  # 41 merges of the default corpus
    extra = build_tokenizer(vocab_size=300)
    extra.add_tokens(["zebra", "<tool>"])
    extra.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    other = build_tokenizer(vocab_size=280, corpus=OTHER_CORPUS)
    other.add_tokens(["zebra"])
    return base, extra, other


def test_union_keeps_base_ids_and_adds_the_rest(toks):
    base, extra, other = toks
    sizes = [len(t) for t in toks]
    out, perms = build_union(list(toks), sizes)
    union = out.get_vocab()
    for name, idx in base.get_vocab().items():  # the base's ids are unchanged
        assert union[name] == idx
    wanted = set(base.get_vocab()) | set(extra.get_vocab()) | set(other.get_vocab())
    assert set(union) == wanted
    assert sorted(union.values()) == list(range(len(union)))
    specials = {i.content for i in out.added_tokens_decoder.values() if i.special}
    assert "<|im_start|>" in specials  # a special token stays special
    assert "zebra" not in specials
    # the new tokens encode as one token each
    ids = out.encode("zebra<tool>", add_special_tokens=False)
    assert ids == [union["zebra"], union["<tool>"]]
    # permutations: the model's own id for each union token, else -1 (naive lookup)
    for tok, p in zip(toks, perms, strict=True):
        own = tok.get_vocab()
        assert p.shape == (len(union),)
        for name, uid in union.items():
            assert int(p[uid]) == own.get(name, -1)
    # the inputs are left alone
    assert "zebra" not in base.get_vocab()


def test_ids_past_the_config_vocab_size_are_not_the_models_tokens(toks):
    base, extra, _ = toks
    n = len(base)  # extra's added tokens sit at n, n+1, n+2: outside a vocab_size of n
    out, perms = build_union([base, extra], [n, n])
    assert len(out) == n
    assert bool((perms[1] >= 0).all())


def naive_rows(xs, perms, base):
    """Per token, the rules one by one (no vectorization)."""
    size = perms[0].numel()
    out = [torch.zeros(size, *xs[0].shape[1:]) for _ in xs]
    for u in range(size):
        have = [i for i, p in enumerate(perms) if p[u] >= 0]
        if not have:
            default = torch.zeros(xs[0].shape[1:])
        elif len(have) == 1:
            default = xs[have[0]][perms[have[0]][u]]
        elif base is not None and base in have:
            default = xs[base][perms[base][u]]
        else:
            default = torch.stack([xs[i][perms[i][u]] for i in have]).mean(0)
        for i, p in enumerate(perms):
            out[i][u] = xs[i][p[u]] if p[u] >= 0 else default
    return out


@pytest.mark.parametrize("base", [0, None])
def test_remap_rows_matches_the_rules(base):
    gen = torch.Generator().manual_seed(0)
    # union of 7 tokens over 3 models: rows of 5, 4 and 6 tokens, width 3
    perms = [
        torch.tensor([0, 1, 2, 3, -1, 4, -1]),  # base when base == 0
        torch.tensor([3, -1, 0, 1, 2, -1, -1]),
        torch.tensor([5, 0, -1, -1, 1, 2, -1]),
    ]
    xs = [torch.randn(n, 3, generator=gen) for n in (5, 4, 6)]
    got = remap_rows(xs, perms, base)
    want = naive_rows(xs, perms, base)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    # spot checks of each rule, written out by hand
    assert torch.equal(got[2][3], xs[0][3] if base == 0 else (xs[0][3] + xs[1][1]) / 2)
    assert torch.equal(got[0][4], (xs[1][2] + xs[2][1]) / 2)  # base lacks it: the mean
    two = xs[0][4] if base == 0 else (xs[0][4] + xs[2][2]) / 2  # model 1 lacks token 5
    assert torch.equal(got[1][5], two)
    assert torch.equal(got[1][6], torch.zeros(3))  # in no model: zeros
    assert absent_tokens(perms) == 1


def test_remap_rows_one_owner_is_exact():
    perms = [torch.tensor([0, -1]), torch.tensor([0, 1])]
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [0.1, 0.7]])]
    got = remap_rows(xs, perms, 0)
    assert torch.equal(got[0][1], xs[1][1])  # the only model with the token: its row, bitwise
    assert torch.equal(got[1][0], xs[1][0])  # a model's own row wins over the base's


def test_chat_template_names_auto_and_jinja(toks):
    base, extra, other = toks
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    base.chat_template = pick_chat_template("chatml", [])
    text = base.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    for name in CHAT_TEMPLATES:  # every built-in renders
        base.chat_template = CHAT_TEMPLATES[name]
        assert "hi" in base.apply_chat_template(msgs, tokenize=False)
    base.chat_template = CHAT_TEMPLATES["llama3"]
    assert base.apply_chat_template(msgs, tokenize=False).startswith(
        "<|bos|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    )
    a, b = (
        "{{ 'A' }}{% for m in messages %}{% endfor %}",
        "{{ 'B' }}{% for m in messages %}x{% endfor %}",
    )
    holders = [type("T", (), {"chat_template": t})() for t in (a, b, b, None)]
    assert pick_chat_template("auto", holders) == b  # the most common
    assert pick_chat_template("auto", holders[:2]) == a  # a tie: the first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pick_chat_template("auto", holders[3:]) is None
    assert "no chat template" in str(caught[0].message)
    assert pick_chat_template(b, []) == b
    assert chat_template_problem("chatml") is None
    assert chat_template_problem("auto") is None
    assert chat_template_problem(b) is None
    assert "unknown template 'chatlm'" in str(chat_template_problem("chatlm"))
    assert chat_template_problem("{{ x }}") is not None  # too short for a template
    assert chat_template_problem("a long string without any braces at all") is not None


def test_padding_rows_are_each_models_mean_row():
    perms = [torch.tensor([0, 1, -1]), torch.tensor([1, -1, 0])]
    xs = [torch.randn(2, 4), torch.randn(2, 4)]
    got = remap_rows(xs, perms, 0, rows=8)
    plain = remap_rows(xs, perms, 0)
    for g, p in zip(got, plain, strict=True):
        assert g.shape == (8, 4)
        assert torch.equal(g[:3], p)
        torch.testing.assert_close(g[3:], p.mean(0).expand(5, 4))
    assert padded_size(321, 64) == 384 and padded_size(384, 64) == 384
    assert padded_size(321, None) == 321
