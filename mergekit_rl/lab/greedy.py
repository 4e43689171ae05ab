"""Greedy model soups (Wortsman et al. 2022): rank candidates by their own held-out score,
then walk down the ranking, keeping a candidate only if the uniform soup with it scores
strictly higher than the soup without it.

`greedy_select` is the selection alone (any score function over a list of members);
`greedy_soup_weights` scores real checkpoints: soups are averaged in memory (so every
candidate is held in memory once) and scored with `rlmerge eval`'s sampler and reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics
from .evaluate import EvalSettings, Scorer, load_model, sample


@dataclass
class GreedyResult:
    chosen: list[int]  # candidate indices in the order they joined
    individual: list[float]  # each candidate's own score
    steps: list[tuple[int, float, bool]] = field(default_factory=list)  # (tried, soup score, kept)

    @property
    def score(self) -> float:
        kept = [s for _, s, k in self.steps if k]
        return kept[-1] if kept else float("nan")

    def card_notes(self, names: Sequence[str]) -> str:
        """Markdown for the model card: the ranking, every step and the chosen members."""
        lines = ["## Greedy soup", "", "Candidates by their own held-out score:", ""]
        order = sorted(range(len(names)), key=lambda i: -self.individual[i])
        lines += [f"- `{names[i]}`: {self.individual[i]:.4f}" for i in order]
        lines += ["", "Steps (soup score with the candidate added):", ""]
        for i, s, kept in self.steps:
            lines.append(f"- `{names[i]}`: {s:.4f} ({'kept' if kept else 'left out'})")
        lines += ["", "Chosen (uniform soup): " + ", ".join(f"`{names[i]}`" for i in self.chosen)]
        return "\n".join(lines)


def greedy_select(n: int, score: Callable[[list[int]], float]) -> GreedyResult:
    """Greedy soup selection over candidates 0..n-1; `score(members)` is the held-out score
    of the uniform soup of those members (higher is better)."""
    individual = [score([i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: -individual[i])  # stable: ties keep input order
    best = order[0]
    result = GreedyResult([best], individual, [(best, individual[best], True)])
    current = individual[best]
    for i in order[1:]:
        s = score([*result.chosen, i])
        kept = s > current
        result.steps.append((i, s, kept))
        if kept:
            result.chosen.append(i)
            current = s
    return result


def greedy_soup_weights(
    models: Sequence[str], settings: EvalSettings
) -> tuple[list[float], GreedyResult]:
    """Soup weights (1 for chosen candidates, 0 for the rest) and the selection record."""
    from .evaluate import read_prompts

    data = read_prompts(settings.prompts, "--eval-prompts file", limit=settings.max_prompts)
    scorer = Scorer(
        settings.reward, settings.device, settings.allow_code, list(data.columns), data.where
    )
    tok, model = load_model(models[0], settings.device)
    states = [_state(model)] + [_state(load_model(m, settings.device)[1]) for m in models[1:]]
    cache: dict[tuple[int, ...], float] = {}

    @torch.no_grad()
    def score(members: list[int]) -> float:
        key = tuple(sorted(members))
        if key not in cache:
            model.load_state_dict(metrics.average_states([states[i] for i in key]))
            got = sample(model, tok, data.prompts, settings)
            cache[key] = metrics.mean_se(scorer.samples(got, data, tok))[0]
        return cache[key]

    result = greedy_select(len(models), score)
    weights = [1.0 if i in result.chosen else 0.0 for i in range(len(models))]
    return weights, result


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
