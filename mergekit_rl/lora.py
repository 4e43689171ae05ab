"""`rlmerge lora extract`: the best rank-r LoRA adapter of a task vector, saved for `peft`.

For every weight matrix W of a linear layer, tau = W_finetuned - W_base [out, in] is replaced by
its truncated SVD (Eckart-Young: the best rank-r approximation in Frobenius norm):

    tau ~= U[:, :r] diag(S[:r]) Vh[:r]  =  B @ A,   B = U[:, :r] * S[:r]  [out, r],  A = Vh[:r]  [r, in]

saved as a PEFT LoRA adapter with lora_alpha = r (scale 1), so `peft` applies exactly B @ A.
Tensors are read one pair at a time; only the small factors are kept.

Which tensors are LoRA targets, and in which layout they are stored, comes from the model itself:
its architecture is instantiated from config.json on the meta device (no memory, no weights) and
each weight's module class decides. `nn.Linear` stores W [out, in]; transformers' `Conv1D` (GPT-2)
stores W [in, out], so its task vector is factored transposed and the adapter says
`fan_in_fan_out: true`, as peft expects. Embeddings, the output head and 1-D tensors (norms,
biases) are not targets: their changes are dropped and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import UsageError
from .io.adapter import PEFT_PREFIX
from .io.card import hub_name, model_card, provenance
from .io.reader import Checkpoint, check_compatible, open_checkpoint
from .io.reference import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .io.writer import AtomicDir, Metadata, check_output_path, resolved


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


LINEAR, CONV1D = "linear", "conv1d"  # the two layouts peft adapts: W [out, in] and W [in, out]


def module_layouts(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """Stored weight name -> (peft module name, LINEAR | CONV1D) for every LoRA target.

    The architecture is built from the checkpoint's config.json on the meta device, so the
    classes are the model's own: a Conv1D is never mistaken for a Linear, an embedding or the
    output head (`get_output_embeddings`) is never a target. A checkpoint stored without the
    base-model prefix (GPT-2's `h.0.attn.c_attn.weight` for `transformer.h.0.attn.c_attn`) is
    matched to the prefixed module, which is the name peft looks up.
    """
    model = _meta_model(ckpt)
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, Conv1D):
            kinds[module_name] = CONV1D
        elif isinstance(module, torch.nn.Linear):
            kinds[module_name] = LINEAR
    prefix = getattr(model, "base_model_prefix", "")
    found: dict[str, tuple[str, str]] = {}
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight"):
            continue
        for candidate in (module, f"{prefix}.{module}" if prefix else module):
            if candidate in kinds:
                found[name] = (candidate, kinds[candidate])
                break
    return found


def _meta_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The base's architecture, instantiated without memory from its config.json."""
    where = ckpt.source.root / "config.json"
    if ckpt.config is None:
        raise UsageError(
            f"'{ckpt.source.ref}' has no config.json: lora extract reads the architecture from it "
            "to know which tensors are linear layers and how they are stored. Give the model's "
            "directory (with its config.json) as BASE."
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**ckpt.config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise UsageError(
            f"{where}: transformers cannot build this architecture "
            f"(model_type '{ckpt.config.get('model_type')}'): {e}. lora extract needs it to know "
            "which tensors are linear layers."
        ) from e


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
        layouts = module_layouts(b)
        tensors: dict[str, Tensor] = {}
        targets, dropped, kinds = [], [], set()
        norm_kept = norm_total = 0.0
        for name in names:
            tau = f.read(name, torch.float32, device) - b.read(name, torch.float32, device)
            if name not in layouts or tau.dim() != 2:
                if bool(tau.abs().max() > 0) if tau.numel() else False:
                    dropped.append(name)
                continue
            total = float(tau.square().sum())
            if total == 0.0:
                continue  # unchanged matrix: no adapter module
            module, kind = layouts[name]
            # peft's factors are B [out, r] @ A [r, in] for both layouts: a Conv1D's [in, out]
            # task vector is factored transposed (peft transposes back, fan_in_fan_out)
            up, down, kept = low_rank(tau.T if kind == CONV1D else tau, rank)
            kinds.add(kind)
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
        config = adapter_config(b.source.ref, targets, rank, _fan_in_fan_out(kinds, b.source.ref))
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


def _fan_in_fan_out(kinds: set[str], base_ref: str) -> bool:
    """peft's one layout flag for the whole adapter: true for Conv1D weights ([in, out])."""
    if len(kinds) > 1:
        raise UsageError(
            f"'{base_ref}' mixes Linear and Conv1D layers among the changed matrices; a peft "
            "LoRA config has one fan_in_fan_out flag for all of them, so no single adapter "
            "describes this model."
        )
    return kinds == {CONV1D}


def adapter_config(
    base_ref: str, targets: list[str], rank: int, fan_in_fan_out: bool = False
) -> dict[str, object]:
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
        "fan_in_fan_out": fan_in_fan_out,
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
    metadata: Metadata,
    config: dict[str, object],
    card: str,
    force: bool,
) -> None:
    """The checkpoint writers' atomic output (io/writer.py): under the output's lock, into a
    temporary folder, then one rename (an atomic exchange over an existing output or symbolic
    link with --force, whose target is left alone)."""
    with AtomicDir(out, force) as d, d.io():
        save_file(tensors, str(d.tmp / ADAPTER_WEIGHTS), metadata=resolved(metadata))
        (d.tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (d.tmp / "README.md").write_text(card)
