"""Progress reporting: a rich bar on a terminal, plain lines in CI, nothing when quiet."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Protocol


class Reporter(Protocol):
    def start(self, total_tensors: int, total_bytes: int, label: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self) -> None: ...


class NullReporter:
    def start(self, total_tensors: int, total_bytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


# Plain progress (a pipe, a log, CI): nothing for work shorter than this, then at most one line
# per this many seconds, so a fast merge prints no progress and a long one a few lines a minute.
PLAIN_PROGRESS_INTERVAL_S = 5.0


class PlainReporter:
    """Lines on stderr for logs: `label: 40% of 12 tensors, 3.1 GB (10.0s)`, the first after
    `interval_s` and then at most one per `interval_s`; none for work shorter than that."""

    def __init__(
        self,
        interval_s: float = PLAIN_PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s, self.clock = interval_s, clock

    def start(self, total_tensors: int, total_bytes: int, label: str) -> None:
        self.total, self.done, self.label = max(total_bytes, 1), 0, label
        self.what = f"{total_tensors} tensors, {total_bytes / 1e9:.1f} GB"
        self.t0 = self.clock()
        self.next_line = self.t0 + self.interval_s

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        if now >= self.next_line:
            frac = self.done / self.total
            print(
                f"{self.label}: {frac:4.0%} of {self.what} ({now - self.t0:.1f}s)", file=sys.stderr
            )
            self.next_line = now + self.interval_s

    def finish(self) -> None:
        pass


class RichReporter:
    """Bar with tensors, bytes and ETA."""

    def start(self, total_tensors: int, total_bytes: int, label: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[tensors]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.n, self.total_tensors = 0, total_tensors
        self.progress.start()
        self.task = self.progress.add_task(label, total=total_bytes, tensors=f"0/{total_tensors}")

    def advance(self, nbytes: int) -> None:
        self.n += 1
        self.progress.update(self.task, advance=nbytes, tensors=f"{self.n}/{self.total_tensors}")

    def finish(self) -> None:
        self.progress.stop()


def make_reporter(mode: str = "auto") -> Reporter:
    """auto: rich on an interactive terminal outside CI, plain otherwise."""
    if mode == "none":
        return NullReporter()
    if mode == "plain":
        return PlainReporter()
    if sys.stderr.isatty() and not os.environ.get("CI"):
        return RichReporter()
    return PlainReporter()
