"""docs/real-models.md runs: every command in it that needs neither the network nor GPUs runs on
the tiny demo models, with the shipped recipes/real/ files in which only the Hub model ids, the
dataset id, max_steps and gradient_accumulation_steps are replaced (every key as shipped).

The page's blocks are marked skipped for tests/test_docs_commands.py (they name Hub models);
this test runs the blocks whose marker points here, in order, in one fresh directory holding
`rlmerge demo demo` and a copy of recipes/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_rl.io.card import front_matter
from tests.test_docs_commands import ALLOWLIST, MARK, SHELLS, Command, _block_commands, script

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "real-models.md"
REAL = ROOT / "recipes" / "real"
HERE = "tests/test_real_models_doc.py"  # the skip markers of the blocks this test runs
# Hub id -> demo stand-in (longest ids first: an id may be the prefix of another)
STAND_INS = {
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "demo/models/sft2",
    "Qwen/Qwen2.5-0.5B-Instruct": "demo/models/sft1",
    "Qwen/Qwen2.5-0.5B": "demo/models/base",
    "meta-llama/Meta-Llama-3-8B-Instruct": "demo/models/sft1",
    "aaditya/Llama3-OpenBioLLM-8B": "demo/models/sft2",
    "meta-llama/Meta-Llama-3-8B": "demo/models/base",
    "trl-lib/ultrafeedback_binarized": "demo/ultrafeedback.jsonl",
}
NEEDS_NETWORK = ("hf ",)  # besides test_docs_commands.ALLOWLIST (pip install, accelerate launch)
DEMO_STEPS = 2


def demo_commands(text: str) -> list[Command]:
    """The commands of the blocks whose skip marker names this test, in document order."""
    lines, found, block = text.splitlines(), [], -1
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELLS:
            block += 1
            if HERE in lines[i - 1]:
                skipped: list = []
                found += _block_commands(lines[i + 1 : end], i + 2, block, DOC.name, "sh", skipped)
        i = end + 1
    return [c for c in found if not c.text.startswith(NEEDS_NETWORK + tuple(ALLOWLIST))]


def stand_in(text: str) -> str:
    for hub_id, local in STAND_INS.items():
        text = text.replace(hub_id, local)
    return text


def ultrafeedback_like(path: Path) -> None:
    """The demo preference pairs in trl-lib/ultrafeedback_binarized's layout: chosen / rejected
    chats that both start with the user's turn (no prompt column), plus the score columns."""
    rows = [
        json.loads(x)
        for x in (ROOT / "recipes/train/data/prefs.jsonl").read_text().split("\n")
        if x
    ]
    with path.open("w") as f:
        for r in rows:
            user = {"role": "user", "content": r["prompt"]}
            f.write(
                json.dumps(
                    {
                        "chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                        "rejected": [user, {"role": "assistant", "content": r["rejected"]}],
                        "score_chosen": 8.0,
                        "score_rejected": 4.0,
                    }
                )
                + "\n"
            )


def prepare(work: Path) -> None:
    """demo/ (the tiny models), the stand-in dataset, recipes/ with recipes/real rewritten."""
    subprocess.run(
        [sys.executable, "-m", "mergekit_rl.cli.app", "demo", "demo", "-q"], cwd=work, check=True
    )
    ultrafeedback_like(work / "demo" / "ultrafeedback.jsonl")
    shutil.copytree(ROOT / "recipes", work / "recipes")
    for path in (work / "recipes" / "real").glob("*.yaml"):
        doc = yaml.safe_load(stand_in(path.read_text()))
        if "training" in doc:  # the same keys; a 2-step run of single batches
            doc["training"]["max_steps"] = DEMO_STEPS
            doc["training"]["gradient_accumulation_steps"] = 1
        path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_the_page_has_the_commands_it_promises() -> None:
    cmds = [c.text for c in demo_commands(DOC.read_text())]
    assert any(c.startswith("rlmerge soup Qwen/") for c in cmds)
    assert any(c.startswith("rlmerge interpolate Qwen/") for c in cmds)
    assert "rlmerge train recipes/real/qwen2.5-0.5b-dpo-ondare.yaml" in cmds
    assert any(c.startswith("rlmerge eval runs/qwen-dpo-ondare/final") for c in cmds)
    assert "rlmerge merge recipes/real/llama3-8b-ties.yaml -o out/llama3-8b-ties" in cmds
    assert "rlmerge train recipes/real/llama3-8b-dpo-ondare.yaml --dry-run" in cmds
    text = DOC.read_text()
    assert "accelerate launch --config_file recipes/real/accelerate/ddp-8gpu.yaml" in text
    assert "hf upload " in text
    # every recipe file the page names is shipped
    for name in re.findall(r"recipes/real/[\w./-]+\.(?:yaml|jsonl|txt)", text):
        assert (ROOT / name).is_file(), name


def test_shipped_real_recipes_validate_offline() -> None:
    """`rlmerge validate` on the recipes as shipped (Hub ids, a Hub dataset): no network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    names = sorted(str(p.relative_to(ROOT)) for p in REAL.glob("*.yaml"))
    assert len(names) == 3
    res = subprocess.run(
        [sys.executable, "-m", "mergekit_rl.cli.app", "validate", *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [  # validate's report is its result: stdout
        "ok recipes/real/llama3-8b-dpo-ondare.yaml (train recipe, dpo)",
        "ok recipes/real/llama3-8b-ties.yaml (1 stage)",
        "ok recipes/real/qwen2.5-0.5b-dpo-ondare.yaml (train recipe, dpo)",
    ]


def test_accelerate_config_is_an_8_process_ddp_config() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REAL / "accelerate" / "ddp-8gpu.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 8
    assert config.mixed_precision == "no"  # the recipe decides


@pytest.mark.slow
def test_page_commands_run_on_the_demo_models(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the recipes report to TensorBoard (dev extra)")
    prepare(tmp_path)
    cmds = [
        Command(c.doc, c.line, c.block, stand_in(c.text)) for c in demo_commands(DOC.read_text())
    ]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    proc = subprocess.run(
        ["bash", "-c", script(cmds, tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    codes = {int(k): int(rc) for k, rc in re.findall(rf"^{MARK} (\d+) (\d+)$", proc.stdout, re.M)}
    failed = [
        f"{DOC.name}:{c.line}: `{c.text}` exited {codes.get(k)}"
        for k, c in enumerate(cmds)
        if codes.get(k) != 0
    ]
    assert not failed, "\n".join(failed) + "\n--- output (tail) ---\n" + proc.stdout[-4000:]
    # what the page says the commands make
    final = tmp_path / "runs" / "qwen-dpo-ondare" / "final"
    meta = front_matter((final / "README.md").read_text())
    assert meta["base_model"] == "demo/models/sft1" and meta["base_model_relation"] == "finetune"
    assert meta["tags"] == ["rlmerge", "trl", "dpo", "ondare"]
    steps = [
        json.loads(x)["step"] for x in (final.parent / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == DEMO_STEPS
    assert list((final.parent / "runs").rglob("events.out.tfevents.*"))  # report_to: tensorboard
    soup = front_matter((tmp_path / "out" / "qwen-soup" / "README.md").read_text())
    assert soup["base_model"] == ["demo/models/sft1", "demo/models/sft2"]
    assert (tmp_path / "out" / "qwen-interp" / "alpha-0.5" / "model.safetensors").is_file()
    ties = front_matter((tmp_path / "out" / "llama3-8b-ties" / "README.md").read_text())
    assert ties["base_model_relation"] == "merge"
    scores = json.loads((tmp_path / "qwen-scores.json").read_text())
    assert scores["ok"] is True
