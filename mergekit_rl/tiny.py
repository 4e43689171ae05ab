"""Tiny random Llama checkpoints and an offline tokenizer, for the demo and the tests.

The family mirrors an RLHF pipeline: a pretrained `base`, two SFT models fine-tuned from it with
different seeds (`sft1`, `sft2`), and an `rlhf` model fine-tuned from `sft1`. "Fine-tuning" here
adds small seeded random deltas, so every relation between the models is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the policy model learns from human preferences",
    "a reward model scores each answer to the prompt",
    "merging weights keeps the alignment tax small",
    "elastic reset moves the policy back to its moving average",
    "a soup of supervised models makes a better reference",
    "task vectors add and subtract what fine tuning learned",
] * 20


def build_tokenizer(vocab_size: int = 256, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained offline on a small corpus (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_model(state: dict[str, torch.Tensor], config, tokenizer, path: Path, dtype=torch.float32):
    """Save a LlamaForCausalLM with these weights as a Hugging Face checkpoint."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# tiny test model\n")


def perturb(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def build_family(
    root: Path,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write base, sft1, sft2 and rlhf checkpoints under root; return their paths."""
    from transformers import LlamaForCausalLM

    root = Path(root)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), hidden, layers, tie)
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    states = {
        "base": base,
        "sft1": perturb(base, 0.02, seed + 1),
        "sft2": perturb(base, 0.02, seed + 2),
    }
    states["rlhf"] = perturb(states["sft1"], 0.01, seed + 3)
    paths = {}
    for name, state in states.items():
        paths[name] = root / name
        save_model(state, config, tokenizer, paths[name], dtype)
    return paths
