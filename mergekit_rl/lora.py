"""`rlmerge lora extract`: the best rank-r LoRA adapter of a task vector, saved for `peft`.

For every weight matrix W of a linear layer, tau = W_finetuned - W_base [out, in] is replaced by
its truncated SVD (Eckart-Young: the best rank-r approximation in Frobenius norm):

    tau ~= U[:, :r] diag(S[:r]) Vh[:r]  =  B @ A,   B = U[:, :r] * S[:r]  [out, r],  A = Vh[:r]  [r, in]

saved as a PEFT LoRA adapter with lora_alpha = r (scale 1), so `peft` applies exactly B @ A.
Tensors are read one pair at a time; only the small factors are kept. Embeddings, lm_head and
1-D tensors (norms, biases) are not LoRA targets: their changes are dropped and reported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import UsageError
from .io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from .io.card import hub_name, model_card, provenance
from .io.reader import TIED_PAIR, check_compatible, open_checkpoint
from .io.writer import check_output_path


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(B [out, r], A [r, in], kept): the best rank-r factors of a matrix and the fraction of its
    squared Frobenius norm they keep. Float32 math. A rank above min(out, in) is padded with zero
    factors, so every module of an adapter has the same r (what peft's config expects)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.numel())
    total = float(s.square().sum())
    kept = float(s[:r].square().sum()) / total if total > 0 else 1.0
    up = torch.zeros(delta.shape[0], rank, device=delta.device)
    down = torch.zeros(rank, delta.shape[1], device=delta.device)
    up[:, :r], down[:r] = u[:, :r] * s[:r], vh[:r]
    return up, down, kept


def is_lora_target(name: str, shape: tuple[int, ...]) -> bool:
    """A linear layer's weight matrix (not an embedding or the output head)."""
    return len(shape) == 2 and name.endswith(".weight") and name not in TIED_PAIR


@dataclass
class ExtractSummary:
    outputs: list[str]
    rank: int
    modules: int
    kept: float  # fraction of the adapted matrices' squared task-vector norm the factors keep
    dropped: list[str] = field(default_factory=list)  # changed tensors LoRA cannot carry

    def to_dict(self) -> dict[str, object]:
        """The command-specific keys of the --json envelope (the CLI adds the envelope)."""
        return {
            "rank": self.rank,
            "modules": self.modules,
            "energy_kept": round(self.kept, 6),
            "dropped": self.dropped,
        }


def extract_lora(
    base: str | Path,
    finetuned: str | Path,
    out: Path,
    rank: int,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    force: bool = False,
    command: str = "",
) -> ExtractSummary:
    """Write OUT/adapter_model.safetensors + adapter_config.json (+ README.md), atomically."""
    if rank < 1:
        raise UsageError(f"--rank must be >= 1, got {rank}.")
    out = Path(out)
    with open_checkpoint(base) as b, open_checkpoint(finetuned) as f:
        check_output_path(out, [b.source, f.source], force)
        names = check_compatible([b, f])
        tensors: dict[str, Tensor] = {}
        targets, dropped = [], []
        norm_kept = norm_total = 0.0
        for name in names:
            tau = f.read(name, torch.float32, device) - b.read(name, torch.float32, device)
            if not is_lora_target(name, tuple(tau.shape)):
                if bool(tau.abs().max() > 0) if tau.numel() else False:
                    dropped.append(name)
                continue
            total = float(tau.square().sum())
            if total == 0.0:
                continue  # unchanged matrix: no adapter module
            up, down, kept = low_rank(tau, rank)
            module = name.removesuffix(".weight")
            out_dtype = dtype or f.info(name).dtype
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down.to("cpu", out_dtype)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = up.to("cpu", out_dtype)
            targets.append(module)
            norm_kept, norm_total = norm_kept + kept * total, norm_total + total
        if not targets:
            raise UsageError(
                f"'{finetuned}' and '{base}' hold the same weight matrices: the task vector is "
                "zero, so there is no adapter to extract."
            )
        config = adapter_config(b.source.ref, targets, rank)
        card = model_card(
            f"Rank-{rank} LoRA extracted from a task vector",
            command or f"rlmerge lora extract {base} {finetuned} --rank {rank} -o {out}",
            [b, f],
            None,
            notes=_card_notes(dropped),
            relation="adapter",  # a LoRA of the fine-tune, applied to the base
            tags=("lora", "peft"),
            library="peft",
            base_models=[hub_name(b)],
        )
        meta = provenance(command, [b, f])
        _write_adapter(out, tensors, meta, config, card, force)
    return ExtractSummary([str(out)], rank, len(targets), norm_kept / norm_total, dropped)


def adapter_config(base_ref: str, targets: list[str], rank: int) -> dict[str, object]:
    """A PEFT LoraConfig (as adapter_config.json) that applies B @ A with scale 1."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": rank,
        "lora_alpha": rank,  # scale = alpha / r = 1
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _card_notes(dropped: list[str]) -> str:
    if not dropped:
        return ""
    listed = ", ".join(f"`{n}`" for n in dropped[:8])
    more = f" and {len(dropped) - 8} more" if len(dropped) > 8 else ""
    return f"Not in the adapter (LoRA adapts weight matrices only): changes to {listed}{more}."


def _write_adapter(
    out: Path,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    config: dict[str, object],
    card: str,
    force: bool,
) -> None:
    """Everything into a temporary folder beside `out`, then one rename: never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        if out.exists() and force:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
