"""Progress reporting: a rich bar on a terminal, plain lines in CI, nothing when quiet."""

from __future__ import annotations

import os
import sys
import time
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


class PlainReporter:
    """One line on stderr per 10% of the bytes: readable in CI logs."""

    def start(self, total_tensors: int, total_bytes: int, label: str) -> None:
        self.total, self.done, self.next_mark, self.t0 = max(total_bytes, 1), 0, 0.1, time.time()
        self.label = label
        print(f"{label}: {total_tensors} tensors, {total_bytes / 1e6:.1f} MB", file=sys.stderr)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        frac = self.done / self.total
        if frac >= self.next_mark:
            print(f"{self.label}: {frac:4.0%} ({time.time() - self.t0:.1f}s)", file=sys.stderr)
            while self.next_mark <= frac:
                self.next_mark += 0.1

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
