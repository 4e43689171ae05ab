"""Plain progress (pipes, logs): nothing for short work, then one line per interval at most."""

from __future__ import annotations

import pytest

from mergekit_rl.progress import PLAIN_PROGRESS_INTERVAL_S, PlainReporter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_short_work_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    rep = PlainReporter(clock=clock)
    rep.start(21, 428_800, "soup")
    for _ in range(21):  # a 0.02 s soup
        clock.now += 0.001
        rep.advance(428_800 // 21)
    rep.finish()
    assert capsys.readouterr().err == ""
    assert PLAIN_PROGRESS_INTERVAL_S >= 2.0  # "every few seconds"


def test_long_work_prints_one_line_per_interval(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    rep = PlainReporter(interval_s=2.0, clock=clock)
    rep.start(100, 100 * 10**9, "merge")
    for _ in range(100):  # 0.25 s per tensor: 25 s in all
        clock.now += 0.25
        rep.advance(10**9)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 12  # at 2, 4, ..., 24 s
    assert lines[0] == "merge:   8% of 100 tensors, 100.0 GB (2.0s)"
    assert lines[-1] == "merge:  96% of 100 tensors, 100.0 GB (24.0s)"
