"""Held-out measures of a policy during training: drift (perplexity, KL) and reward.

All three are deterministic (greedy decoding, no sampling), so evaluating never touches the
random number generators that training and resumed runs depend on.

- perplexity: exp(mean token NLL) of the policy on held-out reference text, every token of every
  document scored once (documents longer than the window are scored with a sliding window of
  `window` tokens moved by half a window); it rises as the policy drifts from the language it
  started with.
- KL: for each held-out prompt x (its tokens as the trainer feeds them), the policy's greedy
  completion y; then
  sum_t KL(pi(. | x, y_<t) || pi_0(. | x, y_<t)) over the completion tokens (the exact per-position
  KL over the vocabulary, to the initial policy pi_0), averaged over prompts.
- reward: the recipe's reward functions (and reward models) on the same completions.
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


def windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, first, end) per forward pass over a document of `length` tokens: the pass sees
    tokens [begin, end) and scores the targets [first, end); every target 1..length-1 is scored
    exactly once, with at least window // 2 tokens of context after the first pass."""
    stride = max(window // 2, 1)
    out, begin, done = [], 0, 1  # token 0 has no context: never a target
    while done < length:
        end = min(begin + window, length)
        out.append((begin, done, end))
        done = end
        begin += stride
    return out


@torch.no_grad()
def perplexity(model: nn.Module, documents: Sequence[Sequence[int]], window: int) -> float:
    """exp(total NLL / total predicted tokens) over the documents (token ids), one document at
    a time (no padding), a sliding window of `window` tokens over long ones."""
    device = next(model.parameters()).device
    nll, count = torch.zeros((), device=device), 0
    for doc in documents:
        ids = torch.as_tensor(list(doc), dtype=torch.long, device=device)  # [T]
        for begin, first, end in windows(len(ids), window):
            logits = model(input_ids=ids[begin:end][None]).logits[0]  # [end-begin, V]
            # the logit at position t - 1 predicts token t; float32 only for the scored rows
            pred = logits[first - 1 - begin : end - 1 - begin].float()  # [end-first, V]
            nll += F.cross_entropy(pred, ids[first:end], reduction="sum")
            count += end - first
    return math.exp(nll.item() / count) if count else float("nan")  # one host sync


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
) -> list[Completion]:
    """The greedy completion of each prompt (token ids, as the trainer would feed them)."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.as_tensor(list(prompt), dtype=torch.long, device=device)[None]  # [1, P]
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
    total = torch.zeros((), device=device)
    for c in completions:
        if c.completion_ids.numel() == 0:
            continue
        seq = torch.cat([c.prompt_ids, c.completion_ids]).unsqueeze(0).to(device)  # [1, P + C]
        start = c.prompt_ids.numel() - 1  # logits at start predict the first completion token
        logp = F.log_softmax(policy(input_ids=seq).logits[0, start:-1].float(), dim=-1)  # [C, V]
        logq = F.log_softmax(initial(input_ids=seq).logits[0, start:-1].float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # [C]
        total += kl.clamp_min(0.0).sum()  # KL >= 0: only rounding goes below
    return total.item() / max(len(completions), 1)  # one host sync
