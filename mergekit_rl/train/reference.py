"""SALSA soup references (Chegini et al. 2024, arXiv:2406.01234) for TRL trainers.

The KL reference is a weight-space soup of several SFT models of one base instead of a single
SFT model (design notes, section 4). The soup is built by the very code behind `rlmerge soup`
(`mergekit_rl.ops.soup`: streamed, atomic, with a model card) and reused when an identical one
is already on disk. `use_reference` then puts it into any TRL trainer:

- DPO / KTO accept `ref_model=` at construction; `use_reference` also works after the fact.
- GRPO / RLOO (trl 1.16) take no reference argument: with `beta > 0` they build `trainer.ref_model`
  from the policy's `config._name_or_path` and patch it (fused log-prob head, fp32 lm_head,
  accelerate preparation). `use_reference` copies the soup's weights into that model in place,
  so every patch stays; with `beta == 0` there is no reference and it is a usage error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ops
from ..engine import RunOptions
from ..errors import MismatchError, UsageError
from ..io.card import output_is_complete
from ..io.reader import open_checkpoint
from ..io.reference import resolve
from .optim_shard import flat_shard, local

# provenance key of a soup reference: the command line stored in every output shard ends with it
FINGERPRINT_MARK = "# soup-reference "


def soup_fingerprint(models: Sequence[str | Path], weights: Sequence[float]) -> str:
    """Identity of a soup: each input's resolved location, weight-file sizes and mtimes, weights."""
    inputs = []
    for ref in models:
        src = resolve(ref)
        files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in src.weight_files]
        inputs.append({"identity": src.identity, "files": files})
    blob = json.dumps({"inputs": inputs, "weights": [float(w) for w in weights]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _existing_fingerprint(out: Path) -> str | None:
    if not output_is_complete(out):
        return None
    with open_checkpoint(out) as ckpt:
        command = ckpt.metadata.get("rlmerge_command", "")
    _, mark, fingerprint = command.partition(FINGERPRINT_MARK)
    return fingerprint.strip() if mark else None


def build_soup_reference(
    models: Sequence[str | Path],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    *,
    force: bool = False,
    run: RunOptions | None = None,
) -> Path:
    """Write the (weighted, normalised) soup of models to out_dir with `rlmerge soup`'s code.

    A complete soup already at out_dir made from the same inputs (paths, sizes, mtimes) and
    weights is reused as is. Any other existing out_dir is an error unless force.
    """
    out = Path(out_dir)
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise UsageError(
            f"reference.weights has {len(weights)} values for {len(models)} soup models."
        )
    fingerprint = soup_fingerprint(models, weights)
    if out.exists() and _existing_fingerprint(out) == fingerprint:
        return out
    command = (
        f"rlmerge soup {' '.join(str(m) for m in models)} "
        f"--weights {','.join(f'{w:g}' for w in weights)} -o {out}  "
        f"{FINGERPRINT_MARK}{fingerprint}"
    )
    base = run or RunOptions(progress="none")
    run_opts = RunOptions(
        device=base.device, max_shard_size=base.max_shard_size, force=force, progress=base.progress
    )
    ops.soup(models, out, weights, ops.WriteOptions(run=run_opts, command=command))
    return out


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A frozen causal LM for use as a KL reference: eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _unwrap(trainer: Any, model: nn.Module) -> nn.Module:
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def copy_weights_(target: nn.Module, source: nn.Module) -> None:
    """target's parameters and persistent buffers <- source's, matched by name, in place
    (each rank's rows where target is sharded with FSDP2)."""
    want, have = target.state_dict(), source.state_dict()
    missing = sorted(set(want) ^ set(have))
    if missing:
        raise MismatchError(
            f"the reference model and the trainer's reference differ in tensor names (first: "
            f"'{missing[0]}', {len(missing)} in all); build the soup from models of the policy's "
            "architecture."
        )
    with torch.no_grad():
        for name, t in want.items():
            if t.shape != have[name].shape:
                raise MismatchError(
                    f"reference tensor '{name}' has shape {list(have[name].shape)} but the "
                    f"trainer's reference has {list(t.shape)}; the soup must match the policy."
                )
            shard = flat_shard(t, name)  # an FSDP2-sharded reference takes its own rows
            if shard is None:
                t.copy_(have[name])  # state_dict tensors share storage with the module
            else:
                local(t).copy_(have[name][shard.row0 : shard.row0 + shard.rows])


def use_reference(trainer: Any, ref_model: nn.Module) -> None:
    """Make a TRL trainer compute its KL / log-ratio terms against ref_model's weights.

    Copies ref_model's weights into `trainer.ref_model` in place (keeping TRL's patches and
    device placement). Raises UsageError when the trainer keeps no reference model (GRPO/RLOO
    with beta == 0, a PEFT policy, precomputed reference log-probs) or would overwrite it
    (`sync_ref_model=True`).
    """
    name = type(trainer).__name__
    args = getattr(trainer, "args", None)
    if getattr(args, "sync_ref_model", False):
        raise UsageError(
            f"{name} has sync_ref_model=True, which overwrites the reference with the policy "
            "every few steps; set sync_ref_model: false to train against a soup reference."
        )
    target = getattr(trainer, "ref_model", None)
    if target is None:
        beta = getattr(trainer, "beta", getattr(args, "beta", None))
        why = (
            f"beta = {beta}, so it has no KL term; set beta > 0 to use a reference"
            if beta == 0
            else "it uses no reference model (a PEFT policy, or precomputed reference "
            "log-probabilities); pass ref_model= when constructing it"
        )
        raise UsageError(f"{name} keeps no reference model: {why}.")
    if target is ref_model:
        return
    copy_weights_(_unwrap(trainer, target), ref_model)
