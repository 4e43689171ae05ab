"""Generated parts of the docs: the train recipe key reference (docs/training.md), the
table of every command's arguments and options and the --json schema (docs/cli.md).

Every key of `TrainRecipe` (mergekit_rl/train/recipe.py) is listed with its type and default,
read from the schema, and a description from KEY_DOCS below (or the field's own `description`
when the schema gives one). The command table is read from the Typer app. tests/test_docs_sync.py
fails when a schema key has no description, when KEY_DOCS describes a key the schema lacks, or
when a generated block differs from what this module generates. After changing the schema or a
command's options:

    python -m mergekit_rl.cli.gendocs     # rewrites every block
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mergekit_rl.train.recipe import TrainRecipe, _submodel

KEYS_BLOCK = "key reference"
COMMANDS_BLOCK = "command options"
SCHEMA_BLOCK = "json schema"

# what each key means; "section.key" for nested keys
KEY_DOCS: dict[str, str] = {
    "algorithm": "The TRL trainer: `dpo`, `kto` (preference data), `grpo`, `rloo` (sampled "
    "completions scored by `reward`).",
    "policy": "The initial checkpoint: a local directory or a hub id `org/name[@revision]`.",
    "base": "The pretrained checkpoint: tau = policy - base, for `ondare` / `onties`.",
    "task_vector": "Instead of `base`: a file from `rlmerge task-vector extract` (not both).",
    "reference": "The KL reference: a checkpoint path, or `{soup: [...]}` (SALSA). Default: "
    "the trainer's own (a copy of the policy).",
    "optimizer": "AdamW, or an online merging optimizer (OnDARE / OnTIES).",
    "elastic_reset": "Elastic Reset: EMA of the policy; every `reset_every` steps policy <- "
    "EMA, EMA <- initial model.",
    "dataset": "The training data.",
    "reward": "GRPO / RLOO only: each key given is one reward function; their weighted sum is "
    "the reward.",
    "training": "Trainer settings.",
    "evaluation": "Held-out measures logged to metrics.jsonl every `eval_every` steps.",
    "peft": "Train a LoRA adapter instead of the full weights (TRL's `peft_config`); see below.",
    "peft.r": "LoRA rank.",
    "peft.alpha": "LoRA alpha (the update is scaled by alpha / r).",
    "peft.dropout": "Dropout on the LoRA input.",
    "peft.target_modules": "`all-linear`, or a list of module names to adapt.",
    # reference
    "reference.path": "A checkpoint (path or hub id) used as the reference.",
    "reference.soup": "Two or more checkpoints averaged in weight space (built into "
    "OUTPUT_DIR/reference).",
    "reference.weights": "Soup weights, one per checkpoint, normalised (default uniform).",
    # optimizer
    "optimizer.name": "`adamw`, `ondare` (random sparsification) or `onties` (top-k and sign "
    "election).",
    "optimizer.lr": "Learning rate; default `training.learning_rate` (give one of the two).",
    "optimizer.weight_decay": "Decoupled weight decay, applied after the update.",
    "optimizer.betas": "Adam's (beta1, beta2).",
    "optimizer.eps": "Adam's epsilon.",
    "optimizer.reserve_p": "Merging only: fraction of each update (and of tau) kept.",
    "optimizer.alpha": "Merging only: per-step rate at which tau is added (independent of the "
    "learning rate and schedule).",
    "optimizer.rescale": "OnDARE only: scale the kept entries of tau and of each update by "
    "1/reserve_p (the released code; the paper text has no rescaling).",
    "optimizer.sign_on": "OnTIES only: elect the sign on the `unweighted` sum tau + update (the "
    "released code) or on the `weighted` terms (the paper text).",
    "optimizer.clip_val": "Clamp the stored tau to +-clip_val once at the start, OnDARE and "
    "OnTIES (null: no clamp).",
    "optimizer.tau_l1_rescale": "OnTIES only: rescale the sparsified tau to keep its L1 norm.",
    "optimizer.merge_every": "Merging only: accumulate this many Adam updates, then sparsify "
    "and merge their sum (K-step merging).",
    "optimizer.decay_after_update": "Apply weight decay after the merged update (the released "
    "code) rather than before.",
    "optimizer.tau_dtype": "Storage dtype of tau (one extra copy of the trainable parameters).",
    "optimizer.stochastic_rounding": "bf16 / fp16 parameters: round each update to the "
    "parameter's dtype stochastically (unbiased; bits from the counter-based hash, so every "
    "rank rounds alike); off: round to nearest, which loses updates below half an ulp.",
    "optimizer.missing": "Parameters with no task vector (value heads, new rows): tau = 0 "
    "(`zero`) or an `error`.",
    # elastic reset
    "elastic_reset.ema_decay": "EMA decay eta: ema <- eta * ema + (1 - eta) * policy.",
    "elastic_reset.ema_every": "Optimizer steps between EMA updates.",
    "elastic_reset.reset_every": "Optimizer steps between resets (required).",
    "elastic_reset.kl_anchor": "KL reference: the fixed initial model (`init`) or the EMA "
    "itself (`ema`, which needs beta > 0 and no `reference`).",
    "elastic_reset.reset_optimizer": "Also clear the optimizer state at each reset.",
    "elastic_reset.keep_init_on_cpu": "Hold the initial weights in CPU memory; off: read them "
    "back from the policy checkpoint on disk at each reset.",
    # dataset
    "dataset.path": "A .json / .jsonl / .parquet / .csv file, or a hub dataset id (resolved "
    "before anything is loaded; offline, it must be in the local datasets cache). Columns: "
    "`prompt`, `chosen`, `rejected` (DPO); `prompt`, `completion`, `label` (KTO); `prompt` "
    "(GRPO / RLOO).",
    "dataset.split": "The split to train on.",
    "dataset.subset": "Hub dataset configuration name.",
    "dataset.columns": "Rename columns: `{their_column: our_column}`.",
    "dataset.max_examples": "Use only the first N examples.",
    # rewards
    "reward.keyword": "1 when the completion contains the words (or a count of them).",
    "reward.regex": "1.0 when `re.search(pattern)` finds a match, else 0.0.",
    "reward.length": "-penalty * |length - target| / target, length in tokens.",
    "reward.sentiment": "VADER's compound sentiment score of the completion, in [-1, 1] "
    "(needs the `lab` extra).",
    "reward.sentiment.weight": "This reward's weight in the sum.",
    "reward.model": "The score of a sequence-classification checkpoint.",
    "reward.function": "A Python function `module:function` (needs `--allow-code`).",
    "reward.keyword.words": "The words to look for.",
    "reward.keyword.mode": "`presence` (1 if any is found) or `count` (how many are found).",
    "reward.keyword.case_sensitive": "Match case exactly.",
    "reward.keyword.weight": "This reward's weight in the sum.",
    "reward.regex.pattern": "A Python regular expression.",
    "reward.regex.weight": "This reward's weight in the sum.",
    "reward.length.target": "Target completion length in tokens.",
    "reward.length.penalty": "Penalty per relative token of difference.",
    "reward.length.weight": "This reward's weight in the sum.",
    "reward.model.path": "The checkpoint (path or hub id); one score per sequence.",
    "reward.model.weight": "This reward's weight in the sum.",
    "reward.function.call": "`module:function`, called as TRL calls reward functions.",
    "reward.function.weight": "This reward's weight in the sum.",
    # training
    "training.output_dir": "Where metrics.jsonl, checkpoints and the final model go.",
    "training.learning_rate": "Peak learning rate.",
    "training.lr_scheduler": "A TRL / transformers schedule: `linear`, `cosine`, "
    "`cosine_with_min_lr`, `constant`, `constant_with_warmup`, `warmup_stable_decay`, ... "
    "(checked; its options go in `trainer_args.lr_scheduler_kwargs`).",
    "training.warmup_steps": "Linear warm-up steps.",
    "training.max_steps": "Optimizer steps (or `num_epochs`, not both).",
    "training.num_epochs": "Epochs; 1 when neither this nor `max_steps` is given.",
    "training.batch_size": "Per-device batch size.",
    "training.gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "training.max_length": "DPO / KTO: prompt + completion tokens.",
    "training.max_prompt_length": "Keep the last N tokens of each prompt.",
    "training.max_completion_length": "GRPO / RLOO: tokens generated per completion.",
    "training.num_generations": "GRPO / RLOO: completions per prompt; must divide batch_size "
    "x gradient_accumulation_steps.",
    "training.temperature": "GRPO / RLOO sampling temperature.",
    "training.beta": "KL weight; default: the trainer's (GRPO's is 0: no reference).",
    "training.loss_type": "The trainer's loss variant, e.g. `ipo` for DPO.",
    "training.seed": "Seed for data order, sampling and initialisation.",
    "training.logging_steps": "Steps between metrics lines.",
    "training.save_steps": "Steps between checkpoints (null: none; `--resume` needs one).",
    "training.save_total_limit": "Keep at most N checkpoints.",
    "training.dtype": "Dtype the policy is loaded and trained in.",
    "training.output_dtype": "Dtypes of the final model: `policy` writes each tensor in the policy "
    "checkpoint's dtype, rounding a more precise trained value stochastically (unbiased, seeded "
    "by `training.seed` and the tensor name) so movements below half an ulp survive on average; "
    "`float32` writes every float tensor in float32 (twice the size of a bf16 model).",
    "training.deepspeed": "A DeepSpeed JSON config (refused with online merging and Elastic "
    "Reset).",
    "training.mixed_precision": "Autocast: `bf16` / `fp16` matmuls over float32 master weights "
    "(needs `dtype: float32`); `auto`: bf16 on a GPU that has it; `no`: compute in `dtype`.",
    "training.gradient_checkpointing": "Keep each layer's input and recompute the rest of its "
    "activations in backward (much less activation memory, one more forward pass per step).",
    "training.max_grad_norm": "Clip the global gradient norm to this (null or 0: no clipping).",
    "training.report_to": "`none`, `tensorboard` or `wandb`, or a list (extras "
    "`mergekit-rl[tensorboard]` / `[wandb]`; refused when the package is missing).",
    "training.use_vllm": "GRPO / RLOO: generate with vLLM (TRL's `use_vllm`; extra "
    "`mergekit-rl[vllm]`, a GPU).",
    "training.trainer_args": "Any other argument of the algorithm's TRL config (`DPOConfig`, "
    "...), checked against it; keys the recipe sets elsewhere are refused.",
    # evaluation
    "evaluation.perplexity_text": "Held-out text file, one document per line: perplexity "
    "measures drift.",
    "evaluation.prompts": "Held-out prompts (.jsonl with `prompt`, or one per line).",
    "evaluation.kl": "KL(policy || initial policy) on the greedy completions of the prompts.",
    "evaluation.reward": "Mean reward of those completions (GRPO / RLOO).",
    "evaluation.eval_every": "Steps between evaluations.",
    "evaluation.max_new_tokens": "Tokens generated per held-out prompt.",
    "evaluation.max_examples": "Held-out prompts / documents used.",
    "evaluation.max_length": "Tokens per perplexity pass (longer documents: a sliding window); "
    "default the model's context (`max_position_embeddings`, else 2048).",
}


def schema_keys(model: type[BaseModel] = TrainRecipe, prefix: str = "") -> list[str]:
    """Every key of the schema, depth first: "optimizer", "optimizer.name", ..."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append(key)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys += schema_keys(sub, key + ".")
    return keys


def type_name(annotation: Any) -> str:
    """A short YAML-facing name: `dpo | kto`, `number`, `list of text`, `mapping`, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {str: "text", int: "integer", float: "number", bool: "true/false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "-"
    if isinstance(value, BaseModel):
        return "(defaults)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(str(v) for v in value)}]`"
    return f"`{value}`"


def describe(key: str, field: Any) -> str:
    text = field.description or KEY_DOCS.get(key)
    if not text:
        raise KeyError(f"train recipe key '{key}' has no description: add it to KEY_DOCS")
    return text


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        kind, default = type_name(field.annotation), default_text(field)
        lines.append(f"| `{key}` | {kind} | {default} | {describe(key, field)} |")
    return lines


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    out = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            key = prefix + (field.alias or name)
            out.append((key, sub))
            out += _sections(sub, key + ".")
    return out


def key_reference() -> str:
    """The generated block (without the markers)."""
    lines = ["### Top level", "", *_table(TrainRecipe, "")]
    for key, sub in _sections(TrainRecipe):
        lines += ["", f"### `{key}`", "", *_table(sub, key + ".")]
    return "\n".join(lines) + "\n"


def command_table() -> str:
    """Every command (subcommands as `task-vector apply`) with its arguments and options."""
    import typer

    from .app import app

    def walk(cmd: Any, path: list[str]) -> list[tuple[str, Any]]:
        if hasattr(cmd, "commands"):
            return [x for name, sub in cmd.commands.items() for x in walk(sub, [*path, name])]
        return [(" ".join(path), cmd)]

    lines = ["| command | arguments | options |", "|---|---|---|"]
    for name, cmd in walk(typer.main.get_command(app), []):
        args = [p.name.upper() for p in cmd.params if p.param_type_name == "argument"]
        opts = [
            "/".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            for p in cmd.params
            if p.param_type_name == "option"
        ]
        lines.append(f"| `{name}` | {' '.join(args) or '-'} | {', '.join(opts)} |")
    return "\n".join(lines) + "\n"


def json_schema_block() -> str:
    """The --json schema (cli/common.py) as a fenced JSON block."""
    import json

    from .common import JSON_SCHEMA

    return f"```json\n{json.dumps(JSON_SCHEMA, indent=2)}\n```\n"


GENERATORS = {
    KEYS_BLOCK: key_reference,
    COMMANDS_BLOCK: command_table,
    SCHEMA_BLOCK: json_schema_block,
}


def markers(block: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN generated {block}: python -m mergekit_rl.cli.gendocs -->",
        f"<!-- END generated {block} -->",
    )


def render(doc: str, block: str = KEYS_BLOCK) -> str:
    """`doc` with the text between the block's markers replaced by the generated text."""
    begin, end = markers(block)
    head, sep, rest = doc.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"the document lacks the markers {begin!r} ... {end!r}")
    text = GENERATORS[block]()
    return f"{head}{begin}\n\n{text}\n{end}{tail}"


TARGETS = [
    (KEYS_BLOCK, "docs/training.md"),
    (COMMANDS_BLOCK, "docs/cli.md"),
    (SCHEMA_BLOCK, "docs/cli.md"),
]


def main(root: str = ".") -> None:
    for block, rel in TARGETS:
        target = Path(root) / rel
        target.write_text(render(target.read_text(), block))
        print(f"wrote the {block} into {target}", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
