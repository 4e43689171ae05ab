"""`rlmerge reproduce OUTPUT [-o NEW]`: re-run an output's recorded command and compare bit for bit.

Every rlmerge output records in its safetensors metadata the command line, the working directory
it ran in, and each input's reference, resolved identity (absolute path, or repo@commit for hub
models) and content fingerprint. Reproducing:

    1. read that record from OUTPUT (refusing outputs that are not rlmerge merges);
    2. resolve every input again by its recorded identity (hub inputs at their recorded commit)
       and compare fingerprints: a missing or changed input is an error naming it, before any
       work (exit 2);
    3. re-run the recorded command (inputs replaced by their identities, the output by NEW, the
       merge recipe by the recipe recorded in OUTPUT, its model references by the identities
       they resolved to) in a subprocess, from the recorded directory;
    4. compare every tensor of NEW with OUTPUT: names, dtypes, shapes and bytes.

A merge output holds the recipe of its own stage: a pipeline's final output and each of its
intermediate stages are re-made from that stage alone, its earlier stages read from their
recorded (fingerprinted) outputs. NEW may not be, contain or lie inside OUTPUT (it would be
replaced by what it is compared with).

Only the weight-writing commands are re-run (soup, interpolate, task-vector, merge, lora
extract); a training run is reproduced by re-running its recipe, not from its final model.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import InputNotFoundError, OutputExistsError, RunError, UsageError
from .io.reader import open_checkpoint
from .io.reference import fingerprint, resolve

RERUNNABLE = {"soup", "interpolate", "task-vector", "merge", "lora"}
OUTPUT_FLAGS = ("-o", "--output")


@dataclass
class Record:
    """What an output says about how it was made."""

    path: Path
    argv: list[str]  # the command line without the leading "rlmerge"
    cwd: Path | None
    inputs: list[dict[str, Any]]
    recipe: str | None


@dataclass
class ReproduceReport:
    output: Path
    new: Path | None  # None when NEW was a temporary folder, now deleted
    rerun: list[str]
    inputs: list[dict[str, Any]]
    identical: bool
    tensors: int
    differing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The command-specific keys of the --json envelope (the CLI adds the envelope)."""
        return {
            "reproduced": str(self.output),
            "identical": self.identical,
            "tensors": self.tensors,
            "differing": self.differing,
            "inputs": self.inputs,
            "rerun": shlex.join(["rlmerge", *self.rerun]),
        }


def read_record(output: str | Path) -> Record:
    """The command, directory and inputs recorded in an rlmerge output."""
    path = Path(output)
    if not path.exists():
        raise InputNotFoundError(f"output '{path}' not found; check the path.")
    with open_checkpoint(path) as ckpt:
        meta = ckpt.metadata
    if "rlmerge_command" not in meta or "rlmerge_inputs" not in meta:
        raise UsageError(
            f"'{path}' holds no rlmerge record (rlmerge_command / rlmerge_inputs in its "
            "safetensors metadata): it was not written by rlmerge, so it cannot be reproduced."
        )
    argv = shlex.split(meta["rlmerge_command"])[1:]
    if not argv or argv[0] not in RERUNNABLE:
        what = argv[0] if argv else "an empty command"
        raise UsageError(
            f"'{path}' was made by `rlmerge {what}`; reproduce re-runs the weight commands "
            f"({', '.join(sorted(RERUNNABLE))}). A training run is reproduced by running its "
            "recipe (rlmerge_recipe.yaml) again."
        )
    cwd = Path(meta["rlmerge_cwd"]) if meta.get("rlmerge_cwd") else None
    inputs = json.loads(meta["rlmerge_inputs"])
    return Record(path, argv, cwd, inputs, meta.get("rlmerge_recipe"))


def check_inputs(record: Record) -> list[dict[str, Any]]:
    """Resolve every recorded input again; raise naming the first that is missing or changed."""
    report = []
    for rec in record.inputs:
        identity = rec.get("resolved") or rec["ref"]
        try:
            source = resolve(identity)
        except InputNotFoundError as e:
            raise InputNotFoundError(
                f"input '{rec['ref']}' of {record.path} cannot be found as recorded "
                f"('{identity}'): {e}"
            ) from e
        now = fingerprint(source)
        was = rec.get("fingerprint")
        if was is not None and now != was:
            raise UsageError(
                f"input '{rec['ref']}' of {record.path} has changed since the output was made: "
                f"'{identity}' now has content fingerprint {now[:19]}..., the output recorded "
                f"{was[:19]}.... Restore that input to reproduce the output."
            )
        status = "unchanged" if was is not None else "unverified (no fingerprint recorded)"
        report.append({"ref": rec["ref"], "resolved": identity, "status": status})
    return report


def _output_arg(argv: list[str]) -> tuple[int, str] | None:
    """(index, prefix) of the output path in argv: `-o P` / `--output P` (prefix ""), or one
    word `--output=P` / `-oP` (prefix `--output=` / `-o`)."""
    for i, a in enumerate(argv):
        if a in OUTPUT_FLAGS and i + 1 < len(argv):
            return i + 1, ""
        if a.startswith("--output="):
            return i, "--output="
        if a.startswith("-o") and len(a) > 2:
            return i, "-o"
    return None


def _pinned(arg: str, refs: dict[str, str]) -> str:
    """An argument naming an input (`REF` or `--option=REF`) with REF by its recorded identity."""
    if arg in refs:
        return refs[arg]
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("-") and value in refs:
        return f"{flag}={refs[value]}"
    return arg


def rerun_argv(record: Record, new: Path, recipe_file: Path | None) -> tuple[list[str], Path]:
    """The command to run and the path, under NEW, that corresponds to OUTPUT."""
    argv = list(record.argv)
    refs = {r["ref"]: r.get("resolved") or r["ref"] for r in record.inputs}
    found = _output_arg(argv)
    if found is None:
        raise UsageError(f"the command recorded in {record.path} has no -o/--output.")
    out_at, prefix = found
    recorded_out = Path(argv[out_at][len(prefix) :])
    if not recorded_out.is_absolute() and record.cwd is not None:
        recorded_out = record.cwd / recorded_out
    argv[out_at] = f"{prefix}{new}"
    for i, a in enumerate(argv):
        if i != out_at:
            argv[i] = _pinned(a, refs)  # inputs by their recorded identity (path, repo@commit)
    if argv[0] == "merge" and recipe_file is not None:
        argv[1] = str(recipe_file)  # the stage's recipe as recorded in the output
        return argv, new  # one stage, written at NEW itself (a pipeline's stage too)
    # a sweep (interpolate --alpha a,b) wrote OUT/alpha-<a>: compare the same sub-folder
    here = record.path.resolve()
    sub = (
        here.relative_to(recorded_out.resolve()) if recorded_out.resolve() in here.parents else None
    )
    if sub is None and here.name.startswith("alpha-") and argv[0] == "interpolate":
        sub = Path(here.name)
    return argv, new / sub if sub else new


def compare_outputs(old: Path, new: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ in dtype, shape or bytes, or exist in one only)."""
    with open_checkpoint(old) as a, open_checkpoint(new) as b:
        names_a, names_b = set(a.names()), set(b.names())
        differing = sorted(names_a ^ names_b)
        for name in a.names():
            if name not in names_b:
                continue
            x, y = a.read(name), b.read(name)
            same = x.dtype == y.dtype and x.shape == y.shape
            if same and x.numel():
                same = torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            if not same:
                differing.append(name)
        return len(names_a | names_b), differing


def pinned_recipe(record: Record) -> str:
    """The stage recipe recorded in a merge output, each model reference replaced by the
    identity it resolved to (absolute path, repo@commit, an earlier stage's output folder).

    Identities come from the recipe's own `#   REF -> IDENTITY` header, else from the input
    records; a reference found in neither is left as written (and fails loudly if it is gone).
    """
    if record.recipe is None:
        raise UsageError(f"{record.path} does not hold its recipe (rlmerge_recipe).")
    refs = {r["ref"]: r.get("resolved") or r["ref"] for r in record.inputs}
    for line in record.recipe.splitlines():
        ref, arrow, identity = line.removeprefix("#").strip().partition(" -> ")
        if line.startswith("#   ") and arrow:
            refs[ref] = identity
    doc = yaml.safe_load(record.recipe)
    if not isinstance(doc, dict):
        raise UsageError(f"the recipe recorded in {record.path} is not a mapping.")

    def pin(ref: object) -> object:
        if not isinstance(ref, str):
            return ref
        return refs.get(ref, refs.get(os.path.normpath(ref), ref))

    for key in ("base_model", "tokenizer_source"):
        if key in doc:
            doc[key] = pin(doc[key])
    if isinstance(doc.get("tokenizer"), dict) and "source" in doc["tokenizer"]:
        doc["tokenizer"]["source"] = pin(doc["tokenizer"]["source"])
    entries = list(doc.get("models") or [])
    entries += [src for sl in doc.get("slices") or [] for src in sl.get("sources") or []]
    for entry in entries:
        entry["model"] = pin(entry["model"])
    return yaml.safe_dump(doc, sort_keys=False)


def check_target(output: Path, target: Path) -> None:
    """NEW must not be, contain or lie inside OUTPUT: the re-run would replace what it is
    compared with (and the comparison would then be of the new output with itself)."""
    out = output.resolve()
    if target == out or out in target.parents or target in out.parents:
        raise OutputExistsError(
            f"-o '{target}' is, contains or is inside the output being reproduced ('{out}'); "
            "re-making it there would destroy it. Choose another -o (or none: a temporary "
            "folder)."
        )


def check_cwd(record: Record) -> None:
    """Relative paths of the recorded command resolve from the recorded directory: refuse
    rather than run them from the caller's directory on other files."""
    if record.cwd is not None and not record.cwd.is_dir():
        raise InputNotFoundError(
            f"the working directory recorded in {record.path} ('{record.cwd}') no longer "
            "exists; the recorded command's relative paths resolve from there. Recreate it "
            "(with its inputs) to reproduce the output."
        )


def reproduce(output: str | Path, new: Path | None = None, force: bool = False) -> ReproduceReport:
    """Re-run OUTPUT's recorded command into NEW (default: a temporary folder) and compare."""
    record = read_record(output)
    if new is not None:
        check_target(Path(output), Path(new).resolve())
    check_cwd(record)
    inputs = check_inputs(record)
    keep = new is not None
    work = Path(tempfile.mkdtemp(prefix="rlmerge-reproduce-"))
    try:
        target = Path(new).resolve() if new is not None else work / "out"
        if target.exists() and not force:
            raise UsageError(f"'{target}' already exists; pass --force or another -o.")
        recipe_file = None
        if record.argv[0] == "merge":
            recipe_file = work / "recipe.yaml"
            recipe_file.write_text(pinned_recipe(record))
        argv, compare_at = rerun_argv(record, target, recipe_file)
        if force:
            argv.append("--force")
        _run(argv, record.cwd)
        tensors, differing = compare_outputs(Path(output), compare_at)
        return ReproduceReport(
            Path(output), target if keep else None, argv, inputs, not differing, tensors, differing
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(argv: list[str], cwd: Path | None) -> None:
    run_in = cwd if cwd is not None else Path.cwd()
    cmd = [sys.executable, "-m", "mergekit_rl.cli.entry", *argv]  # as `rlmerge` runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    res = subprocess.run(cmd, cwd=run_in, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RunError(
            f"re-running `{shlex.join(['rlmerge', *argv])}` in {run_in} failed (exit "
            f"{res.returncode}): {res.stderr.strip()[-2000:]}"
        )
