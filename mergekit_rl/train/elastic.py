"""Elastic Reset (Noukhovitch et al. 2023, arXiv:2312.07551) as a transformers TrainerCallback.

Keep an exponential moving average of the policy, theta_ema <- eta * theta_ema + (1 - eta) * theta,
every `ema_every` optimizer steps. Every `reset_every` steps: theta <- theta_ema, then
theta_ema <- theta_0 (the initial model). The training objective is unchanged. Design notes,
section 3.

Where things live, and why:
- theta_ema: float32, on the model's device by default (one extra float32 copy of the trainable
  parameters). The EMA is updated every step or so; keeping it on the host would move the whole
  model over PCIe at every update. A bf16 EMA would round away most (1 - eta) * theta
  increments, hence float32. `ema_device="cpu"` trades speed for accelerator memory.
- theta_0: needed only at resets, so it is read back from `init_checkpoint` on disk one tensor at
  a time (`mergekit_rl.io`), never held as a second accelerator copy. `keep_init_on_cpu=True`
  keeps it in host memory instead (in the checkpoint's dtype). Trainable parameters that the
  checkpoint does not hold (a value head, LoRA factors) keep a host copy of their value at attach.
- kl_anchor="ema" (the authors' IMDB setup): the bound reference model's weights are the EMA.
  They are copied in after every EMA update and after every reset, so after each `on_step` the
  reference equals the EMA (cast to the reference's dtype). kl_anchor="init" (StackLLaMA) leaves
  the reference alone: the trainer's own frozen reference is the initial model.

Parameters are matched by name (`named_parameters()`, which lists tied weights once); only
trainable parameters are tracked (frozen ones never move, so their EMA is themselves). With
LoRA the trainable parameters are the A and B factors, so their EMAs are taken separately (not
of the product), as the authors do; their initial values are the host copies taken at attach.

Checkpoints: `on_save` writes `elastic_reset.safetensors` (the EMA, and any host copies of
theta_0) and `elastic_reset.json` (step, number of resets, settings) into
`output_dir/checkpoint-<step>`. `on_train_begin` restores them: from `resume_from` when given;
otherwise, whenever the Trainer starts at a step > 0 (`trainer.train(resume_from_checkpoint=...)`
restores its state before this hook), from `args.resume_from_checkpoint` when it is a path, else
`output_dir/checkpoint-<global_step>`. A resumed run then continues exactly.

Distributed: under DDP every rank applies the same EMA updates and resets to its replica, and only
the main process writes the files. DeepSpeed ZeRO is refused (its flattened fp32 master weights
would undo in-place edits). On FSDP2 (`fully_shard`: DTensor parameters split on dim 0) the
EMA is a DTensor holding each rank's rows, updates and resets run in place on the local rows, and
theta_0 is read back row-wise (each rank reads its own rows); `save` / `load` then go through
`torch.distributed.checkpoint` (OUTPUT_DIR/checkpoint-N/elastic_reset_dcp, every rank writing its
rows; a collective, so `on_save` runs it on every rank).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from ..errors import InputNotFoundError, MismatchError, UsageError
from ..io.reader import Checkpoint, open_checkpoint
from ..merge import blend
from .optim_shard import FlatShard, flat_shard, local
from .taskvec import has_tensor, name_candidates, read_checkpoint_rows

KlAnchor = Literal["init", "ema"]
STATE_FILE = "elastic_reset.safetensors"
META_FILE = "elastic_reset.json"
SHARDED_DIR = "elastic_reset_dcp"  # FSDP: the EMA as a torch.distributed.checkpoint, sharded
# optimizer state entries that are not training history and survive a reset (OnlineMergingAdamW)
KEEP_ON_RESET = ("tau", "tau_idx", "tau_pos")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name; tied weights appear once (under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_name(name: str, ckpt: Checkpoint) -> str | None:
    """The checkpoint tensor behind a parameter name, dropping wrapper prefixes ("module.")."""
    return next((c for c in name_candidates(name) if has_tensor(ckpt, c)), None)


def reset_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Forget the moments and step counts (the optimizer re-initialises them lazily)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    for p, state in list(optimizer.state.items()):
        optimizer.state[p] = {k: v for k, v in state.items() if k in KEEP_ON_RESET}


class ElasticResetCallback(TrainerCallback):
    """EMA of the policy, and periodic resets: policy <- EMA, EMA <- initial model.

    By hand: `cb.attach(model)`, then `cb.on_step(model, optimizer, step)` after every optimizer
    step (steps counted from 1). In a Trainer: pass it in `callbacks=[...]`; for
    kl_anchor="ema" also call `cb.bind_reference(trainer.ref_model)` before `train()`.
    """

    def __init__(
        self,
        init_checkpoint: str | Path,
        *,
        ema_decay: float = 0.995,
        ema_every: int = 1,
        reset_every: int,
        kl_anchor: KlAnchor = "init",
        reset_optimizer: bool = False,
        keep_init_on_cpu: bool = False,
        ema_device: str | torch.device | None = None,
        resume_from: str | Path | None = None,
    ):
        def check(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise UsageError(f"elastic reset option '{option}': {message}")

        check(0.0 <= ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {ema_decay}.")
        check(int(ema_every) == ema_every >= 1, "ema_every", "must be an integer >= 1.")
        check(int(reset_every) == reset_every >= 1, "reset_every", "must be an integer >= 1.")
        check(kl_anchor in ("init", "ema"), "kl_anchor", f"must be init or ema, got {kl_anchor!r}.")
        self.init_checkpoint = str(init_checkpoint)
        with open_checkpoint(self.init_checkpoint):  # fail now on a bad path, not at step n
            pass
        self.ema_decay, self.ema_every, self.reset_every = ema_decay, int(ema_every), reset_every
        self.kl_anchor, self.reset_optimizer = kl_anchor, reset_optimizer
        self.keep_init_on_cpu, self.ema_device = keep_init_on_cpu, ema_device
        self.resume_from = resume_from
        self.num_resets = 0
        self.last_step = 0
        self.ema: dict[str, Tensor] = {}  # name -> float32 EMA
        self.init: dict[str, Tensor] = {}  # name -> host copy of theta_0 (when not read from disk)
        self.source: dict[str, str | None] = {}  # name -> checkpoint tensor name (None: held)
        self._params: dict[str, nn.Parameter] = {}
        self._ref: dict[str, Tensor] = {}
        self._shards: dict[str, FlatShard] = {}  # FSDP2 parameters: this rank's rows

    # -- setup ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Start tracking model: EMA <- current weights; check every name against the checkpoint."""
        self._params = trainable(model)
        if not self._params:
            raise UsageError("elastic reset: the model has no trainable parameters.")
        self.ema, self.init, self.source = {}, {}, {}
        shards = {n: flat_shard(p, n) for n, p in self._params.items()}
        self._shards = {n: s for n, s in shards.items() if s is not None}
        with open_checkpoint(self.init_checkpoint) as ckpt:
            for name, p in self._params.items():
                src = checkpoint_name(name, ckpt)
                if src is not None and tuple(ckpt.info(src).shape) != tuple(p.shape):
                    raise MismatchError(
                        f"elastic reset: parameter '{name}' has shape {list(p.shape)} but "
                        f"'{src}' in {self.init_checkpoint} has {list(ckpt.info(src).shape)}; "
                        "init_checkpoint must be the checkpoint the policy was loaded from."
                    )
                self.source[name] = src
                if src is None and name in self._shards:  # saved with the EMA, sharded
                    self.init[name] = p.detach().clone()
                elif src is None:
                    self.init[name] = p.detach().to("cpu", copy=True)
                elif self.keep_init_on_cpu:
                    self.init[name] = self._read_initial(ckpt, name, src).to(ckpt.info(src).dtype)
                device = p.device if self.ema_device is None else torch.device(self.ema_device)
                # a sharded parameter's EMA is a DTensor like it: the local rows only
                self.ema[name] = p.detach().to(device=device, dtype=torch.float32, copy=True)
        self._sync_reference()

    def bind_reference(self, ref_model: nn.Module) -> None:
        """Make ref_model's weights follow the EMA (kl_anchor="ema"); needs attach() first or
        later (the copy happens at attach, after every EMA update and after every reset)."""
        if self.kl_anchor != "ema":
            raise UsageError(
                "elastic reset: bind_reference is for kl_anchor='ema'; with kl_anchor='init' the "
                "trainer's frozen reference already is the initial model."
            )
        ref_model = getattr(ref_model, "module", ref_model)  # a DDP / accelerate wrapper
        self._ref = dict(ref_model.named_parameters())
        self._sync_reference()

    # -- the algorithm ----------------------------------------------------------------------
    @torch.no_grad()
    def on_step(
        self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, global_step: int
    ) -> None:
        """After optimizer step `global_step` (from 1): EMA update and maybe a reset."""
        if not self.ema:
            if model is None:
                raise UsageError("elastic reset: call attach(model) before the first step.")
            self.attach(model)
        if self.kl_anchor == "ema" and not self._ref:
            raise UsageError(
                "elastic reset: kl_anchor='ema' needs the reference model; call "
                "cb.bind_reference(trainer.ref_model) before training."
            )
        changed = False
        if global_step % self.ema_every == 0:
            self._update_ema()
            changed = True
        if global_step % self.reset_every == 0:
            self._reset(optimizer)
            changed = True
        if changed:
            self._sync_reference()
        self.last_step = global_step

    def _update_ema(self) -> None:
        """theta_ema <- lerp(theta_ema, theta, 1 - decay), every tracked parameter in one
        multi-tensor kernel."""
        params = [local(p.detach()) for p in self._params.values()]
        blend.ema_update_many_([local(e) for e in self.ema.values()], params, self.ema_decay)

    def _reset(self, optimizer: torch.optim.Optimizer | None) -> None:
        """theta <- theta_ema; theta_ema <- theta_0 (streamed from disk, one tensor at a time)."""
        for name, p in self._params.items():
            local(p).copy_(local(self.ema[name]))
        for name, theta0 in self._initial_weights():
            local(self.ema[name]).copy_(local(theta0))
        if self.reset_optimizer and optimizer is not None:
            reset_optimizer_state_(optimizer)
        self.num_resets += 1

    def _initial_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(name, theta_0) for every tracked parameter: host copies, else read from the file."""
        on_disk = [n for n in self._params if n not in self.init]
        for name in self._params:
            if name in self.init:
                yield name, self.init[name]
        if not on_disk:
            return
        with open_checkpoint(self.init_checkpoint) as ckpt:
            for name in on_disk:
                src = self.source[name]
                assert src is not None  # names without a source are held in self.init
                yield name, self._read_initial(ckpt, name, src)

    def _read_initial(self, ckpt: Checkpoint, name: str, src: str) -> Tensor:
        """theta_0 of a parameter as float32: a sharded parameter's own rows only."""
        shard = self._shards.get(name)
        if shard is None:
            return ckpt.read(src, dtype=torch.float32)
        return read_checkpoint_rows(ckpt, src, shard.row0, shard.row0 + shard.rows)

    def _sync_reference(self) -> None:
        if not self._ref or not self.ema:
            return
        missing = [n for n in self.ema if n not in self._ref]
        if missing:
            raise MismatchError(
                f"elastic reset: the reference model has no parameter '{missing[0]}' "
                f"({len(missing)} missing); bind a reference of the policy's architecture."
            )
        with torch.no_grad():
            for name, ema in self.ema.items():
                local(self._ref[name]).copy_(local(ema))

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the EMA, host theta_0 copies and counters into directory (atomic renames)."""
        directory = Path(directory)
        if self._shards:
            self._save_sharded(directory)
            return
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"ema.{n}": t.detach().cpu().contiguous() for n, t in self.ema.items()}
        held = {n: t for n, t in self.init.items() if self.source.get(n) is None}
        tensors.update({f"init.{n}": t.contiguous() for n, t in held.items()})
        save_file(
            tensors, str(directory / (STATE_FILE + ".tmp")), metadata={"format": "elastic_reset"}
        )
        os.replace(directory / (STATE_FILE + ".tmp"), directory / STATE_FILE)
        self._write_meta(directory)

    def _sharded_state(self) -> dict[str, dict[str, Tensor]]:
        held = {n: t for n, t in self.init.items() if self.source.get(n) is None}
        return {"ema": dict(self.ema), "init": held}

    def _save_sharded(self, directory: Path) -> None:
        """FSDP: every rank writes its rows of the EMA (and of held theta_0 copies) into one
        torch.distributed.checkpoint (a collective: every rank calls it); rank 0 the counters."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=directory / SHARDED_DIR)
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._write_meta(directory)

    def _write_meta(self, directory: Path) -> None:
        meta = {
            "format": 1,
            "step": self.last_step,
            "num_resets": self.num_resets,
            "init_checkpoint": self.init_checkpoint,
            "ema_decay": self.ema_decay,
            "ema_every": self.ema_every,
            "reset_every": self.reset_every,
            "kl_anchor": self.kl_anchor,
        }
        tmp = directory / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, directory / META_FILE)

    def load(self, directory: str | Path) -> None:
        """Restore what `save` wrote; the model must be attached (the EMA lands on its device)."""
        directory = Path(directory)
        if self._shards and (directory / SHARDED_DIR).is_dir():
            self._load_sharded(directory)
            return
        state_path, meta_path = directory / STATE_FILE, directory / META_FILE
        if not (state_path.is_file() and meta_path.is_file()):
            raise InputNotFoundError(
                f"elastic reset: no {STATE_FILE} / {META_FILE} in '{directory}'; this checkpoint "
                "was saved without the Elastic Reset callback, so the run cannot resume exactly."
            )
        if not self.ema:
            raise UsageError("elastic reset: call attach(model) before load().")
        meta = json.loads(meta_path.read_text())
        self._check_settings(meta, meta_path)
        tensors = load_file(str(state_path))
        ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        if set(ema) != set(self.ema):
            extra = sorted(set(ema) ^ set(self.ema))
            raise MismatchError(
                f"elastic reset: '{state_path}' tracks different parameters than the model "
                f"(first difference: '{extra[0]}'); resume with the same model and frozen layers."
            )
        with torch.no_grad():
            for name, t in ema.items():
                shard = self._shards.get(name)  # a sharded run takes its rows of a saved EMA
                rows = t if shard is None else t[shard.row0 : shard.row0 + shard.rows]
                local(self.ema[name]).copy_(rows)
        for key, t in tensors.items():
            if key.startswith("init."):
                name = key.removeprefix("init.")
                shard = self._shards.get(name)
                self.init[name] = t if shard is None else t[shard.row0 : shard.row0 + shard.rows]
        self.num_resets = int(meta["num_resets"])
        self.last_step = int(meta["step"])
        self._sync_reference()

    def _load_sharded(self, directory: Path) -> None:
        """Restore what `_save_sharded` wrote, into the EMA's shards in place (a collective)."""
        import torch.distributed.checkpoint as dcp

        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise InputNotFoundError(f"elastic reset: no {META_FILE} in '{directory}'.")
        meta = json.loads(meta_path.read_text())
        self._check_settings(meta, meta_path)
        dcp.load(self._sharded_state(), checkpoint_id=directory / SHARDED_DIR)
        self.num_resets = int(meta["num_resets"])
        self.last_step = int(meta["step"])
        self._sync_reference()

    def _check_settings(self, meta: Mapping[str, Any], meta_path: Path) -> None:
        """Refuse to resume under other settings: the EMA and the reset schedule saved in the
        checkpoint belong to them (a silent change would mix two algorithms in one run)."""
        changed = [
            f"{key}: saved {meta[key]!r}, now {getattr(self, key)!r}"
            for key in ("ema_decay", "ema_every", "reset_every", "kl_anchor")
            if key in meta and meta[key] != getattr(self, key)
        ]
        if changed:
            raise MismatchError(
                f"elastic reset: '{meta_path}' was saved with other settings ("
                + "; ".join(changed)
                + "); resume with the settings of the saved run, or start a new run in "
                "another output directory."
            )

    # -- TrainerCallback hooks ----------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if getattr(args, "deepspeed", None):
            raise UsageError(
                "elastic reset does not support DeepSpeed ZeRO (it keeps its own flattened fp32 "
                "weights, so in-place resets would be lost); use DDP or FSDP2 "
                "(recipes/train/accelerate/fsdp2.yaml)."
            )
        self.attach(model)
        resume = self._resume_dir(args, state)
        if resume is not None:
            self.load(resume)
            if self.last_step != state.global_step:
                raise MismatchError(
                    f"elastic reset: '{resume}' holds the state of step {self.last_step} but the "
                    f"Trainer resumes at step {state.global_step}; resume from the matching "
                    "checkpoint."
                )

    def _resume_dir(self, args: Any, state: Any) -> Path | None:
        if self.resume_from is not None:
            return Path(self.resume_from)
        if state.global_step == 0:
            return None  # a fresh run
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            return Path(args.resume_from_checkpoint)
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw
    ):
        self.on_step(model, optimizer, state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any):
        if self._shards or getattr(args, "should_save", True):  # sharded: every rank writes
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
        # the Trainer hands every callback the same dict: callbacks listed after this one
        # (a metrics logger) see the count
        if logs is not None:
            logs.update(self.metrics())

    def metrics(self) -> Mapping[str, float]:
        """What is worth logging: the number of resets so far."""
        return {"elastic/num_resets": float(self.num_resets)}
