"""Trainer callbacks of `rlmerge train`: the metrics log and held-out evaluation.

MetricsLog writes one JSON object per Trainer log (step, loss, rewards, lr, ...) to
OUTPUT_DIR/metrics.jsonl and a one-line summary to the console. EvalCallback computes the
held-out measures of `evaluate.py` every `evaluation.eval_every` steps and hands them to the log,
which adds them to the next record.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import evaluate
from .data import read_lines
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


class MetricsLog(TrainerCallback):
    def __init__(self, path: Path, echo: Any, resumed_at: int | None = None):
        """A fresh log, or on resume the old one cut after step `resumed_at` (the steps after
        the checkpoint are run again and logged anew)."""
        self.path, self.echo = Path(path), echo
        self.pending: dict[str, float] = {}
        self.sources: list[Callable[[], Mapping[str, Any]]] = []  # polled at every record
        if os.environ.get("RANK", "0") != "0":
            return  # under DDP only the main process writes (see on_log)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_at is not None and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= resumed_at]
        self.path.write_text("".join(x + "\n" for x in kept))

    def add(self, metrics: dict[str, float]) -> None:
        """Metrics to include in the next record (held-out evaluation, resets)."""
        self.pending.update(metrics)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **(logs or {}), **self.pending}
        for source in self.sources:
            record.update(source())
        if "learning_rate" in record:
            record["lr"] = record["learning_rate"]
        self.pending = {}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        shown = [f"{k} {_fmt(record[k])}" for k in SHOWN if k in record]
        if shown:
            self.echo(f"step {state.global_step}: " + "  ".join(shown))


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


class EvalCallback(TrainerCallback):
    """Drift and reward on held-out data, every eval_every optimizer steps."""

    def __init__(self, recipe: TrainRecipe, log: MetricsLog):
        spec = recipe.evaluation
        assert spec is not None
        self.recipe, self.spec, self.log = recipe, spec, log
        n = spec.max_examples
        self.texts = (
            read_lines(spec.perplexity_text, "evaluation.perplexity_text", "text", n)
            if (spec.perplexity_text)
            else []
        )
        self.prompts = (
            read_lines(spec.prompts, "evaluation.prompts", "prompt", n) if (spec.prompts) else []
        )
        self._initial: Any = None
        self._rewards: tuple[list[Any], list[float]] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.spec.eval_every == 0 and state.is_world_process_zero:
            self.log.add(self.measure(kw["model"], kw["processing_class"]))

    def measure(self, model: Any, tokenizer: Any) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            out: dict[str, float] = {}
            max_len = self.recipe.training.max_length
            if self.texts:
                out["eval/perplexity"] = evaluate.perplexity(model, tokenizer, self.texts, max_len)
            if self.prompts and (self.spec.kl or self._reward_funcs()):
                done = evaluate.greedy_completions(
                    model, tokenizer, self.prompts, self.spec.max_new_tokens
                )
                if self.spec.kl:
                    out["eval/kl"] = evaluate.kl_to(model, self._initial_model(model), done)
                if self._reward_funcs():
                    out["eval/reward"] = self._mean_reward(done)
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

    def _reward_funcs(self) -> list[Any]:
        if not self.spec.reward or self.recipe.reward is None:
            return []
        if self._rewards is None:
            from .rewards import build_rewards

            self._rewards = build_rewards(self.recipe.reward)
        return self._rewards[0]

    def _mean_reward(self, done: list[evaluate.Completion]) -> float:
        from .rewards import score

        funcs, weights = self._rewards or ([], [])
        values = score(
            funcs,
            weights,
            self.prompts,
            [c.text for c in done],
            [c.completion_ids.tolist() for c in done],
        )
        return sum(values) / len(values)
