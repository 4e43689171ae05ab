"""Tiny random GPT-2, Qwen2 and Gemma checkpoints, tied or untied, for the embedding tests.

Each architecture names its embeddings differently (GPT-2: transformer.wte / lm_head, Qwen2 and
Gemma: model.embed_tokens / lm_head; Gemma also scales the input embedding), which is what the
tied-embedding handling must get from the config rather than from Llama's names.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
ARCHS = ("gpt2", "qwen2", "gemma")


def arch_config(arch: str, tie: bool):
    from transformers import GemmaConfig, GPT2Config, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            tie_word_embeddings=tie,
            bos_token_id=0,
            eos_token_id=0,
        )
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma":
        return GemmaConfig(head_dim=8, **common)
    raise ValueError(arch)


def build_model(
    path: Path, arch: str, tie: bool, seed: int, dtype: torch.dtype = torch.float32
) -> Path:
    """A randomly initialised *ForCausalLM saved with save_pretrained; returns `path`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch, tie))
    with torch.no_grad():  # every tensor random (norm weights start at 1 or 0 otherwise)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def finetune(src: Path, dst: Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of `src` with small seeded relative changes to every floating tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((p.float() * (1 + scale * noise) + 1e-4 * noise).to(p.dtype))
    model.save_pretrained(dst)
    return dst


def logits(model_or_path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """float32 logits of a fixed batch, from a saved model or (config, state dict)."""
    from transformers import AutoModelForCausalLM

    if state is None:
        model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(model_or_path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in k for k in missing), missing  # a tied head is shared
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    with torch.no_grad():
        return model.float().eval()(input_ids=ids).logits
