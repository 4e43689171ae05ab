"""Checkpoints whose tokenizer adds BOS and has no pad token (as Llama, Mistral and Gemma
tokenizers do): the case a tokenizer without BOS, with a pad token, cannot catch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def bos_tokenizer():  # noqa: ANN201
    """The tiny BPE tokenizer with a post-processor that prepends <|bos|>, and no pad token."""
    from tokenizers import processors

    from mergekit_rl.tiny import build_tokenizer

    tok = build_tokenizer()
    bos = tok.convert_tokens_to_ids("<|bos|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    tok.pad_token = None
    return tok


@pytest.fixture(scope="session")
def bos_family(
    family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """sft1 and rlhf of the tiny family, saved with the BOS / no-pad tokenizer (same vocabulary)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bos")
    tok = bos_tokenizer()
    out = {}
    for name in ("sft1", "rlhf"):
        out[name] = root / name
        shutil.copytree(family[name], out[name])
        for f in out[name].glob("*token*"):
            f.unlink()
        tok.save_pretrained(out[name])
    loaded = AutoTokenizer.from_pretrained(out["sft1"])
    assert loaded.pad_token is None and loaded("a soup").input_ids[0] == loaded.bos_token_id
    return out
