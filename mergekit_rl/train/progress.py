"""Where a training run is and how long it has left, as a Trainer callback.

Three modes (the CLI picks one; `-q` and `--json` pick none):
- "bar": a rich progress bar on a terminal: step/total, loss, steps per second, ETA. The metrics
  lines (callbacks.MetricsLog) are printed above it through the same console.
- "lines": in a pipe, MetricsLog's line every `logging_steps` carries step/total, the rate and
  the ETA (`line`); no bar.
Only the main process shows anything (state.is_world_process_zero): under DDP every rank runs
the same callbacks.

The rate counts the optimizer steps of this session only (a resumed run starts its clock at the
checkpoint's step), so the ETA is (total - step) / rate.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from transformers import TrainerCallback

Mode = Literal["bar", "lines"]


def format_eta(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class TrainProgress(TrainerCallback):
    def __init__(self, mode: Mode, console: Any = None):
        self.mode = mode
        self.console = console  # a rich Console (the bar's, and where MetricsLog prints)
        self.total = 0
        self.start_step = 0
        self.t0 = time.monotonic()
        self.step = 0
        self.main = True
        self._bar: Any = None
        self._task: Any = None

    # -- numbers --------------------------------------------------------------------------------

    def rate(self) -> float | None:
        """Optimizer steps per second since this session's first step (None before one)."""
        done, elapsed = self.step - self.start_step, time.monotonic() - self.t0
        return done / elapsed if done > 0 and elapsed > 0 else None

    def eta(self) -> str:
        rate = self.rate()
        return format_eta((self.total - self.step) / rate) if rate else "?"

    def line(self, step: int, text: str) -> str:
        """MetricsLog's console line: step/total, its metrics, the rate and the ETA."""
        rate = self.rate()
        speed = f"{rate:.3g} steps/s" if rate else "- steps/s"
        return f"step {step}/{self.total}: {text}  {speed}  ETA {self.eta()}"

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.main = state.is_world_process_zero
        self.total, self.start_step = state.max_steps, state.global_step
        self.step, self.t0 = state.global_step, time.monotonic()
        if self.mode == "bar" and self.main:
            self._start_bar()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step = state.global_step
        if self._bar is not None:
            rate = self.rate()
            speed = f"{rate:.3g} steps/s" if rate else ""
            self._bar.update(self._task, completed=self.step, speed=speed)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        loss = (logs or {}).get("loss")
        if self._bar is not None and isinstance(loss, (int, float)):
            self._bar.update(self._task, loss=f"loss {loss:.4g}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = self._bar.add_task(
            "train", total=self.total, completed=self.step, loss="", speed=""
        )
        self._bar.start()
