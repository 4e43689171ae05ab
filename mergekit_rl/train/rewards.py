"""Reward functions for GRPO / RLOO, built from a recipe's `reward:` mapping.

Every built-in follows TRL's reward-function protocol: `f(prompts, completions, **kwargs)` returns
one float per completion; TRL passes `completion_ids` (token ids) among the kwargs. A completion
is a string, or a list of chat messages (the text of the last one is scored).

A reward model is passed to TRL as its checkpoint path (TRL loads it as a one-label sequence
classifier). A Python `module:function` is imported only when the caller allows code.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError
from .recipe import KeywordReward, LengthReward, RegexReward, RewardSpec, SentimentReward

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text to score: the string itself, or the last chat message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def keyword_reward(spec: KeywordReward) -> RewardFunc:
    """Occurrences of the words (count), or 1.0 if any occurs (presence)."""
    flags = 0 if spec.case_sensitive else re.IGNORECASE
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in spec.words) + r")\b", flags)

    def keyword(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float]:
        hits = [len(pattern.findall(completion_text(c))) for c in completions]
        return [float(h) if spec.mode == "count" else float(h > 0) for h in hits]

    return keyword


def regex_reward(spec: RegexReward) -> RewardFunc:
    """1.0 where the pattern is found in the completion, else 0.0."""
    try:
        pattern = re.compile(spec.pattern)
    except re.error as e:
        raise UsageError(f"reward.regex.pattern {spec.pattern!r} is not a valid regex: {e}") from e

    def regex(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float]:
        return [float(pattern.search(completion_text(c)) is not None) for c in completions]

    return regex


def length_reward(spec: LengthReward) -> RewardFunc:
    """-penalty * |n - target| / target, n the completion's length in tokens (words without ids)."""

    def length(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float]:
        ids = kw.get("completion_ids")
        sizes = (
            [len(i) for i in ids]
            if ids is not None
            else [len(completion_text(c).split()) for c in completions]
        )
        return [-spec.penalty * abs(n - spec.target) / spec.target for n in sizes]

    return length


def sentiment_reward(spec: SentimentReward) -> RewardFunc:
    """VADER's compound score of each completion: -1 (negative) to +1 (positive), 0 neutral."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise UsageError(
            'reward.sentiment needs the vaderSentiment package: pip install -e ".[lab]".'
        ) from e
    analyzer = SentimentIntensityAnalyzer()

    def sentiment(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float]:
        return [analyzer.polarity_scores(completion_text(c))["compound"] for c in completions]

    return sentiment


def import_function(call: str) -> RewardFunc:
    """`package.module:function` -> the function (the caller checked that code is allowed)."""
    module_name, _, name = call.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(
            f"reward.function.call '{call}' cannot be imported ({e}); check the module is on "
            "PYTHONPATH and defines that function."
        ) from e
    if not callable(func):
        raise UsageError(f"reward.function.call '{call}' is not callable.")
    return func


def build_rewards(spec: RewardSpec) -> tuple[list[RewardFunc | str], list[float]]:
    """TRL's `reward_funcs` (functions, or reward-model paths) and their weights, in key order."""
    funcs: list[RewardFunc | str] = []
    weights: list[float] = []
    for key, entry in spec.entries():
        if key == "keyword":
            funcs.append(keyword_reward(entry))
        elif key == "regex":
            funcs.append(regex_reward(entry))
        elif key == "length":
            funcs.append(length_reward(entry))
        elif key == "sentiment":
            funcs.append(sentiment_reward(entry))
        elif key == "model":
            funcs.append(entry.path)
        else:
            funcs.append(import_function(entry.call))
        weights.append(entry.weight)
    return funcs, weights


def score(
    funcs: Sequence[RewardFunc | Any],
    weights: Sequence[float],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
) -> list[float]:
    """Weighted sum of the reward functions (held-out evaluation; reward models skipped)."""
    total = [0.0] * len(completions)
    for f, w in zip(funcs, weights, strict=True):
        if not callable(f):
            continue
        values = f(prompts, completions, completion_ids=completion_ids)
        total = [t + w * (v or 0.0) for t, v in zip(total, values, strict=True)]
    return total
