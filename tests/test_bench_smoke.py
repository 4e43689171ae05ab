"""The benchmark scripts in bench/ still run: each on an ~8 MB generated model, briefly.

They are scripts, not package code, so they run here as subprocesses (as a user runs them),
with RLMERGE_BENCH_WORK pointing at a temporary directory.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# every test starts bench scripts as subprocesses (launches.py on the TinyLlama layout alone
# takes minutes on 2 cores): the fast subset (-m "not slow") leaves them to the full run
pytestmark = pytest.mark.slow


def run_script(work: Path, script: str, *args: str) -> str:
    env = {**os.environ, "RLMERGE_BENCH_WORK": str(work), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(BENCH / script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def ratio_of(num: float, den: float) -> object:
    """The ratio a bench reports (rounded to 2 decimals from unrounded seconds) of seconds it
    reports rounded to 4 decimals: equal up to both roundings."""
    ratio = num / den
    return pytest.approx(ratio, abs=0.005 + 0.00005 * (1 + ratio) / den + 1e-9)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("bench")
    run_script(work, "make_models.py", "--size", "micro", "--n", "3", "--out", str(work / "micro"))
    return work


def tensor_bytes(shard: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and header."""
    with open(shard, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return shard.stat().st_size - 8 - header_len


def test_floor_writes_one_models_tensor_bytes_per_copy(work: Path) -> None:
    m1, m2 = work / "micro" / "m1", work / "micro" / "m2"
    out = work / "floor"
    printed = run_script(
        work, "floor.py", "--inputs", str(m1), str(m2), "--out", str(out), "--copies", "2"
    )
    expected = sum(tensor_bytes(s) for s in m1.glob("*.safetensors"))
    assert expected > 4_000_000  # the micro model is ~8 MB
    for k in range(2):
        assert sum(f.stat().st_size for f in (out / f"copy-{k}").iterdir()) == expected
    assert json.loads(printed)["bytes_written"] == 2 * expected


@pytest.mark.slow
def test_bench_io_and_merge_record_every_run(work: Path) -> None:
    common = ["--sizes", "micro", "--repeats", "1", "--cache", "warm", "--max-wait", "0"]
    run_script(work, "bench_io.py", *common, "--cases", "a=0.5")
    run_script(work, "bench_merge.py", *common, "--cases", "linear")
    for tag, case in [("io", "interpolate a=0.5"), ("merge", "linear")]:
        data = json.loads((work / f"{tag}-micro.json").read_text())
        assert sorted(r["kind"] for r in data["runs"]) == ["floor", "tool"]
        (row,) = data["rows"]
        assert row["case"] == case
        assert row["ratio"] == ratio_of(row["tool_s"], row["floor_s"])
        assert row["engine_s"] is not None and 0 < row["engine_s"] < row["tool_s"]
        above = row["peak_rss_mib"] - data["idle_torch_mib"]
        assert row["above_idle_mib"] == pytest.approx(above, abs=1)
        assert case in (work / f"{tag}.md").read_text()
    assert not (work / "out" / "linear").exists()  # outputs are removed after every run


@pytest.mark.slow
def test_compare_commits_runs_each_tree_and_digests_its_outputs(work: Path) -> None:
    repo = str(BENCH.parent)  # the same tree twice: the same outputs, bit for bit
    args = ["--tree", f"a={repo}", "--tree", f"b={repo}", "--size", "micro", "--repeats", "1"]
    methods = ["--methods", "linear", "ties", "--threads", "1", "--floor"]
    run_script(work, "compare_commits.py", *args, *methods)
    data = json.loads((work / "compare-micro.json").read_text())
    assert sorted((r["method"], r["side"]) for r in data["runs"]) == [
        ("linear", "a"),
        ("linear", "b"),
        ("linear", "floor"),
        ("ties", "a"),
        ("ties", "b"),
        ("ties", "floor"),
    ]
    for method in ("linear", "ties"):
        rows = {r["tree"]: r for r in data["rows"] if r["method"] == method}
        assert rows["a"]["digests"] == rows["b"]["digests"] and len(rows["a"]["digests"]) == 1
        assert rows["b"]["cpu_ratio"] == ratio_of(rows["b"]["cpu_s"], rows["a"]["cpu_s"])
        assert rows["a"]["engine_s"] > 0
        assert rows["floor"]["floor_ratio"] == 1.0 and not rows["floor"]["digests"]
        for row in rows.values():  # the child's own kernel time and fresh pages
            assert row["minor_faults"] > 1000 and 0 < row["sys_s"] <= row["cpu_s"]
    linear, ties = (data["rows"][0]["digests"], data["rows"][3]["digests"])
    assert linear != ties  # the digest sees the tensors
    assert data["machine"]["run threads"] == "1"
    assert not (work / "out" / "compare").exists()  # outputs are removed after every run


@pytest.mark.slow
def test_bench_optim_counts_adamw_state_exactly(work: Path) -> None:
    run_script(
        work, "bench_optim.py", "--size", "tiny", "--rounds", "1", "--steps", "2", "--no-cold"
    )
    data = json.loads((work / "optim.json").read_text())
    runs = {r["mode"]: r for r in data["runs"]}
    assert set(runs) == {"adamw", "ondare", "onties"}
    adamw = runs["adamw"]
    n_tensors = 2 + 9 * 2 + 1  # embed, lm_head; 9 per layer x 2 layers; final norm
    # two float32 moments per parameter and one float32 step counter per tensor
    assert adamw["state_bytes"] == 8 * adamw["params"] + 4 * n_tensors
    assert all(len(r["step_s"]) == 2 for r in runs.values())
    (elastic,) = data["elastic"]
    assert elastic["resets"] >= 3 and len(elastic["reset_step_s"]) == 3


@pytest.mark.slow
def test_gpu_bench_small_runs_on_the_cpu_and_reports_ratios(tmp_path: Path) -> None:
    printed = run_script(tmp_path, "gpu.py", "--small", "--steps", "1", "--recipes", "soup", "ties")
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["size"] == "small" and data["device"] == "CPU"
    assert [r["recipe"] for r in data["merges"]] == ["soup", "ties"]
    for r in data["merges"]:
        assert r["floor_s"] > 0 and r["rlmerge_x_floor"] == ratio_of(r["rlmerge_s"], r["floor_s"])
    names = [r["optimizer"] for r in data["optimizer"]]
    for want in ("torch AdamW fused", "torch AdamW foreach", "rlmerge OnDARE", "rlmerge OnTIES"):
        assert want in names
    assert any(n.startswith("released OnDARE") for n in names)
    assert any(n.startswith("released OnTIES") for n in names)
    assert "Elastic Reset EMA update" in names
    fused = next(r for r in data["optimizer"] if r["optimizer"] == "torch AdamW fused")
    assert fused["x_fused_adamw"] == 1.0
    assert "| ties |" in printed and "| rlmerge OnTIES |" in printed
    assert not (tmp_path / "gpu" / "small").exists()  # the built models are removed


def test_launches_counts_calls_on_the_accelerator_path(tmp_path: Path) -> None:
    printed = run_script(tmp_path, "launches.py", "--params", "4")
    rows = json.loads((tmp_path / "launches.json").read_text())["rows"]
    assert len(rows) == 8 and "| ondare | float32 | 0.0 |" in printed
    for r in rows:
        assert 0 < r["without_views"] < r["calls_per_param"] == round(r["calls_per_step"] / 4, 1)
    by = {(r["optimizer"], r["dtype"], r["weight_decay"]): r["calls_per_param"] for r in rows}
    # rounding and weight decay add work; OnTIES' selection more than OnDARE's draw
    assert by["ondare", "bfloat16", 0.0] > by["ondare", "float32", 0.0]
    assert by["ondare", "bfloat16", 0.01] > by["ondare", "bfloat16", 0.0]
    assert by["onties", "float32", 0.0] > by["ondare", "float32", 0.0]


def test_launches_on_the_tinyllama_layout(tmp_path: Path) -> None:
    run_script(tmp_path, "launches.py", "--layout", "tinyllama")
    data = json.loads((tmp_path / "launches.json").read_text())
    assert data["params"] == 201  # embed, 22 x 9 per layer, final norm, lm_head
    by = {(r["optimizer"], r["dtype"], r["weight_decay"]): r for r in data["rows"]}
    # per-step work (the masks) is shared by every parameter: fewer calls per parameter here
    # than with 4 parameters in the toy layout
    assert by["ondare", "float32", 0.0]["calls_per_param"] < 40


@pytest.mark.slow
def test_rss_sizes_runs_every_method_on_each_size(work: Path) -> None:
    methods = ["karcher", "breadcrumbs", "linear"]
    run_script(work, "rss_sizes.py", "--sizes", "micro", "--methods", *methods)
    data = json.loads((work / "rss-sizes.json").read_text())
    assert [(r["method"], r["size"]) for r in data["runs"]] == [(m, "micro") for m in methods]
    for row in data["runs"]:
        assert row["peak_rss_mb"] > 100 and row["minor_faults"] > 1000 and row["wall_s"] > 0
    assert "| karcher |" in (work / "rss-sizes.md").read_text()
    assert not (work / "out" / "rss").exists()  # outputs are removed after every run
