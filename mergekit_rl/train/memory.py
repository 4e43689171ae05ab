"""The memory plan of a training run: bytes per process, item by item, before anything is loaded.

`memory_plan` is the arithmetic (a pure function of the parameter shapes, the architecture's
sizes and the run's settings); `plan_for_recipe` gets those from a train recipe and the
policy's config.json alone (the model is built on the meta device: no weights are read, so a
config-only directory plans a 70B run). `rlmerge train RECIPE --dry-run` prints it.

Per process, with W processes and full sharding (FSDP2: every tensor split on dim 0, the
largest share ceil(rows / W) rows is rank 0's), or W = 1 (one process, or DDP's replicas):

    parameters       numel / W x bytes of training.dtype
    gradients        the same (gradients take the parameters' dtype)
    Adam moments     AdamW (torch): 2 x the parameters' bytes; OnDARE / OnTIES: 2 x float32
    tau              OnDARE / OnTIES: reserve_p x numel entries, stored sparse (8-byte index +
                     tau_dtype value) below 20% density, else dense tau_dtype
    merge buffer     merge_every > 1: float32 per entry
    step scratch     OnDARE / OnTIES: the step's float32 Delta of a chunk (CHUNK_ELEMS or the
                     largest tensor), and its float32 gradient when the parameters are not
                     float32; it is not alive with the activations, so the peak counts the
                     larger of the two
    EMA              Elastic Reset: float32 per entry
    reference model  DPO / KTO without LoRA, RLOO, GRPO with beta > 0, or a recipe reference:
                     a frozen copy in training.dtype, sharded like the policy under FSDP
    FSDP buffers     under FSDP: the root group (embeddings, head, final norm) gathered, and
                     two decoder layers gathered at once (the current one and the prefetched
                     next), with the current layer's full gradient before its reduce-scatter
    activations      sequences x tokens x (layers x ACTIVATION_PER_TOKEN_LAYER(h, kv, I)
                     + vocab x LOGIT_BYTES) in training.dtype, without gradient checkpointing;
                     attention that keeps no seq x seq scores (SDPA / flash attention)

What it leaves out: the CUDA context and allocator fragmentation (`FIT_HEADROOM`), LoRA (a
LoRA run's trainable parameters are its adapters: the plan counts full fine-tuning), and
generation caches of GRPO / RLOO.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the GPU memory sizes the plan is checked against, in GiB (24, 40 and 80 GB cards; a 141 GB H200)
GPU_GIB = (24, 40, 80, 141)
# share of a card's memory a run may plan to use: the rest is the CUDA context, the caching
# allocator's fragmentation and the libraries' workspaces
FIT_HEADROOM = 0.9
# tau is stored as (int64 index, value) pairs below this density (`optim.SPARSE_BELOW`)
SPARSE_BELOW = 0.2
# the optimizer steps this many entries at once (`optim.CHUNK_ELEMS`): its float32 scratch
CHUNK_ELEMS = 1 << 22
_LAYER = re.compile(r"\.layers\.(\d+)\.")
GIB = 1 << 30


def activation_elems_per_token_layer(hidden: int, kv_dim: int, intermediate: int) -> int:
    """Activation entries a decoder layer keeps for backward, per token: the norms' outputs and
    inputs (4h), q, k, v (h + 2 kv), the attention output and its projection's input (2h), the
    MLP's gate, up, activation and product (4 I)."""
    return 7 * hidden + 2 * kv_dim + 4 * intermediate


# bytes per token per vocabulary entry: the logits in the training dtype, their float32 copy
# for the loss and its float32 log-softmax (and gradient, which reuses the freed ones)
LOGIT_FLOAT32_COPIES = 2


@dataclass(frozen=True)
class Arch:
    """The sizes activations depend on."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    kv_dim: int  # key/value width (kv heads x head dim)


@dataclass(frozen=True)
class PlanSettings:
    """What a recipe and the launch say about a run (see `plan_for_recipe`)."""

    dtype: str = "bfloat16"
    processes: int = 1
    sharded: bool = False  # FSDP full shard (else every process holds everything)
    optimizer: str = "adamw"  # adamw | ondare | onties
    reserve_p: float = 0.01
    tau_dtype: str = "bfloat16"
    merge_every: int = 1
    elastic: bool = False
    reference: bool = False  # a frozen reference model on the device
    sequences: int = 8  # sequences per micro-batch per process (DPO: 2 per pair)
    tokens: int = 1024  # tokens per sequence


@dataclass
class MemoryPlan:
    """Bytes per process, item by item."""

    settings: PlanSettings
    params: int  # parameters of the model
    items: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: every item, except that activations (freed by the end of backward) and
        the optimizer step's scratch never coexist, so only the larger of them counts."""
        both = min(self.items.get("activations", 0), self.items.get("step scratch", 0))
        return sum(self.items.values()) - both

    def fits(self, gib: float) -> bool:
        return self.total <= FIT_HEADROOM * gib * GIB

    def lines(self) -> list[str]:
        s = self.settings
        how = "FSDP full shard" if s.sharded else ("DDP replicas" if s.processes > 1 else "")
        head = (
            f"memory plan per process: {count(self.params)} parameters, {s.dtype}, "
            f"{s.processes} process{'es' if s.processes > 1 else ''}"
            + (f" ({how})" if how else "")
            + f", optimizer {s.optimizer}, {s.sequences} sequences x {s.tokens} tokens"
        )
        out = [head]
        out += [f"  {name:<18}{gib(n):>10}" for name, n in self.items.items()]
        out.append(f"  {'peak':<18}{gib(self.total):>10}  (activations or step scratch)")
        verdict = ", ".join(f"{g} GB {'fits' if self.fits(g) else 'does not fit'}" for g in GPU_GIB)
        out.append(f"  on one GPU of: {verdict} ({int(FIT_HEADROOM * 100)}% usable)")
        return out


def gib(n: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB (a tiny model's plan is not all zeros)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.2f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def local_numel(shape: Sequence[int], processes: int, sharded: bool) -> int:
    """Entries of the largest shard of a tensor: FSDP2 gives rank 0 ceil(rows / W) rows."""
    numel = math.prod(shape)
    if not sharded or not shape or processes == 1:
        return numel
    rows = shape[0]
    return math.ceil(rows / processes) * (numel // rows if rows else 0)


def tau_bytes(numel: int, local: int, s: PlanSettings) -> int:
    """tau of one tensor on one process: its share of the stored entries (sparse or dense)."""
    if s.optimizer not in ("ondare", "onties"):
        return 0
    b = DTYPE_BYTES[s.tau_dtype]
    kept = numel if s.reserve_p >= 1.0 else s.reserve_p * numel
    if s.optimizer == "onties" and s.reserve_p * numel < 1:
        kept = numel  # too small to keep one entry: kept dense
    if kept >= SPARSE_BELOW * numel:
        return local * b
    return int(kept * local / numel) * (8 + b) if numel else 0


def memory_plan(
    shapes: Mapping[str, Sequence[int]], arch: Arch, settings: PlanSettings
) -> MemoryPlan:
    """Bytes per process of each item of a full fine-tuning run (module docstring)."""
    s, w = settings, settings.processes
    pb = DTYPE_BYTES[s.dtype]
    locs = {n: local_numel(shape, w, s.sharded) for n, shape in shapes.items()}
    numels = {n: math.prod(shape) for n, shape in shapes.items()}
    n_local = sum(locs.values())
    online = s.optimizer in ("ondare", "onties")
    items = {
        "parameters": n_local * pb,
        "gradients": n_local * pb,
        "Adam moments": n_local * (8 if online else 2 * pb),
        "tau": sum(tau_bytes(numels[n], locs[n], s) for n in shapes),
        "merge buffer": 4 * n_local if online and s.merge_every > 1 else 0,
        "step scratch": 0,
        "EMA": n_local * 4 if s.elastic else 0,
        "reference model": n_local * pb if s.reference else 0,
        "FSDP buffers": fsdp_buffers(shapes, pb) if s.sharded and w > 1 else 0,
        "activations": activation_bytes(arch, s),
    }
    if online:  # the unsharded path steps chunks of tensors, the sharded one a tensor
        largest = max(locs.values(), default=0)
        chunk = largest if s.sharded else max(min(CHUNK_ELEMS, n_local), largest)
        items["step scratch"] = 4 * chunk * (1 if s.dtype == "float32" else 2)
    return MemoryPlan(s, sum(numels.values()), items)


def fsdp_buffers(shapes: Mapping[str, Sequence[int]], pb: int) -> int:
    """Gathered parameters under FSDP2 (one group per decoder layer, and the root): the root
    group for the whole step, two layers at once (prefetch), and one layer's full gradients."""
    layers: dict[int, int] = {}
    root = 0
    for name, shape in shapes.items():
        m = _LAYER.search(f".{name}")
        if m is None:
            root += math.prod(shape)
        else:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + math.prod(shape)
    layer = max(layers.values(), default=0)
    return (root + 3 * layer) * pb


def activation_bytes(arch: Arch, s: PlanSettings) -> int:
    """Activations kept for backward without gradient checkpointing, and the logits."""
    pb = DTYPE_BYTES[s.dtype]
    tokens = s.sequences * s.tokens
    per_layer = activation_elems_per_token_layer(arch.hidden, arch.kv_dim, arch.intermediate)
    logits = arch.vocab * (pb + 4 * LOGIT_FLOAT32_COPIES)
    return tokens * (arch.layers * per_layer * pb + logits)


# -- from a config.json ----------------------------------------------------------------------


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UsageError(
            f"memory plan: '{path}' not found; the plan needs the policy's config.json "
            "(weights are not needed)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"memory plan: '{path}' is not valid JSON ({e}).") from None


def model_shapes(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], Arch]:
    """The trainable parameters' shapes (tied weights once) and the sizes activations depend
    on, from a transformers config: the model is built on the meta device (no memory, no
    weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UsageError("memory plan: config.json has no model_type.")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as e:
        raise UsageError(f"memory plan: config.json: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    arch = Arch(
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        vocab=hf_config.vocab_size,
        intermediate=getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size),
        kv_dim=kv * head_dim,
    )
    return shapes, arch


# -- from a train recipe ---------------------------------------------------------------------
# TRL's KL weight where the recipe leaves training.beta unset (trl 1.16): a reference model is
# loaded when it is above 0
TRL_DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "grpo": 0.0, "rloo": 0.05}


def recipe_settings(recipe: Any, processes: int, sharded: bool) -> PlanSettings:
    """`PlanSettings` of a `TrainRecipe` launched on `processes` processes (sharded: FSDP)."""
    t, opt = recipe.training, recipe.optimizer
    sampling = recipe.algorithm in ("grpo", "rloo")
    beta = t.beta if t.beta is not None else TRL_DEFAULT_BETA[recipe.algorithm]
    # DPO / KTO hold a frozen copy of the policy unless LoRA (the adapter switched off is it)
    reference = recipe.reference is not None or (recipe.peft is None and beta > 0)
    if sampling:  # completions per micro-batch, each prompt + completion long
        sequences, tokens = t.batch_size, (t.max_prompt_length or 512) + t.max_completion_length
    else:  # DPO: chosen and rejected; KTO: the completion and its KL-batch counterpart
        sequences, tokens = 2 * t.batch_size, t.max_length
    return PlanSettings(
        dtype=t.dtype,
        processes=processes,
        sharded=sharded,
        optimizer=opt.name,
        reserve_p=opt.reserve_p,
        tau_dtype=opt.tau_dtype,
        merge_every=opt.merge_every,
        elastic=recipe.elastic_reset is not None,
        reference=reference,
        sequences=sequences,
        tokens=tokens,
    )


def policy_config_dir(ref: str) -> Path:
    """The local directory holding the policy's config.json (a path, or a resolved hub id)."""
    if (Path(ref) / "config.json").is_file():
        return Path(ref)
    from ..io.reader import open_checkpoint

    with open_checkpoint(ref) as ckpt:
        return ckpt.source.root


def plan_for_recipe(recipe: Any, processes: int, sharded: bool) -> MemoryPlan:
    """The memory plan of a `TrainRecipe`, from the policy's config.json alone."""
    shapes, arch = model_shapes(read_config(policy_config_dir(recipe.policy)))
    return memory_plan(shapes, arch, recipe_settings(recipe, processes, sharded))
