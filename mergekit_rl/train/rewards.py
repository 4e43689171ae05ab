"""Reward functions for GRPO / RLOO, built from a recipe's `reward:` mapping.

Every built-in follows TRL's reward-function protocol: `f(prompts, completions, **kwargs)` returns
one float per completion; TRL passes `completion_ids` (token ids) among the kwargs. A completion
is a string, or a list of chat messages (the text of the last one is scored).

A reward model is passed to TRL as its checkpoint path (TRL loads it as a one-label sequence
classifier); held-out evaluation loads it as `RewardModel`, which scores it the same way. A Python
`module:function` is imported only when the caller allows code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import RunError, UsageError
from .recipe import KeywordReward, LengthReward, RegexReward, RewardSpec, SentimentReward

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text to score: the string itself, or the last chat message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def keyword_pattern(words: Sequence[str]) -> str:
    """A regex matching any of the words; a word boundary is required only at an edge that is a
    word character, so `merge` does not match inside `merged` while `<answer>`, `</think>` and
    `C++` match wherever they occur. Longer words first: `merge weights` wins over `merge`."""

    def one(w: str) -> str:
        head = r"\b" if re.match(r"\w", w[0]) else ""
        tail = r"\b" if re.match(r"\w", w[-1]) else ""
        return head + re.escape(w) + tail

    return "|".join(one(w) for w in sorted(words, key=len, reverse=True))


def special_ids(tokenizer: Any) -> dict[int, str]:
    """The tokens `decode(skip_special_tokens=True)` drops: id -> token text."""
    out = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in tokenizer.all_special_ids:
        out.setdefault(i, tokenizer.convert_ids_to_tokens(i))
    return out


class Keyword:
    """The keyword reward: occurrences of the words (count), or 1.0 if any occurs (presence).

    TRL decodes completions without special tokens, so a word that is a special token of the
    policy's tokenizer (`<answer>` registered with add_special_tokens) is never in that text.
    Given the tokenizer, such completions are decoded again from `completion_ids` with the
    special tokens that a word names kept (the others, eos included, still dropped)."""

    __name__ = "keyword"  # TRL logs a reward function under its __name__

    def __init__(self, spec: KeywordReward, tokenizer: Any = None) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        flags = 0 if spec.case_sensitive else re.IGNORECASE
        self.pattern = re.compile(keyword_pattern(spec.words), flags)
        special = special_ids(tokenizer) if tokenizer is not None else {}
        self.named = {i for i, text in special.items() if self.pattern.fullmatch(text)}
        self.drop = set(special) - self.named

    def text(self, completion: Any, ids: Sequence[int] | None) -> str:
        if not self.named or ids is None:
            return completion_text(completion)
        kept = [i for i in ids if i not in self.drop]
        return self.tokenizer.decode(kept, skip_special_tokens=False)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any
    ) -> list[float]:
        ids = kw.get("completion_ids") or [None] * len(completions)
        texts = [self.text(c, i) for c, i in zip(completions, ids, strict=True)]
        hits = [len(self.pattern.findall(t)) for t in texts]
        return [float(h) if self.spec.mode == "count" else float(h > 0) for h in hits]


def keyword_reward(spec: KeywordReward, tokenizer: Any = None) -> RewardFunc:
    """The keyword reward (see Keyword); `tokenizer` is the policy's."""
    return Keyword(spec, tokenizer)


def with_tokenizer(funcs: Sequence[Any], tokenizer: Any) -> list[Any]:
    """The reward functions with the keyword reward reading ids through `tokenizer` (the one
    that decoded the completions); the others as they are."""
    return [Keyword(f.spec, tokenizer) if isinstance(f, Keyword) else f for f in funcs]


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


def build_rewards(
    spec: RewardSpec, tokenizer: Any = None
) -> tuple[list[RewardFunc | str], list[float]]:
    """TRL's `reward_funcs` (functions, or reward-model paths) and their weights, in key order;
    `tokenizer` (the policy's) lets the keyword reward see the special tokens its words name."""
    funcs: list[RewardFunc | str] = []
    weights: list[float] = []
    for key, entry in spec.entries():
        if key == "keyword":
            funcs.append(keyword_reward(entry, tokenizer))
        elif key == "regex":
            funcs.append(regex_reward(entry))
        elif key == "length":
            funcs.append(length_reward(entry))
        elif key == "sentiment":
            funcs.append(sentiment_reward(entry))
        elif key == "model":
            if Path(entry.path).is_dir():  # a hub id is checked when it is loaded
                check_reward_model(entry.path)
            funcs.append(entry.path)
        else:
            funcs.append(import_function(entry.call))
        weights.append(entry.weight)
    return funcs, weights


# keyword arguments TRL passes besides dataset columns (never required columns)
TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def required_columns(func: Any) -> list[str]:
    """Dataset columns a reward function needs: its parameters without a default, besides
    prompts, completions and the keyword arguments TRL always passes."""
    if not callable(func):
        return []
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    skip = {"prompts", "completions", *TRL_KWARGS}
    return [
        p.name
        for p in params
        if p.kind in named and p.default is inspect.Parameter.empty and p.name not in skip
    ]


def check_columns(funcs: Sequence[Any], columns: Sequence[str], where: str) -> None:
    """UsageError naming the columns that a reward function needs and `where` lacks."""
    for f in funcs:
        missing = [c for c in required_columns(f) if c not in columns]
        if missing:
            name = getattr(f, "__name__", str(f))
            raise UsageError(
                f"reward function '{name}' takes column(s) {missing}, which {where} lacks (it has "
                f"{sorted(columns)}); TRL passes each dataset column to the reward functions by name."
            )


def check_reward_model(path: str) -> None:
    """UsageError for a checkpoint saved as a classifier with several labels: TRL (and
    `RewardModel`) load a reward model with one output and read that one logit, so the score of
    a multi-label classifier would be a new, untrained head. A checkpoint without labels (say a
    causal LM) gets a new one-output head, as in TRL."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path)
    labels = config.get("id2label") or {}
    if len(labels) > 1:
        names = ", ".join(str(v) for v in labels.values())
        raise UsageError(
            f"reward.model.path '{path}' is a classifier with {len(labels)} labels ({names}); "
            "a reward model must have one output (num_labels: 1), its score. Train or export a "
            "one-label head, or write a reward.function that turns this classifier's labels "
            "into one number."
        )


class RewardModel:
    """A sequence-classification reward model as a reward function, scored as TRL 1.16 scores
    it: prompt + completion text (the chat template for messages), the model's own tokenizer
    (its eos as the pad token when it has none), right padding, no added special tokens, the
    one logit of a one-label head, read at the last non-pad token. Used by `rlmerge eval` and
    training's held-out evaluation alike."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(path)
        self.__name__ = Path(path).name or path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype
        ).to(device)
        self.model.eval()
        # the score is read at the last non-pad token, found through the pad id
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        if prompts and isinstance(prompts[0], list):  # chat messages
            return [
                self.tokenizer.apply_chat_template(p + c, tokenize=False)
                for p, c in zip(prompts, completions, strict=True)
            ]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any
    ) -> list[float]:
        texts, out = self.texts(prompts, completions), []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            ).to(device)
            out.append(self.model(**batch).logits[:, 0].float())  # [B]
        return torch.cat(out).tolist()  # one host sync for all completions


def score(
    funcs: Sequence[RewardFunc],
    weights: Sequence[float],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]] | None = None,
    **extra: Any,
) -> list[float]:
    """Weighted sum of the reward functions, called as TRL calls them: prompts, completions,
    completion_ids, every other dataset column by name, and `extra` (trainer_state, ...).
    Reward models must already be callables (`RewardModel`); None counts as 0."""
    total = [0.0] * len(completions)
    kwargs = {**(columns or {}), **extra}
    for f, w in zip(funcs, weights, strict=True):
        values = f(prompts, completions, completion_ids=completion_ids, **kwargs)
        if len(values) != len(completions):
            name = getattr(f, "__name__", str(f))
            raise RunError(
                f"reward function '{name}' returned {len(values)} values for "
                f"{len(completions)} completions."
            )
        total = [t + w * (v or 0.0) for t, v in zip(total, values, strict=True)]
    return total
