"""Run a train recipe on a TRL trainer (DPO, KTO, GRPO, RLOO) with rlmerge's merging plug-ins.

    recipe -> policy + tokenizer + dataset (+ reference, rewards)
           -> TRL config and trainer, with OnlineMergingAdamW (create_optimizer) and callbacks
              (metrics log, held-out evaluation, Elastic Reset)
           -> trainer.train(resume_from_checkpoint=...)
           -> OUTPUT_DIR/final through the atomic checkpoint writer (model card, recipe)

Several processes: `accelerate launch --multi_gpu --num_processes N -m mergekit_rl.cli.app train
RECIPE.yaml` runs it under DDP with no change (every process builds the same trainer; only the
main process writes the metrics and the final model; tests/train/test_ddp.py runs 2 CPU processes
on gloo). FSDP2 (`accelerate launch --config_file recipes/train/accelerate/fsdp2.yaml`): the
policy's parameters are DTensor shards; OnDARE / OnTIES and Elastic Reset keep their state for
each rank's rows and checkpoint it through torch.distributed.checkpoint (train/optim_shard.py);
the final model is gathered one tensor at a time while the main process writes it (shard_write.py).
DeepSpeed ZeRO (a `training.deepspeed` config, or `ACCELERATE_USE_DEEPSPEED=true`) keeps its own
flattened fp32 weights: it is refused with OnDARE / OnTIES or Elastic Reset, and works with plain
AdamW. docs/training.md has the table of what runs on which engine.

On a machine without a GPU the trainer runs on CPU (`use_cpu`) in float32 unless
training.mixed_precision asks for bf16 autocast; nothing is reported to external services unless
training.report_to names one; HF_HUB_OFFLINE is honoured by every load. The TRL config is built
from the recipe's keys (trainer_kwargs) plus training.trainer_args, which recipe.py checks
against the config class.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OutputExistsError, RunError, UsageError
from ..io.card import model_card, provenance, write_aux_files
from ..io.reader import all_finite, open_checkpoint
from ..io.reference import split_adapter_ref
from ..io.writer import CheckpointWriter, check_output_path
from ..merge import rng, rounding
from .data import load_train_dataset, truncate_prompts
from .progress import TrainProgress
from .recipe import (
    DEEPSPEED_REFUSED,
    ONLINE_MERGING,
    SAMPLING,
    SoupReference,
    TrainRecipe,
    trl_config_class,
)
from .shard_write import is_sharded, sharded_state, stream_full_tensors

FSDP_REFUSED = (
    "OnTIES' L1 rescale of tau needs the whole tensor's norms, which FSDP's shards do not hold; "
    "set optimizer.tau_l1_rescale: false, or train with DDP (accelerate launch --multi_gpu)."
)

Echo = Callable[[str], None]
TRL_CLASSES = {
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
    "grpo": ("GRPOConfig", "GRPOTrainer"),
    "rloo": ("RLOOConfig", "RLOOTrainer"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METRICS_FILE = "metrics.jsonl"
REFERENCE_DIR = "reference"  # OUTPUT_DIR/reference: the soup, when the recipe asks for one


@dataclass
class TrainOptions:
    """What the command line adds to a recipe."""

    output: Path | None = None  # the final model (default OUTPUT_DIR/final)
    resume: bool = False  # continue from the last checkpoint in OUTPUT_DIR
    max_steps: int | None = None  # overrides training.max_steps (smoke runs)
    force: bool = False  # replace an existing final model / start over in OUTPUT_DIR
    command: str = ""  # the command line, for the model card
    echo: Echo = print
    callbacks: Sequence[Any] = field(default_factory=tuple)  # extra TrainerCallbacks
    progress: TrainProgress | None = None  # a bar or step/total + ETA lines (None: neither)


@dataclass
class TrainResult:
    final: Path
    metrics: Path
    steps: int
    seconds: float
    main_process: bool = True  # False on the other ranks under DDP (they print nothing)


def train(
    recipe: TrainRecipe, recipe_text: str, opts: TrainOptions = TrainOptions()
) -> TrainResult:
    """Run the recipe to the end and write the final model; see the module docstring."""
    t0 = time.time()
    check_environment(recipe)
    check_deepspeed(recipe)
    check_fsdp(recipe)
    out_dir = Path(recipe.training.output_dir)
    final = opts.output or out_dir / "final"
    resume_from = resume_checkpoint(out_dir, opts.resume, opts.force)
    # --resume replaces the final model of the run it continues (one this command wrote)
    final_opts = replace(opts, force=opts.force or (opts.resume and is_train_output(final)))
    with open_checkpoint(recipe.policy) as policy:
        check_output_path(final, [policy.source], final_opts.force)
    tokenizer, model = load_policy(recipe)
    dataset = load_train_dataset(recipe.dataset, recipe.algorithm)
    train_prompts = dataset["prompt"]  # uncut, for the held-out overlap check
    if recipe.training.max_prompt_length is not None:
        dataset = truncate_prompts(dataset, tokenizer, recipe.training.max_prompt_length)
    reference = reference_model(recipe, out_dir, opts.force)

    from transformers import PrinterCallback

    from .callbacks import EvalCallback, MetricsLog

    resumed_at = int(Path(resume_from).name.rpartition("-")[2]) if resume_from else None
    metrics = MetricsLog(out_dir / METRICS_FILE, opts.echo, resumed_at)
    callbacks: list[Any] = [metrics, *opts.callbacks]
    if opts.progress is not None:
        metrics.line = opts.progress.line
        callbacks.append(opts.progress)
    elastic = elastic_callback(recipe)
    if elastic is not None:  # before evaluation: a step's measures see that step's reset
        callbacks.append(elastic)
        metrics.sources.append(elastic.metrics)
    if recipe.evaluation is not None:  # reads the held-out files, checks reward columns
        callbacks.append(EvalCallback(recipe, metrics, train_prompts))
    trainer = build_trainer(recipe, model, tokenizer, dataset, reference, callbacks, opts.max_steps)
    trainer.remove_callback(PrinterCallback)  # MetricsLog prints a shorter line
    if elastic is not None and recipe.elastic_reset and recipe.elastic_reset.kl_anchor == "ema":
        if getattr(trainer, "ref_model", None) is None:
            raise UsageError(
                "elastic_reset.kl_anchor: ema needs a trainer with a reference model; for "
                f"{recipe.algorithm} set training.beta > 0."
            )
        elastic.bind_reference(trainer.ref_model)

    with stop_on_signal(trainer) as stop, _closing(opts.progress):
        trainer.train(resume_from_checkpoint=resume_from)
    stop.raise_if_stopped(trainer)
    flush_optimizer(trainer)  # merge_every: the last, partial cycle's pending update
    write_final(trainer, recipe, recipe_text, final, final_opts)
    seconds = round(time.time() - t0, 2)
    main = trainer.accelerator.is_main_process
    return TrainResult(final, metrics.path, trainer.state.global_step, seconds, main)


@contextlib.contextmanager
def _closing(progress: TrainProgress | None) -> Iterator[None]:
    """Stop the progress bar however training ends (an error must not leave it drawn)."""
    try:
        yield
    finally:
        if progress is not None:
            progress.close()


# -- pieces ----------------------------------------------------------------------------------


def is_train_output(path: Path) -> bool:
    """A final model written by `rlmerge train` (it holds the recipe it was trained with)."""
    return (path / "rlmerge_recipe.yaml").is_file() and (path / "config.json").is_file()


class SignalStop:
    """SIGTERM / SIGINT during training: finish the current optimizer step, save a resumable
    checkpoint (the Trainer's: weights, optimizer state with tau, scheduler, RNG, data position;
    plus the callbacks' own, such as Elastic Reset's EMA) and stop; `train` then exits 130.

    The handler only sets a flag (no work inside a signal handler); the Trainer callback
    `on_step_end` turns it into `control.should_save` and `control.should_training_stop`. A
    second signal gets the previous handler (a second Ctrl-C interrupts at once). Under DDP
    every rank must receive the signal before the same step ends (torchrun forwards SIGTERM to
    all ranks), else the ranks disagree on where to stop.
    """

    def __init__(self) -> None:
        from transformers import TrainerCallback

        self.signum: int | None = None
        self.step: int | None = None  # the step whose checkpoint was saved on the signal
        self._previous: dict[int, Any] = {}  # signal -> the handler to restore
        stop = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                if stop.signum is not None and stop.step is None:
                    control.should_save = control.should_training_stop = True
                    stop.step = state.global_step
                return control

        self.callback = _Callback()

    def handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def raise_if_stopped(self, trainer: Any) -> None:
        if self.signum is None:
            return
        from transformers.trainer_utils import get_last_checkpoint

        name = signal.Signals(self.signum).name
        last = get_last_checkpoint(trainer.args.output_dir)
        where = (
            f"a resumable checkpoint is in {last}: continue with --resume"
            if last
            else "no checkpoint was saved"
        )
        raise KeyboardInterrupt(
            f"training stopped by {name} at step {trainer.state.global_step}; {where}."
        )


@contextlib.contextmanager
def stop_on_signal(trainer: Any) -> Iterator[SignalStop]:
    """Install SignalStop's handlers (main thread only) and callback around `trainer.train`."""
    stop = SignalStop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            stop._previous[sig] = signal.signal(sig, stop.handle)
    trainer.add_callback(stop.callback)
    try:
        yield stop
    finally:
        trainer.remove_callback(stop.callback)
        for sig, previous in stop._previous.items():
            signal.signal(sig, previous)


def main_process_first() -> Any:
    """A context in which the main process runs first (DDP); a no-op in a single process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def accelerate_uses(engine: str) -> bool:
    """Whether `accelerate launch` set ACCELERATE_USE_<ENGINE> (FSDP, DEEPSPEED) for us."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes")


def check_deepspeed(recipe: TrainRecipe) -> None:
    """Refuse DeepSpeed ZeRO with in-place weight editing (recipe key or accelerate env)."""
    env = accelerate_uses("DEEPSPEED")
    merging = recipe.optimizer.name in ONLINE_MERGING or recipe.elastic_reset is not None
    if merging and (env or recipe.training.deepspeed):
        where = "training.deepspeed" if recipe.training.deepspeed else "ACCELERATE_USE_DEEPSPEED"
        raise UsageError(f"{where}: {DEEPSPEED_REFUSED}")


def check_fsdp(recipe: TrainRecipe) -> None:
    """Refuse, before anything is loaded, what does not run on FSDP2's shards (accelerate's
    ACCELERATE_USE_FSDP): OnTIES' tau_l1_rescale. OnDARE / OnTIES and Elastic Reset work on
    each rank's rows (train/optim_shard.py); plain AdamW is accelerate's business."""
    if not accelerate_uses("FSDP"):
        return
    if recipe.optimizer.name == "onties" and recipe.optimizer.tau_l1_rescale:
        raise UsageError(
            f"optimizer.tau_l1_rescale (with FSDP, ACCELERATE_USE_FSDP): {FSDP_REFUSED}"
        )


def resume_checkpoint(out_dir: Path, resume: bool, force: bool) -> str | None:
    """The checkpoint to resume from (--resume), refusing to silently restart a started run."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if resume and last is None:
        raise UsageError(
            f"--resume: no checkpoint-* directory in {out_dir} (training.output_dir); the run "
            "saved none yet (see training.save_steps). Start without --resume."
        )
    if not resume and last is not None and not force:
        raise OutputExistsError(
            f"{out_dir} (training.output_dir) already holds checkpoints of a run ({last}); pass "
            "--resume to continue it, or --force to start over."
        )
    if not resume and last is not None:
        with main_process_first():
            for old in out_dir.glob("checkpoint-*"):  # start over: no mixing with old ones
                shutil.rmtree(old, ignore_errors=True)
    return last if resume else None


def load_policy(recipe: TrainRecipe) -> tuple[Any, nn.Module]:
    from transformers import AutoTokenizer

    with open_checkpoint(recipe.policy) as policy:  # BASE+ADAPTER: the base's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(policy.source.root))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; no new embedding row
    return tokenizer, load_causal_lm(recipe.policy, DTYPES[recipe.training.dtype])


def load_causal_lm(ref: str, dtype: torch.dtype) -> nn.Module:
    """from_pretrained; for BASE+ADAPTER the base with the adapter merged in (io/adapter.py),
    re-reading only the tensors the adapter changes."""
    from transformers import AutoModelForCausalLM

    if split_adapter_ref(ref) is None:
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    with open_checkpoint(ref) as ckpt:
        assert ckpt.adapter is not None
        names = {*ckpt.adapter.updates, *ckpt.adapter.replaced}
        untie = {}
        if ckpt.adapter.unties and ckpt.shared_pair is not None:
            # a modules_to_save copy of one of a tied pair: two matrices, both read below
            untie, names = {"tie_word_embeddings": False}, names | set(ckpt.shared_pair)
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.source.root), dtype=dtype, **untie)
        state = model.state_dict()  # shares storage with the parameters (tied ones once)
        with torch.no_grad():
            for name in names:
                state[name].copy_(ckpt.read(name))
    return model


def reference_model(recipe: TrainRecipe, out_dir: Path, force: bool) -> nn.Module | None:
    """The KL reference the recipe names (a checkpoint, or a soup built into OUTPUT_DIR)."""
    ref = recipe.reference
    sampling_kl = recipe.algorithm in SAMPLING and recipe.training.beta and recipe.peft is None
    if ref is None and sampling_kl and split_adapter_ref(recipe.policy):
        # GRPO / RLOO would load their reference from the base's path, without the adapter
        ref = SoupReference(path=recipe.policy)
    if ref is None:
        return None
    from .reference import build_soup_reference, load_reference

    path = ref.path
    if ref.soup is not None:
        with main_process_first():  # under DDP one process builds it, the others reuse it
            soup = build_soup_reference(ref.soup, out_dir / REFERENCE_DIR, ref.weights, force=force)
        path = str(soup)
    if path is None:
        raise UsageError("reference: give a checkpoint path or {soup: [model, model, ...]}.")
    if split_adapter_ref(path):
        model = load_causal_lm(path, DTYPES[recipe.training.dtype])
        return model.eval().requires_grad_(False)
    return load_reference(path, DTYPES[recipe.training.dtype])


def elastic_callback(recipe: TrainRecipe) -> Any:
    spec = recipe.elastic_reset
    if spec is None:
        return None
    from .elastic import ElasticResetCallback

    # the spec's keys are the callback's keyword arguments
    return ElasticResetCallback(recipe.policy, **spec.model_dump())


def mixed_precision(recipe: TrainRecipe) -> dict[str, bool]:
    """The trainer's bf16 / fp16 flags (autocast over the stored weights) for the recipe."""
    t = recipe.training
    if t.mixed_precision == "auto":  # bf16 where the GPU has it, weights not already fp16
        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported() and t.dtype != "float16"
        return {"bf16": bf16, "fp16": False}
    return {"bf16": t.mixed_precision == "bf16", "fp16": t.mixed_precision == "fp16"}


def report_targets(recipe: TrainRecipe) -> list[str]:
    """training.report_to as the trainer's list (["none"] when nothing is reported)."""
    names = recipe.training.report_to
    return [n for n in dict.fromkeys(names) if n != "none"] or ["none"]


def checkpointing_arg() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name
    is a deprecated alias); the name this transformers takes."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else ("gradient_checkpointing")
    )


def trainer_kwargs(recipe: TrainRecipe, max_steps: int | None) -> dict[str, Any]:
    """The arguments of the recipe's TRL config: ours (every name in recipe.OWN_ARGS), then
    training.trainer_args (checked against the config class, conflicts refused)."""
    t, opt = recipe.training, recipe.optimizer
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        max_steps=max_steps or t.max_steps or -1,
        num_train_epochs=t.num_epochs or 1.0,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        use_cpu=not torch.cuda.is_available(),
        **mixed_precision(recipe),
        **{checkpointing_arg(): t.gradient_checkpointing},
        max_grad_norm=t.max_grad_norm or 0.0,  # 0: the trainer does not clip
        report_to=report_targets(recipe),
        disable_tqdm=True,  # progress is ours (train/progress.py)
        deepspeed=t.deepspeed,
    )
    if t.beta is not None:
        kwargs["beta"] = t.beta
    if t.loss_type is not None:
        kwargs["loss_type"] = t.loss_type
    if recipe.algorithm in SAMPLING:
        kwargs |= dict(
            num_generations=t.num_generations,
            max_completion_length=t.max_completion_length,
            temperature=t.temperature,
            use_vllm=t.use_vllm,
        )
    else:
        kwargs["max_length"] = t.max_length
    return kwargs | t.trainer_args


def trainer_config(recipe: TrainRecipe, max_steps: int | None) -> Any:
    """The TRL config (a TrainingArguments) for the recipe's algorithm."""
    cls = trl_config_class(recipe.algorithm)
    try:
        return cls(**trainer_kwargs(recipe, max_steps))
    except (ValueError, TypeError) as e:  # TRL / transformers check their settings
        raise UsageError(f"training: {cls.__name__} rejects the settings: {e}") from e


# training.report_to and training.use_vllm: the package each needs (pip extra in pyproject)
OPTIONAL_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "vllm": ("vllm", "vllm"),
}


def check_environment(recipe: TrainRecipe) -> None:
    """Refuse, before anything is loaded, what needs a package this environment lacks."""
    import importlib.util

    wanted = [(f"training.report_to: {n}", n) for n in report_targets(recipe) if n != "none"]
    if recipe.training.use_vllm:
        wanted.append(("training.use_vllm", "vllm"))
    for key, name in wanted:
        module, extra = OPTIONAL_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"{key} needs the '{module}' package, which is not installed; "
                f"pip install 'mergekit-rl[{extra}]' (or drop the key)."
            )


def make_optimizer(recipe: TrainRecipe, model: nn.Module, decay_names: Sequence[str]) -> Any:
    """OnlineMergingAdamW over the trainable parameters, tau streamed from disk."""
    from .optim import OnlineMergingAdamW
    from .taskvec import CheckpointTaskVectors, TaskVectorFile

    opt = recipe.optimizer
    decay = set(decay_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay], "weight_decay": opt.weight_decay},
        {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    tau_dtype = DTYPES[opt.tau_dtype]
    source = (
        TaskVectorFile(recipe.task_vector, tau_dtype)
        if recipe.task_vector
        else CheckpointTaskVectors(str(recipe.base), recipe.policy, tau_dtype)
    )
    with source:
        # the spec's keys are the optimizer's keyword arguments, but for these four
        return OnlineMergingAdamW(
            [g for g in groups if g["params"]],
            source,
            lr=recipe.learning_rate,
            mode=opt.name,
            tau_dtype=tau_dtype,
            seed=recipe.training.seed,
            **opt.model_dump(exclude={"name", "lr", "weight_decay", "tau_dtype"}),
        )


def trainer_class(recipe: TrainRecipe) -> type:
    """The TRL trainer class; with ondare/onties a subclass whose create_optimizer builds ours.

    Overriding create_optimizer (rather than passing optimizers=) keeps FSDP legal: it runs
    after the model is wrapped.
    """
    import trl

    base = getattr(trl, TRL_CLASSES[recipe.algorithm][1])
    if recipe.optimizer.name not in ONLINE_MERGING:
        return base

    def create_optimizer(self: Any, model: nn.Module | None = None) -> Any:
        if self.optimizer is None:
            model = self.model if model is None else model
            names = self.get_decay_parameter_names(model)
            self.optimizer = make_optimizer(recipe, model, names)
        return self.optimizer

    return type(f"OnlineMerging{base.__name__}", (base,), {"create_optimizer": create_optimizer})


def lora_config(recipe: TrainRecipe) -> Any:
    """The recipe's `peft:` as a peft LoraConfig (TRL wraps the policy with it)."""
    from peft import LoraConfig

    spec = recipe.peft
    assert spec is not None
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )


def build_trainer(
    recipe: TrainRecipe,
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    reference: nn.Module | None,
    callbacks: list[Any],
    max_steps: int | None,
) -> Any:
    args = trainer_config(recipe, max_steps)
    cls = trainer_class(recipe)
    common = dict(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if recipe.peft is not None:
        common["peft_config"] = lora_config(recipe)
    if recipe.algorithm in SAMPLING:
        from .rewards import build_rewards, check_columns

        assert recipe.reward is not None  # the recipe checks guarantee it
        funcs, weights = build_rewards(recipe.reward, tokenizer)
        check_columns(funcs, dataset.column_names, f"dataset.path {recipe.dataset.path}")
        args.reward_weights = weights
        trainer = cls(reward_funcs=funcs, **common)
        if reference is not None:
            from .reference import use_reference

            use_reference(trainer, reference)
        return trainer
    return cls(ref_model=reference, **common)


# -- the final model -------------------------------------------------------------------------


def flush_optimizer(trainer: Any) -> None:
    """Merge what OnlineMergingAdamW(merge_every=K) accumulated after its last merge (the last
    max_steps % K steps) into the weights before they are written."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    if hasattr(optimizer, "flush"):
        optimizer.flush()


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that share storage with an earlier one (tied embeddings are saved once)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def write_final(
    trainer: Any, recipe: TrainRecipe, recipe_text: str, out: Path, opts: TrainOptions
) -> None:
    """The trained weights (training.output_dtype: the policy's dtypes, rounded stochastically,
    or float32) + config, tokenizer, card, recipe. FSDP2 shards are gathered one tensor at a
    time while the main process writes them (`shard_write`), never the whole model at once."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_sharded(model) and not hasattr(model, "merge_and_unload"):
        state = sharded_state(model)
        main = trainer.accelerator.is_main_process
        sink = partial(final_writer, state, recipe, recipe_text, out, opts)
        stream_full_tensors(state, sink if main else None)
    else:
        state = final_state(trainer, out)
        if trainer.accelerator.is_main_process:
            _write(unique_tensors(state), recipe, recipe_text, out, opts)
    trainer.accelerator.wait_for_everyone()


def final_state(trainer: Any, out: Path) -> dict[str, torch.Tensor]:
    """The trained weights; with peft the adapter goes to OUT-adapter and is merged in."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):  # not a peft model
        return trainer.accelerator.get_state_dict(trainer.model)  # gathered under FSDP
    if trainer.accelerator.is_main_process:  # POLICY+OUT-adapter is the final model again
        adapter = out.with_name(out.name + "-adapter")
        tmp = out.with_name(f".{adapter.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
    return model.merge_and_unload().state_dict()


def saved_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A trained tensor as the final model stores it, in dtype (on t's device).

    Training in float32 on a bf16 / fp16 policy moves most weights by less than half an ulp of
    the stored dtype: rounding to nearest would write the policy back for them and drop the
    alpha * tau push altogether. So a cast to a narrower float dtype rounds stochastically
    (`rounding.stochastic_round`, unbiased: the written weight is the trained one in expectation),
    with bits keyed by (seed, tensor name): a rerun writes the same bytes. Casts that lose
    nothing (same or wider dtype, integers) are plain casts."""
    t = t.detach()
    narrower = (
        t.is_floating_point()
        and dtype.is_floating_point
        and torch.finfo(dtype).bits < torch.finfo(t.dtype).bits
    )
    if not narrower:
        return t.to(dtype)
    key = rng.tensor_seed(seed, "final-model", name)
    return rounding.stochastic_round(t.float(), dtype, key)


def output_dtypes(
    state: Mapping[str, torch.Tensor], policy: Any, recipe: TrainRecipe
) -> dict[str, torch.dtype]:
    """The dtype each tensor is written in (training.output_dtype): the policy checkpoint's
    (a tensor it lacks keeps its own), or float32 for every float tensor."""
    if recipe.training.output_dtype == "float32":
        return {n: torch.float32 if t.is_floating_point() else t.dtype for n, t in state.items()}
    return {n: policy.info(n).dtype if n in policy else t.dtype for n, t in state.items()}


def card_tags(recipe: TrainRecipe) -> list[str]:
    """What the trained model is, for the Hub: trl, the algorithm, the optimizer / plug-ins."""
    tags = ["trl", recipe.algorithm]
    if recipe.optimizer.name in ONLINE_MERGING:
        tags.append(recipe.optimizer.name)
    if recipe.elastic_reset is not None:
        tags.append("elastic-reset")
    if recipe.peft is not None:
        tags.append("lora")
    return tags


def _write(
    state: dict[str, torch.Tensor],
    recipe: TrainRecipe,
    recipe_text: str,
    out: Path,
    opts: TrainOptions,
) -> None:
    with final_writer(state, recipe, recipe_text, out, opts) as take:
        for name, t in state.items():
            take(name, t)


@contextlib.contextmanager
def final_writer(
    state: Mapping[str, torch.Tensor],
    recipe: TrainRecipe,
    recipe_text: str,
    out: Path,
    opts: TrainOptions,
) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """Open the final model's atomic writer, planned from `state`'s names, shapes and dtypes
    (whole tensors or DTensors: only their global shapes are read), and yield what takes each
    whole tensor in `state`'s order: cast (`saved_tensor`), checked finite, appended. On a
    clean exit the config, tokenizer, card and recipe are added and the output is committed."""
    with open_checkpoint(recipe.policy) as policy:
        dtypes = output_dtypes(state, policy, recipe)
        entries = [(n, tuple(t.shape), dtypes[n]) for n, t in state.items()]
        command = opts.command or f"rlmerge train ({recipe.algorithm})"
        card = model_card(
            f"{recipe.algorithm.upper()} training ({recipe.optimizer.name})",
            command,
            [policy],
            None,
            recipe=recipe_text,
            relation="finetune",
            tags=card_tags(recipe),
        )
        writer = CheckpointWriter(
            out, entries, metadata=provenance(command, [policy]), force=opts.force
        )

        def take(name: str, t: torch.Tensor) -> None:
            saved = saved_tensor(name, t, dtypes[name], recipe.training.seed)
            if not all_finite(saved):
                raise RunError(
                    f"trained tensor '{name}' contains NaN or Inf (in {dtypes[name]}); no "
                    "final model was written. Lower training.learning_rate or optimizer.alpha."
                )
            writer.add(name, saved)

        with writer:
            yield take
            write_aux_files(writer, policy, None)
            writer.add_file("README.md", card)
            writer.add_file("rlmerge_recipe.yaml", recipe_text)
