"""Trainer callbacks of `rlmerge train`: the metrics log and held-out evaluation.

MetricsLog writes one JSON object per Trainer log (step, loss, rewards, lr, ...) to
OUTPUT_DIR/metrics.jsonl and a one-line summary to the console. EvalCallback computes the
held-out measures of `evaluate.py` every `evaluation.eval_every` steps and writes them at once,
as their own record under the step they measured (before that step's checkpoint is saved, so a
resumed run keeps them).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import UsageError
from . import evaluate
from .data import (
    document_ids,
    is_conversational,
    prompt_ids,
    read_records,
    reward_columns,
    truncate_prompt,
    warn_overlap,
)
from .recipe import TrainRecipe

# console summary: these keys when present, in this order
SHOWN = (
    "loss",
    "reward",
    "rewards/margins",
    "rewards/accuracies",
    "kl",
    "lr",
    "eval/perplexity",
    "eval/kl",
    "eval/reward",
    "elastic/num_resets",
)
DEFAULT_CONTEXT = 2048  # evaluation window when the model config names no context length


def kept_records(path: Path, resumed_at: int) -> list[str]:
    """The lines of an old metrics log up to step `resumed_at`. A partial last line (a run
    killed while writing it) is dropped with a warning; a bad line before it is an error."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            if n == len(lines):
                warnings.warn(
                    f"{path}: dropped a partial last line (the previous run stopped while "
                    f"writing it): {line[:80]!r}",
                    stacklevel=2,
                )
                break
            raise UsageError(
                f"{path} line {n} is not a metrics record ({e}); fix or remove that line, or "
                "start over with --force."
            ) from e
        if step <= resumed_at:
            kept.append(line)
    return kept


class MetricsLog(TrainerCallback):
    def __init__(self, path: Path, echo: Any, resumed_at: int | None = None):
        """A fresh log, or on resume the old one cut after step `resumed_at` (the steps after
        the checkpoint are run again and logged anew)."""
        self.path, self.echo = Path(path), echo
        self.sources: list[Callable[[], Mapping[str, Any]]] = []  # polled at every Trainer log
        # the console line for a step's shown metrics (progress.TrainProgress adds total, ETA)
        self.line: Callable[[int, str], str] = lambda step, text: f"step {step}: {text}"
        if os.environ.get("RANK", "0") != "0":
            return  # under DDP only the main process writes (see on_log)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_at is not None and self.path.is_file():
            kept = kept_records(self.path, resumed_at)
        self.path.write_text("".join(x + "\n" for x in kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record for `step` now, and show its main numbers."""
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        shown = [f"{k} {_fmt(record[k])}" for k in SHOWN if k in record]
        if shown:
            self.echo(self.line(step, "  ".join(shown)))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        record = dict(logs or {})
        for source in self.sources:
            record.update(source())
        if "learning_rate" in record:
            record["lr"] = record["learning_rate"]
        self.write(state.global_step, record)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


class EvalCallback(TrainerCallback):
    """Drift and reward on held-out data, every eval_every optimizer steps (see evaluate.py and
    docs/training.md, "Evaluation")."""

    def __init__(
        self, recipe: TrainRecipe, log: MetricsLog, train_prompts: Sequence[Any] | None = None
    ):
        spec = recipe.evaluation
        assert spec is not None
        self.recipe, self.spec, self.log = recipe, spec, log
        n = spec.max_examples
        self.documents = (
            [
                r["text"]
                for r in read_records(spec.perplexity_text, "evaluation.perplexity_text", "text", n)
            ]
            if spec.perplexity_text
            else []
        )
        records = (
            read_records(spec.prompts, "evaluation.prompts", "prompt", n) if spec.prompts else []
        )
        self.prompts = [r["prompt"] for r in records]
        self.columns = reward_columns(records)  # as TRL passes them
        if spec.max_length is not None and spec.max_length <= spec.max_new_tokens:
            raise UsageError(
                f"evaluation.max_length ({spec.max_length}) must exceed evaluation.max_new_tokens "
                f"({spec.max_new_tokens}): the window holds the prompt and its completion."
            )
        self.funcs, self.weights = self._build_rewards()
        if self.funcs and self.prompts:  # fail now, not at the first evaluation
            from .rewards import check_columns

            check_columns(self.funcs, list(self.columns), f"evaluation.prompts {spec.prompts}")
        if train_prompts is not None and self.prompts:
            warn_overlap(self.prompts, train_prompts, f"dataset.path {recipe.dataset.path}")
        self._initial: Any = None
        self._inputs: tuple[list[list[int]], list[list[int]]] | None = None

    def _build_rewards(self) -> tuple[list[Any], list[float]]:
        if not self.spec.reward or self.recipe.reward is None:
            return [], []
        from .rewards import build_rewards

        return build_rewards(self.recipe.reward)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.spec.eval_every == 0 and state.is_world_process_zero:
            measured = self.measure(kw["model"], kw["processing_class"], trainer_state=state)
            self.log.write(state.global_step, measured)

    def window(self, model: Any) -> int:
        """Tokens per forward pass: evaluation.max_length, else the model's context."""
        if self.spec.max_length is not None:
            return self.spec.max_length
        context = getattr(model.config, "max_position_embeddings", None)
        return int(context) if context else DEFAULT_CONTEXT

    def inputs(self, model: Any, tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
        """Documents and prompts as token ids (computed once): documents with the tokenizer's
        special tokens (messages through the chat template); prompts as the trainer feeds them,
        cut to leave room for max_new_tokens in the window."""
        if self._inputs is None:
            docs = [
                document_ids(tokenizer, d, "evaluation.perplexity_text: a document")
                for d in self.documents
            ]
            room = self.window(model) - self.spec.max_new_tokens
            if room < 1:
                raise UsageError(
                    f"evaluation.max_new_tokens ({self.spec.max_new_tokens}) fills the model's "
                    f"context ({self.window(model)} tokens); lower it."
                )
            limit = "evaluation.max_length - max_new_tokens"  # named in a too-long error
            cut = [truncate_prompt(p, tokenizer, room, limit) for p in self.prompts]
            prompts = [prompt_ids(tokenizer, p) for p in cut]
            self._inputs = (docs, prompts)
        return self._inputs

    def measure(self, model: Any, tokenizer: Any, **extra: Any) -> dict[str, float]:
        """The held-out measures now; `extra` goes to the reward functions (trainer_state)."""
        was_training = model.training
        model.eval()
        try:
            out: dict[str, float] = {}
            docs, prompts = self.inputs(model, tokenizer)
            if docs:
                out["eval/perplexity"] = evaluate.perplexity(model, docs, self.window(model))
            if prompts and (self.spec.kl or self.funcs):
                done = evaluate.greedy_completions(
                    model, tokenizer, prompts, self.spec.max_new_tokens
                )
                if self.spec.kl:
                    out["eval/kl"] = evaluate.kl_to(model, self._initial_model(model), done)
                if self.funcs:
                    out["eval/reward"] = self._mean_reward(model, tokenizer, done, extra)
            return out
        finally:
            model.train(was_training)

    def _initial_model(self, like: Any) -> Any:
        """The initial policy, loaded once from its checkpoint on first use (frozen)."""
        if self._initial is None:
            from .reference import load_reference

            param = next(like.parameters())
            self._initial = load_reference(self.recipe.policy, param.dtype).to(param.device)
        return self._initial

    def _mean_reward(
        self, model: Any, tokenizer: Any, done: list[evaluate.Completion], extra: dict
    ) -> float:
        """The weighted reward sum (TRL's `reward`), averaged over the held-out prompts."""
        from .rewards import RewardModel, score, with_tokenizer

        param = next(model.parameters())
        # reward models load on first use, on the policy's device and in its dtype
        self.funcs = [
            RewardModel(f, param.device, param.dtype) if isinstance(f, str) else f
            for f in self.funcs
        ]
        completions: list[Any] = [
            [{"role": "assistant", "content": c.text}] if is_conversational(p) else c.text
            for p, c in zip(self.prompts, done, strict=True)
        ]
        values = score(
            with_tokenizer(self.funcs, tokenizer),
            self.weights,
            self.prompts,
            completions,
            [c.completion_ids.tolist() for c in done],
            self.columns,
            log_extra=_ignore,
            log_metric=_ignore,
            **extra,
        )
        return sum(values) / len(values)


def _ignore(*args: Any, **kw: Any) -> None:
    """TRL's log_extra / log_metric hooks: held-out evaluation logs only its mean reward."""
