"""Fault-injection helpers shared by tests/faults and bench/faults.py (no tests in here).

A trial runs one `rlmerge` command in a fresh process, SIGKILLs it at a chosen moment and
classifies what is left at the output path: absent, complete (byte for byte equal to an
uninterrupted run of the same command) or corrupt; and which temporary or lock files remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RLMERGE = [sys.executable, "-m", "mergekit_rl.cli.app"]
MARKS = (".rlmerge-tmp-", ".rlmerge-lock")


def run(args: Sequence[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess:
    """`rlmerge ARGS` in a fresh process, output captured."""
    return subprocess.run(
        [*RLMERGE, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def leftovers(parent: Path) -> list[Path]:
    """Temporary directories and lock files of rlmerge writers directly under `parent`."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if any(m in p.name for m in MARKS))


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under `out` (or `out` itself when a file): relative path -> bytes."""
    if out.is_file():
        return {out.name: out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def remove(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@dataclass
class Trial:
    delay: float  # seconds after the first temp/lock file appeared (or after start) to the kill
    killed: bool  # False: the command finished before the kill
    state: str  # absent | complete | corrupt
    leftovers: int  # temp dirs / lock files right after the kill
    cleaned: bool | None  # the next run removed them and wrote the right output (None: not run)


def kill_trial(
    args: Sequence[str],
    out: Path,
    reference: dict[str, bytes],
    delay: float,
    from_start: bool = False,
    rerun: bool = True,
) -> Trial:
    """Run `rlmerge ARGS`, SIGKILL it `delay` s after its first temp file appears (or after
    start), classify the output, then (rerun) run the command again to the same output and
    check that it removes the leftovers and writes the reference. Leaves `out` removed."""
    parent = out.parent
    proc = subprocess.Popen([*RLMERGE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    if not from_start:  # wait for the writer to start (poll every ms)
        while proc.poll() is None and not leftovers(parent):
            time.sleep(0.001)
        t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < delay:
        time.sleep(0.0005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not os.path.lexists(out):
        state = "absent"
    else:
        state = "complete" if snapshot(out) == reference else "corrupt"
    left = leftovers(parent)
    cleaned = None
    if rerun and (left or state != "complete"):
        force = ["--force"] if os.path.lexists(out) else []
        done = run([*args, *force])
        cleaned = done.returncode == 0 and not leftovers(parent) and snapshot(out) == reference
    remove(out)
    return Trial(delay, killed, state, len(left), cleaned)


def reference_run(args: Sequence[str], out: Path) -> tuple[dict[str, bytes], float]:
    """An uninterrupted run: the output's bytes, and the seconds from the writer's first temp
    file to the commit that removes it (the window the kills aim at). Leaves `out` removed."""
    proc = subprocess.Popen([*RLMERGE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and not leftovers(out.parent):
        time.sleep(0.001)
    t0 = time.monotonic()
    while proc.poll() is None and leftovers(out.parent):  # until the commit removes them
        time.sleep(0.001)
    window = time.monotonic() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rlmerge {' '.join(args)} failed: {err.decode()[-2000:]}")
    ref = snapshot(out)
    remove(out)
    return ref, window
