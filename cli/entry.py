"""The `rlmerge` executable: sets OpenMP's wait policy, then runs the app (cli/app.py).

libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when `import torch` loads it, so they
must be in the environment before anything imports torch: here, before the app is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping


def openmp_defaults(env: MutableMapping[str, str]) -> None:
    """Let idle OpenMP threads sleep (OMP_WAIT_POLICY=passive) instead of spinning, unless the
    user set a wait policy or a spin count.

    torch's threads spin between parallel ops by default; a merge is a series of large
    memory-bound ops with Python in between, so the spinning only burns CPU time and, on a
    machine with other work, takes cores from it and from our own threads. Measured on a
    shared 2-core VM (docs/recipes.md, "CPU threads"): a soup's CPU time -27% and wall -32%, a
    TIES merge's CPU time -46% and wall -38%.
    """
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "passive"


def main() -> None:
    if "torch" not in sys.modules:  # too late once torch is loaded: leave the env alone
        openmp_defaults(os.environ)
    from .app import main as run_app

    run_app()


if __name__ == "__main__":
    main()
