"""Outputs under faults: symbolic links, two writers, leftovers of dead writers, disk full,
colliding interpolation folders. Each failure leaves no output and no temporary files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_rl import ops
from mergekit_rl.engine import RunOptions
from mergekit_rl.errors import OutputExistsError, UsageError
from mergekit_rl.io.writer import (
    CheckpointWriter,
    OutputLock,
    check_output_path,
    clean_stale,
    lock_path,
)
from tests.conftest import load_state
from tests.faults.harness import leftovers, run

T = torch.arange(12.0).reshape(3, 4)
ENTRIES = [("w", (3, 4), torch.float32)]
QUIET = ops.WriteOptions(run=RunOptions(progress="none"))
FORCE = ops.WriteOptions(run=RunOptions(progress="none", force=True))


def write(out: Path, force: bool = False, value: torch.Tensor = T) -> None:
    with CheckpointWriter(out, ENTRIES, force=force) as w:
        w.add("w", value)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- symbolic links (issue 11.10) ------------------------------------------------------------


def test_force_over_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    link = tmp_path / "out"
    link.symlink_to(target)
    write(link, force=True)
    assert not link.is_symlink() and torch.equal(load_state(link)["w"], T)
    assert (target / "keep.txt").read_text() == "not ours"  # never followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]  # no temp dirs
    (tmp_path / "link2").symlink_to(target)
    with pytest.raises(OutputExistsError, match="symbolic link"):  # and without --force
        check_output_path(tmp_path / "link2", [], False)


def test_force_over_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    write(link, force=True)
    assert link.is_dir() and not link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "link2").symlink_to(tmp_path / "missing")
    with pytest.raises(OutputExistsError, match="symbolic link"):  # exists, though dangling
        check_output_path(tmp_path / "link2", [], False)


def test_force_over_a_symlinked_file_output(tmp_path: Path) -> None:
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "tau.safetensors"
    link.symlink_to(target)
    with CheckpointWriter(link, ENTRIES, single_file=True, force=True) as w:
        w.add("w", T)
    assert not link.is_symlink() and torch.equal(load_state(link)["w"], T)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.safetensors", "tau.safetensors"]


@pytest.mark.slow  # three CLI subprocesses
def test_cli_force_over_symlinks(family: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "a").symlink_to(target)
    (tmp_path / "b").symlink_to(tmp_path / "nowhere")
    for name in ("a", "b"):
        args = ["soup", str(family["sft1"]), str(family["sft2"]), "-o", str(tmp_path / name)]
        if name == "a":
            done = run(args)
            assert done.returncode == 2 and "symbolic link" in done.stderr
        done = run([*args, "--force", "--quiet"])
        assert done.returncode == 0, done.stderr
        assert (tmp_path / name / "model.safetensors").is_file()
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


# -- two writers (issue 8.6) -----------------------------------------------------------------


def test_second_writer_is_refused_and_never_mixed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out, ENTRIES) as first:
        with pytest.raises(OutputExistsError, match=f"another rlmerge process .PID {os.getpid()}"):
            write(out, force=True, value=T + 1)
        first.add("w", T)
    assert torch.equal(load_state(out)["w"], T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file removed


def test_cli_second_writer_exits_2(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock(out.absolute())
    lock.acquire()  # as a running writer would hold it
    try:
        done = run(["soup", str(family["sft1"]), str(family["sft2"]), "-o", str(out)])
    finally:
        lock.release()
    assert done.returncode == 2
    assert "being written by another rlmerge process" in done.stderr and str(out) in done.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_lock_survives_a_finishing_writer(tmp_path: Path) -> None:
    """The lock file is removed on release; a writer that opened the old one must not think
    it holds the lock while a third one holds the new file."""
    out = tmp_path / "out"
    a = OutputLock(out)
    a.acquire()
    stale_fd = os.open(lock_path(out), os.O_RDWR)  # a writer that opened it just before
    a.release()
    b = OutputLock(out)
    b.acquire()
    c = OutputLock(out)
    with pytest.raises(OutputExistsError):
        c.acquire()
    b.release()
    os.close(stale_fd)


# -- leftovers of dead writers (issue 8.4) ---------------------------------------------------


def test_next_run_removes_dead_writers_temp_dirs_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / f".out.rlmerge-tmp-{dead_pid()}"
    dead_old = tmp_path / f".out.rlmerge-tmp-old-{dead_pid()}"
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".out.rlmerge-tmp-{live_proc.pid}"
    other = tmp_path / f".other.rlmerge-tmp-{dead_pid()}"  # another output's: not ours
    for d in (dead, dead_old, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write(out)
    finally:
        live_proc.kill()
        live_proc.wait()
    assert not dead.exists() and not dead_old.exists()
    assert live.exists() and other.exists()
    (msg,) = [str(w.message) for w in caught]
    assert f"process {live_proc.pid}" in msg and f"rm -rf '{live}'" in msg
    assert clean_stale(out) == [live]  # now dead too


# -- colliding interpolation folders (issue 11.11) -------------------------------------------


def test_alphas_that_share_a_folder_are_refused_before_any_work(
    family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(UsageError, match="alpha-0.333333"):
        ops.interpolate(family["sft1"], family["rlhf"], out, [0.3333333, 0.3333334], opts=QUIET)
    assert list(tmp_path.iterdir()) == []
    done = run(["interpolate", str(family["sft1"]), str(family["rlhf"]), "-o", str(out),
                "--alpha", "0,0.3333333,0.3333334"])  # fmt: skip
    assert done.returncode == 2 and "alpha-0.333333" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_alpha_sweep_is_one_atomic_output(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    summary = ops.interpolate(family["sft1"], family["rlhf"], out, [0.0, 1.0], opts=QUIET)
    assert summary.outputs == [str(out / "alpha-0"), str(out / "alpha-1")]
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0", "alpha-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    with pytest.raises(OutputExistsError):  # an existing sweep folder is one output
        ops.interpolate(family["sft1"], family["rlhf"], out, [0.5, 1.0], opts=QUIET)
    ops.interpolate(family["sft1"], family["rlhf"], out, [0.5, 1.0], opts=FORCE)
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0.5", "alpha-1"]


# -- disk full / write errors (issue 8.5) ----------------------------------------------------

LIMIT = 64 * 1024  # bytes: the tiny family's shards are ~100-400 KB


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.slow  # every writing command in a subprocess under a file-size limit
def test_every_writing_command_fails_cleanly_when_files_cannot_grow(
    family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(family["base"]),
                "models": [
                    {"model": str(family[m]), "parameters": {"weight": 0.5, "density": 0.5}}
                    for m in ("sft1", "sft2")
                ],
            }
        )
    )
    tau = tmp_path / "tau.safetensors"
    tau.write_bytes((family["sft1"] / "model.safetensors").read_bytes())  # any valid file
    sft1, sft2, base = (str(family[k]) for k in ("sft1", "sft2", "base"))
    out = tmp_path / "out"
    commands = [
        ["soup", sft1, sft2, "-o", str(out)],
        ["interpolate", sft1, sft2, "-o", str(out), "--alpha", "0.2,0.8"],
        ["merge", str(recipe), "-o", str(out)],
        ["task-vector", "extract", base, sft1, "-o", str(tmp_path / "out.safetensors")],
        ["task-vector", "apply", base, str(tau), "-o", str(out)],
    ]
    for args in commands:
        done = run([*args, "--quiet"], preexec_fn=_limited)
        assert done.returncode == 1, (args, done.stderr)
        err = done.stderr.strip()
        assert err.count("rlmerge: failed:") == 1 and "Traceback" not in err, err
        assert "File too large" in err and str(out) in err.replace("out.safetensors", "out"), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.safetensors", "ties.yaml"]


def test_force_without_atomic_exchange_falls_back_to_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filesystems without RENAME_EXCHANGE: old output aside, new one in, old one removed."""
    import mergekit_rl.io.writer as writer

    out = tmp_path / "out"
    write(out)
    monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    write(out, force=True, value=T + 1)
    assert torch.equal(load_state(out)["w"], T + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
