"""Shared benchmark helpers: run a command in a fresh process and measure it.

Each measured thing runs in its own child process; `os.wait4` returns that child's own
resource usage, so the peak RSS is the child's alone (the harness itself is not counted).
Wall time is taken around the whole child, interpreter start and imports included, the same
for the tool and for the IO floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = Path(os.environ.get("RLMERGE_BENCH_WORK", BENCH_DIR / "_work"))  # models + logs
RLMERGE = [sys.executable, "-m", "mergekit_rl.cli.entry"]  # the console script's code, no shim
FLOOR = [sys.executable, str(BENCH_DIR / "floor.py")]
IDLE_TORCH = [sys.executable, "-c", "import torch"]


@dataclass
class Measurement:
    seconds: float
    peak_rss_mb: float  # ru_maxrss of the child process (Linux: KiB) / 1024
    cpu_seconds: float  # user + system CPU time of the child: robust to other load
    load1: float  # 1-minute load average just before the run
    stdout: str
    minor_faults: int = 0  # ru_minflt of the child: pages it touched fresh (zeroed or mapped)
    system_seconds: float = 0.0  # ru_stime of the child: kernel time (page zeroing, unmapping)


def measure(cmd: Sequence[str], cwd: Path = REPO) -> Measurement:
    """Run `cmd` to completion; fail loudly on a non-zero exit."""
    load1 = os.getloadavg()[0]
    out_path = WORK / ".stdout"
    err_path = WORK / ".stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{err_path.read_text()[-3000:]}"
        )
    cpu = usage.ru_utime + usage.ru_stime
    return Measurement(
        seconds,
        usage.ru_maxrss / 1024,
        cpu,
        load1,
        out_path.read_text(),
        usage.ru_minflt,
        usage.ru_stime,
    )


def warm_cache(paths: Sequence[Path], chunk: int = 64 << 20) -> int:
    """Read every file under `paths` once so later runs see the same (warm) page cache."""
    total = 0
    buf = bytearray(chunk)
    for root in paths:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total


def settle(*outputs: Path) -> None:
    """Delete a run's outputs and flush dirty pages so the next run starts from the same state."""
    for out in outputs:
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
    os.sync()


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    """True when this process may empty the page cache (root, with a writable /proc/sys/vm)."""
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    """Flush dirty pages, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def wait_for_quiet(max_load: float = 0.7, max_wait_s: float = 120.0) -> float:
    """Wait (bounded) until the 1-minute load average drops below max_load; return it."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    disk = shutil.disk_usage(WORK if WORK.exists() else REPO)
    fs = (
        subprocess.run(
            ["df", "-T", str(WORK if WORK.exists() else REPO)], capture_output=True, text=True
        )
        .stdout.splitlines()[-1]
        .split()
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit,
        "cpu": f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
        "ram": f"{mem_kb / 2**20:.1f} GiB",
        "disk": f"{fs[0]} ({fs[1]}), {disk.total / 2**30:.0f} GiB, {disk.free / 2**30:.0f} GiB free",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def save_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- cases: a tool command paired with the IO floor of the same shape ------------------------
@dataclass
class Case:
    name: str
    tool: list[str]  # the measured command
    floor_inputs: list[Path]  # what the matched floor reads
    copies: int  # how many models' bytes the floor writes
    outputs: list[Path]  # removed after every run
    target: float  # time target, x the floor


def floor_cmd(case: Case, out: Path) -> list[str]:
    return [
        *FLOOR,
        "--inputs",
        *map(str, case.floor_inputs),
        "--out",
        str(out),
        "--copies",
        str(case.copies),
    ]


def tool_seconds(stdout: str) -> float | None:
    """The tool's own --json 'seconds' (engine time, without interpreter start)."""
    try:
        data = json.loads(stdout)
        if isinstance(data, list):  # `rlmerge merge`: one entry per pipeline stage
            return sum(float(stage["summary"]["seconds"]) for stage in data)
        return float(data["seconds"])
    except (ValueError, KeyError, TypeError):
        return None


def run_cases(cases: Sequence[Case], repeats: int, log: list[dict], cold: bool) -> None:
    """Alternate floor and tool runs (order flipped every repeat) and log every run.

    cold: drop the page cache before every measured command (every input byte comes from disk);
    otherwise the caller has warmed the cache and every command reads from memory.
    """
    floor_out = WORK / "out" / "floor"
    for rep in range(repeats):
        for case in cases:
            pair = [
                ("floor", floor_cmd(case, floor_out), [floor_out]),
                ("tool", case.tool, case.outputs),
            ]
            for kind, cmd, outs in pair if rep % 2 == 0 else pair[::-1]:
                settle(*outs)
                if cold:
                    drop_caches()
                m = measure(cmd)
                settle(*outs)
                log.append(
                    {
                        "case": case.name,
                        "kind": kind,
                        "rep": rep,
                        "seconds": round(m.seconds, 3),
                        "cpu_seconds": round(m.cpu_seconds, 2),
                        "engine_seconds": tool_seconds(m.stdout) if kind == "tool" else None,
                        "peak_rss_mb": round(m.peak_rss_mb, 1),
                        "load1": round(m.load1, 2),
                    }
                )
                print(
                    f"  {case.name:22s} {kind:5s} rep {rep}: {m.seconds:7.2f} s "
                    f"cpu {m.cpu_seconds:7.2f} s {m.peak_rss_mb:7.0f} MiB (load {m.load1:.2f})",
                    flush=True,
                )


def idle_torch_rss(repeats: int = 3) -> float:
    return median([measure(IDLE_TORCH).peak_rss_mb for _ in range(repeats)])


RSS_BUDGET_MIB = 1.5e9 / 2**20  # "1.5 GB above idle torch", read conservatively as 1.5e9 bytes


def spread(xs: Sequence[float]) -> str:
    """'median (min-max)' of a few repeats."""
    return f"{median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def summarize(size: str, cases: Sequence[Case], log: list[dict], idle: float) -> list[dict]:
    """One row per case: medians over the repeats, the spread, and the targets met or not."""
    rows = []
    for case in cases:
        runs = [r for r in log if r["case"] == case.name]
        floor_s = [r["seconds"] for r in runs if r["kind"] == "floor"]
        tool_runs = [r for r in runs if r["kind"] == "tool"]
        tool_s = [r["seconds"] for r in tool_runs]
        engine = [r["engine_seconds"] for r in tool_runs if r["engine_seconds"] is not None]
        rss = max(r["peak_rss_mb"] for r in tool_runs)
        floor_cpu = median([r["cpu_seconds"] for r in runs if r["kind"] == "floor"])
        tool_cpu = median([r["cpu_seconds"] for r in tool_runs])
        ratio = median(tool_s) / median(floor_s)
        rows.append(
            {
                "size": size,
                "case": case.name,
                "repeats": len(tool_s),
                "floor_s": round(median(floor_s), 4),
                "floor_spread": spread(floor_s),
                "tool_s": round(median(tool_s), 4),
                "tool_spread": spread(tool_s),
                "engine_s": round(median(engine), 2) if engine else None,
                "ratio": round(ratio, 2),
                "floor_cpu_s": round(floor_cpu, 2),
                "tool_cpu_s": round(tool_cpu, 2),
                "target": case.target,
                "time_ok": ratio <= case.target,
                "floor_rss_mib": round(max(r["peak_rss_mb"] for r in runs if r["kind"] == "floor")),
                "peak_rss_mib": round(rss),
                "above_idle_mib": round(rss - idle),
                "rss_ok": rss - idle <= RSS_BUDGET_MIB,
            }
        )
    return rows


def markdown(rows: Sequence[dict]) -> str:
    head = (
        "| size | case | floor s | tool s | engine s | ratio | target | time | CPU s floor / tool "
        "| peak RSS MiB | above idle torch MiB | RSS |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    ok = {True: "met", False: "**missed**"}
    return head + "".join(
        f"| {r['size']} | {r['case']} | {r['floor_spread']} | {r['tool_spread']} "
        f"| {r['engine_s']} | {r['ratio']}x | {r['target']}x | {ok[r['time_ok']]} "
        f"| {r['floor_cpu_s']} / {r['tool_cpu_s']} "
        f"| {r['peak_rss_mib']} | {r['above_idle_mib']} | {ok[r['rss_ok']]} |\n"
        for r in rows
    )


# -- one entry point for the command benchmarks (bench_io.py, bench_merge.py) ----------------
def add_common_args(ap: argparse.ArgumentParser, default_repeats: int = 3) -> None:
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], help="tiny, 0.5B, 1.5B")
    ap.add_argument("--repeats", type=int, default=default_repeats)
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for load < 0.7")
    ap.add_argument(
        "--cache",
        choices=["auto", "cold", "warm"],
        default="auto",
        help="cold: drop the page cache before every command (needs root); warm: read the "
        "inputs once first; auto: cold when possible",
    )


def resolve_cache(choice: str) -> bool:
    """True for cold runs; fails when cold is asked for without the rights to drop caches."""
    possible = can_drop_caches()
    if choice == "cold" and not possible:
        raise SystemExit("--cache cold needs root (writing /proc/sys/vm/drop_caches)")
    return possible if choice == "auto" else choice == "cold"


def bench_sizes(
    tag: str,
    make_cases: Callable[[str], list[Case]],
    sizes: Sequence[str],
    repeats: int,
    cold: bool,
    only: str = "",
    max_wait: float = 120.0,
) -> list[dict]:
    """Run every case of every size; save all runs to _work/<tag>-<size>.json; return the rows."""
    rows = []
    for size in sizes:
        cases = [c for c in make_cases(size) if only in c.name]
        inputs = sorted({p for c in cases for p in c.floor_inputs})
        missing = [p for p in inputs if not (p / "config.json").exists()]
        if missing:
            raise SystemExit(f"missing {missing[0]}: run bench/make_models.py --size {size} first")
        if not cold:
            print(f"{size}: warmed {warm_cache(inputs) / 1e9:.1f} GB", flush=True)
        print(f"{size}: load {wait_for_quiet(max_wait_s=max_wait):.2f}", flush=True)
        idle = idle_torch_rss()
        print(f"{size}: idle torch {idle:.0f} MiB", flush=True)
        log: list[dict] = []
        run_cases(cases, repeats, log, cold)
        size_rows = summarize(size, cases, log, idle)
        data = {"cache": "cold" if cold else "warm", "idle_torch_mib": idle, "runs": log}
        save_json(WORK / f"{tag}-{size}.json", {**data, "rows": size_rows})
        rows += size_rows
    return rows


def main_for(tag: str, make_cases: Callable[[str], list[Case]], doc: str) -> None:
    """Parse the common options, run the cases, print and save the markdown table."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_common_args(ap)
    args = ap.parse_args()
    cold = resolve_cache(args.cache)
    info = machine()
    print(info, f"cache: {'cold' if cold else 'warm'}", flush=True)
    rows = bench_sizes(tag, make_cases, args.sizes, args.repeats, cold, args.cases, args.max_wait)
    table = markdown(rows)
    print(table)
    cache = "cold (page cache dropped before every command)" if cold else "warm"
    header = "".join(f"- {k}: {v}\n" for k, v in info.items()) + f"- cache: {cache}\n\n"
    (WORK / f"{tag}.md").write_text(header + table)
