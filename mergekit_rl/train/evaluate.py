"""Held-out measures of a policy during training: drift (perplexity, KL) and reward.

All three are deterministic (greedy decoding, no sampling), so evaluating never touches the
random number generators that training and resumed runs depend on.

- perplexity: exp(mean token NLL) of the policy on held-out reference text; it rises as the
  policy drifts from the language it started with.
- KL: for each held-out prompt, the policy's greedy completion y; then
  sum_t KL(pi(. | x, y_<t) || pi_0(. | x, y_<t)) over the completion tokens (the exact per-position
  KL over the vocabulary, to the initial policy pi_0), averaged over prompts.
- reward: the recipe's reward functions on the same completions (reward models are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Completion:
    prompt_ids: Tensor  # [P] int64
    completion_ids: Tensor  # [C] int64 (eos included if generated)
    text: str


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int) -> float:
    """exp(total NLL / total predicted tokens) over the texts, one text at a time (no padding)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        ids = ids["input_ids"].to(device)  # [1, T]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count) if count else float("nan")


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[Completion]:
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # [1, P]
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # [1, P + C]
        completion = seq[0, ids.shape[1] :]
        text = tokenizer.decode(completion, skip_special_tokens=True)
        out.append(Completion(ids[0], completion, text))
    return out


@torch.no_grad()
def kl_to(policy: nn.Module, initial: nn.Module, completions: Sequence[Completion]) -> float:
    """Mean over prompts of the summed per-token KL(policy || initial) on the completions."""
    device = next(policy.parameters()).device
    total = 0.0
    for c in completions:
        if c.completion_ids.numel() == 0:
            continue
        seq = torch.cat([c.prompt_ids, c.completion_ids]).unsqueeze(0).to(device)  # [1, P + C]
        start = c.prompt_ids.numel() - 1  # logits at start predict the first completion token
        logp = F.log_softmax(policy(input_ids=seq).logits[0, start:-1].float(), dim=-1)  # [C, V]
        logq = F.log_softmax(initial(input_ids=seq).logits[0, start:-1].float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # [C]
        total += kl.clamp_min(0.0).sum().item()  # KL >= 0: only rounding goes below
    return total / max(len(completions), 1)
