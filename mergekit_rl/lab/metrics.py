"""Pure tensor functions behind `rlmerge eval` and `rlmerge plot` (no models, no IO).

Shapes: B sequences, T positions, V vocabulary. A mask is 1.0 where a token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..merge import blend


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] positions that skip left padding, as `generate` numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def completion_mask(completion: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """[B, C] 1.0 on each completion's tokens up to and including its first eos, 0.0 after."""
    is_eos = completion == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    # generate pads finished rows with pad_id; when pad == eos the rule above already covers it
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= completion != pad_id
    return mask.float()


def sampling_logprobs(logits: Tensor, temperature: float = 1.0, top_k: int = 0) -> Tensor:
    """[..., V] log-probabilities of the distribution a sampler draws from: logits / temperature
    (TRL's convention), then every token below the k-th largest logit removed (as `generate`'s
    top-k, ties kept), renormalised. Temperature 0 (greedy): the untempered distribution."""
    x = logits.float()
    if temperature > 0:
        x = x / temperature
        if 0 < top_k < x.shape[-1]:
            kth = x.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
            x = x.masked_fill(x < kth, float("-inf"))
    return F.log_softmax(x, dim=-1)


def token_kl(
    logits_p: Tensor, logits_q: Tensor, mask: Tensor, temperature: float = 1.0, top_k: int = 0
) -> tuple[Tensor, Tensor]:
    """Exact KL(p || q) over the vocabulary at each counted position, p and q the sampling
    distributions of the two models' logits (`sampling_logprobs`, the same processing for both).

    logits_*: [B, T, V]; mask: [B, T]. Returns (sum of KL over counted tokens, token count),
    both 0-dim, so batches add up before the one division. The sum is infinite when p gives
    mass to a token that q's top-k removed.
    """
    logp = sampling_logprobs(logits_p, temperature, top_k)
    logq = sampling_logprobs(logits_q, temperature, top_k)
    p = logp.exp()
    # tokens p never draws add nothing (0 * log 0 = 0, also where q removed them)
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    kl = terms.sum(-1).clamp_min(0.0)  # [B, T]; < 0 only by rounding
    counted = mask > 0
    return torch.where(counted, kl, torch.zeros_like(kl)).sum(), mask.sum()


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL and token count: logits [B, T, V] predict targets [B, T]."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, T]
    return (nll * mask).sum(), mask.sum()


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Share of paired samples where ours scores higher; a tie counts one half."""
    pairs = list(zip(ours, theirs, strict=True))
    if not pairs:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, gain) no other point beats: lower-or-equal cost and
    higher-or-equal gain, one of them strictly. Sorted by cost."""
    front = []
    for i, (c, g) in enumerate(points):
        dominated = any(
            (c2 <= c and g2 >= g) and (c2 < c or g2 > g)
            for j, (c2, g2) in enumerate(points)
            if j != i
        )
        if not dominated and not (math.isnan(c) or math.isnan(g)):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def average_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform soup of in-memory state dicts (float32 math, the first state's dtypes)."""
    w = [1.0 / len(states)] * len(states)
    return {
        name: blend.weighted_sum([s[name].float() for s in states], w).to(t.dtype)
        for name, t in states[0].items()
    }
