"""kill -9 at chosen moments of soup, interpolate (an alpha list) and merge: the output is
absent or byte-for-byte the uninterrupted run's; the next run to the same output removes the
dead writer's temporary files. (bench/faults.py runs >= 30 kills per command.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.faults.harness import kill_trial, leftovers, reference_run


def commands(family: dict[str, Path], tmp_path: Path) -> dict[str, list[str]]:
    recipe = tmp_path / "ties.yaml"
    models = [{"model": str(family[m]), "parameters": {"weight": 0.5, "density": 0.5}}
              for m in ("sft1", "sft2")]  # fmt: skip
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "ties", "base_model": str(family["base"]), "models": models}
        )
    )
    out, shard = str(tmp_path / "out" / "model"), ["--max-shard-size", "100KB", "--quiet"]
    sft1, sft2, rlhf = (str(family[k]) for k in ("sft1", "sft2", "rlhf"))
    return {
        "soup": ["soup", sft1, sft2, "-o", out, *shard],
        "interpolate": ["interpolate", sft1, rlhf, "-o", out, "--alpha", "0,0.5,1", *shard],
        "merge": ["merge", str(recipe), "-o", out, "--quiet"],
    }


@pytest.mark.slow  # a subprocess per command, killed and rerun
@pytest.mark.parametrize("command", ["soup", "interpolate", "merge"])
def test_kill_9_leaves_nothing_or_the_whole_output(
    family: dict[str, Path], tmp_path: Path, command: str
) -> None:
    args = commands(family, tmp_path)[command]
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    reference, window = reference_run(args, out)
    assert len(reference) >= 4  # several shards, config, card
    # late in the write window, then earlier until a kill hits the running writer (timings on
    # a shared machine vary from run to run)
    trials, delay = [], 0.8 * window
    while len(trials) < 5 and not any(t.killed and t.leftovers for t in trials):
        trials.append(kill_trial(args, out, reference, delay))
        delay /= 4
    for t in trials:
        assert t.state in ("absent", "complete"), t
        assert t.cleaned in (None, True), t  # the next run removed leftovers, wrote the same
    assert any(t.killed and t.leftovers for t in trials), trials  # a kill hit a running writer
    assert leftovers(out.parent) == []
