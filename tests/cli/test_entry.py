"""The `rlmerge` executable sets OpenMP's passive wait policy before torch loads, unless the
user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

from mergekit_rl.cli.entry import openmp_defaults

# records whether torch was loaded when the policy was set, and what torch's process saw
CHILD = """
import os, sys
from mergekit_rl.cli import entry
seen = []
real = entry.openmp_defaults
entry.openmp_defaults = lambda env: (seen.append("torch" in sys.modules), real(env))
sys.argv = ["rlmerge", "--version"]
try:
    entry.main()
except SystemExit:
    pass
print("torch loaded first:", seen, "policy:", os.environ.get("OMP_WAIT_POLICY"))
"""


def test_passive_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    openmp_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "passive"}
    for user in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "100000"}):
        env = dict(user)
        openmp_defaults(env)
        assert env == user


def test_the_executable_sets_it_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "torch loaded first: [False] policy: passive" in out, out
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "policy: active" in out, out
