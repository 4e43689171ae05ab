"""The train recipe (`rlmerge train RECIPE.yaml`): schema, defaults and validation.

One YAML document describes one training run on a TRL trainer:

    algorithm: dpo                      # dpo | kto | grpo | rloo
    policy: models/sft1                 # the initial checkpoint (path or hub id)
    base: models/base                   # tau = policy - base, for ondare / onties
    reference: {soup: [models/sft1, models/sft2]}   # or a checkpoint path (SALSA: a soup)
    optimizer: {name: ondare, reserve_p: 0.01, alpha: 1.0e-7}
    elastic_reset: {ema_decay: 0.995, reset_every: 50}
    dataset: {path: data/prefs.jsonl}
    reward: {keyword: {words: [merge]}, length: {target: 20}}   # grpo / rloo only
    peft: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}   # train LoRA adapters
    training: {learning_rate: 1.0e-6, max_steps: 100, output_dir: runs/dpo}
    evaluation: {perplexity_text: data/heldout.txt, prompts: data/prompts.jsonl, eval_every: 10}

Like merge recipes: unknown keys are errors (with a did-you-mean), every problem is reported at
once with its YAML path, and loading never runs code. A `reward.function` (Python
`module:function`) is accepted only when the caller allows code (`rlmerge train --allow-code`).
Paths are relative to the working directory; every checkpoint, hub id and file the recipe names
is resolved in the same validation pass (`read_train_recipe`), before anything is loaded or written.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import InputNotFoundError, RecipeError, UsageError
from ..recipe.schema import load_documents, schema_problems

Algorithm = Literal["dpo", "kto", "grpo", "rloo"]
ReportTo = Literal["none", "tensorboard", "wandb"]
ONLINE_MERGING = ("ondare", "onties")
SAMPLING = ("grpo", "rloo")  # generate completions and score them with rewards
Problems = list[tuple[str, str]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SoupReference(_Strict):
    """A fixed checkpoint (`path`) or a weight-space soup of several (`soup`, SALSA)."""

    path: str | None = None
    soup: list[str] | None = Field(default=None, min_length=2)
    weights: list[float] | None = None  # normalised; default uniform

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class OptimizerSpec(_Strict):
    """AdamW, or OnlineMergingAdamW (train/optim.py) with its parameters."""

    name: Literal["adamw", "ondare", "onties"] = "adamw"
    lr: float | None = Field(default=None, ge=0)  # default: training.learning_rate
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, ge=0)
    # online merging only (the paper's defaults, design notes section 2)
    reserve_p: float = Field(default=0.01, gt=0, le=1)
    alpha: float = Field(default=1e-7, ge=0, le=1)  # a per-step rate
    rescale: bool = True  # 1/reserve_p on kept entries (the released code)
    sign_on: Literal["unweighted", "weighted"] = "unweighted"
    clip_val: float | None = Field(default=1.0, gt=0)
    tau_l1_rescale: bool = False
    merge_every: int = Field(default=1, ge=1)
    decay_after_update: bool = True
    tau_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    missing: Literal["zero", "error"] = "zero"  # parameters with no task vector
    stochastic_rounding: bool = True  # bf16/fp16 parameters: unbiased rounding of updates


ADAMW_KEYS = frozenset({"name", "lr", "weight_decay", "betas", "eps"})


class ElasticResetSpec(_Strict):
    ema_decay: float = Field(default=0.995, ge=0, lt=1)
    ema_every: int = Field(default=1, ge=1)  # optimizer steps between EMA updates
    reset_every: int = Field(ge=1)  # optimizer steps between resets
    kl_anchor: Literal["init", "ema"] = "init"
    reset_optimizer: bool = False
    keep_init_on_cpu: bool = False


class PeftSpec(_Strict):
    """Train LoRA adapters instead of full weights (TRL's peft_config, a peft LoraConfig)."""

    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DatasetSpec(_Strict):
    path: str = Field(min_length=1)  # .json / .jsonl / .parquet / .csv file, or a hub dataset id
    split: str = "train"
    subset: str | None = None  # hub dataset configuration name
    columns: dict[str, str] | None = None  # rename: {their_column: our_column}
    max_examples: int | None = Field(default=None, ge=1)


class KeywordReward(_Strict):
    words: list[str] = Field(min_length=1)
    mode: Literal["count", "presence"] = "presence"
    case_sensitive: bool = False
    weight: float = 1.0

    @field_validator("words")
    @classmethod
    def _no_empty_word(cls, words: list[str]) -> list[str]:
        empty = [i for i, w in enumerate(words) if not w]
        if empty:
            raise ValueError(f"word {empty[0]} is empty; every word needs at least one character")
        return words


class RegexReward(_Strict):
    pattern: str = Field(min_length=1)  # 1.0 when re.search finds it, else 0.0
    weight: float = 1.0


class LengthReward(_Strict):
    target: int = Field(ge=1)  # completion length in tokens
    penalty: float = Field(default=1.0, ge=0)  # reward = -penalty * |length - target| / target
    weight: float = 1.0


class SentimentReward(_Strict):
    """VADER's compound sentiment score of the completion, in [-1, 1] (needs the `lab` extra)."""

    weight: float = 1.0


class ModelReward(_Strict):
    path: str = Field(min_length=1)  # a sequence-classification checkpoint (one score)
    weight: float = 1.0


class FunctionReward(_Strict):
    call: str = Field(pattern=r"^[\w.]+:\w+$")  # module:function, needs --allow-code
    weight: float = 1.0


class RewardSpec(_Strict):
    """Each key given is one reward function; GRPO/RLOO sum them with their weights."""

    keyword: KeywordReward | None = None
    regex: RegexReward | None = None
    length: LengthReward | None = None
    sentiment: SentimentReward | None = None
    model: ModelReward | None = None
    function: FunctionReward | None = None

    def entries(self) -> list[tuple[str, BaseModel]]:
        return [(k, getattr(self, k)) for k in type(self).model_fields if getattr(self, k)]


class TrainingSpec(_Strict):
    output_dir: str = Field(min_length=1)
    learning_rate: float = Field(default=1e-6, ge=0)
    lr_scheduler: str = "cosine"  # any transformers SchedulerType: linear, cosine, constant, ...
    warmup_steps: int = Field(default=0, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    num_epochs: float | None = Field(default=None, gt=0)  # default 1 when max_steps is unset
    batch_size: int = Field(default=8, ge=1)  # per device
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=1)  # dpo / kto: prompt + completion tokens
    max_prompt_length: int | None = Field(default=None, ge=1)  # prompts keep their last tokens
    max_completion_length: int = Field(default=256, ge=1)  # grpo / rloo generation
    num_generations: int = Field(default=4, ge=2)  # grpo / rloo completions per prompt
    temperature: float = Field(default=1.0, gt=0)  # grpo / rloo sampling
    beta: float | None = Field(default=None, ge=0)  # KL weight; default: the trainer's
    loss_type: str | None = None  # e.g. ipo for DPO; default: the trainer's
    seed: int = 0
    logging_steps: int = Field(default=1, ge=1)
    save_steps: int | None = Field(default=500, ge=1)  # None: no intermediate checkpoints
    save_total_limit: int | None = Field(default=None, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # policy load dtype
    # final model: the policy checkpoint's dtypes (rounded stochastically from a more precise
    # training dtype, seeded by seed and tensor name), or float32 for every float tensor
    output_dtype: Literal["policy", "float32"] = "policy"
    deepspeed: str | None = None  # a DeepSpeed JSON config (refused with online merging)
    # autocast: bf16 / fp16 matmuls over float32 master weights (needs dtype float32); auto:
    # bf16 on a GPU that has it, unless dtype is float16; no: compute in the weights' dtype
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for time
    max_grad_norm: float | None = Field(default=1.0, ge=0)  # clip the global norm; 0/None: off
    report_to: list[ReportTo] = ["none"]  # tensorboard / wandb (optional extras); one or a list
    use_vllm: bool = False  # grpo / rloo: generate with vLLM (TRL's use_vllm)
    # any other argument of the algorithm's TRL config (DPOConfig, ...), checked against it
    trainer_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_targets(cls, value: Any) -> Any:
        """One target or a list of them; an unknown one named with the choices."""
        names = [value] if isinstance(value, str) else value
        choices = typing.get_args(ReportTo)
        if isinstance(names, list):
            for name in names:
                if name not in choices:
                    raise ValueError(
                        f"unknown target {name!r}: give {', '.join(choices)}, or a list of them"
                    )
        return names


class EvaluationSpec(_Strict):
    # held-out documents: .jsonl / .json with "text" (a string or chat messages), or one per line
    perplexity_text: str | None = None
    # held-out prompts: .jsonl / .json with "prompt" (a string or chat messages) and any columns
    # the reward functions take, or one prompt per line
    prompts: str | None = None
    kl: bool = True  # KL(policy || initial policy) on the prompts' greedy completions
    reward: bool = True  # mean reward of those completions (grpo / rloo)
    eval_every: int = Field(default=50, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    max_examples: int = Field(default=64, ge=1)
    # tokens per forward pass (perplexity window; prompt + completion); default: the model's
    # context (config.max_position_embeddings)
    max_length: int | None = Field(default=None, ge=2)


class TrainRecipe(_Strict):
    algorithm: Algorithm
    policy: str = Field(min_length=1)
    base: str | None = None
    task_vector: str | None = None  # from `rlmerge task-vector extract` (instead of base)
    reference: SoupReference | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    elastic_reset: ElasticResetSpec | None = None
    peft: PeftSpec | None = None
    dataset: DatasetSpec
    reward: RewardSpec | None = None
    training: TrainingSpec
    evaluation: EvaluationSpec | None = None

    @property
    def learning_rate(self) -> float:
        return self.optimizer.lr if self.optimizer.lr is not None else self.training.learning_rate


# -- did-you-mean hints ----------------------------------------------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, X | None, list[X])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Keys valid beside the last element of `loc`, walking TrainRecipe's nested models."""
    model: type[BaseModel] | None = TrainRecipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    return list(model.model_fields) if model else []


def train_schema_problems(err: ValidationError) -> Problems:
    """schema_problems, with did-you-mean hints taken from the train recipe's keys."""
    problems = []
    for e, (path, message) in zip(err.errors(), schema_problems(err), strict=True):
        if e["type"] == "extra_forbidden":
            loc = tuple(e["loc"])
            hint = difflib.get_close_matches(str(loc[-1]), known_keys(loc), n=1)
            message = f"unknown key (did you mean {hint[0]}?)" if hint else "unknown key"
        problems.append((path, message))
    return problems


# -- checks across keys (on the raw YAML, so they run even when the schema fails) -----------


def _get(doc: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(k)
    return doc


def cross_problems(doc: dict[str, Any], allow_code: bool) -> Problems:
    """Rules that involve several keys: what each algorithm and optimizer needs."""
    problems: Problems = []
    algorithm, opt = doc.get("algorithm"), _get(doc, "optimizer", "name") or "adamw"
    reward, training = doc.get("reward"), doc.get("training")
    if algorithm in SAMPLING and not reward:
        problems.append(
            (
                "reward",
                f"required for algorithm {algorithm}: give keyword, regex, length, sentiment, "
                "model or function (the reward keys are in docs/training.md).",
            )
        )
    if algorithm in ("dpo", "kto") and reward:
        problems.append(("reward", f"used only by grpo and rloo; {algorithm} learns from data."))
    if _get(reward, "function") is not None and not allow_code:
        problems.append(
            (
                "reward.function",
                "runs Python code named by the recipe; pass --allow-code if you "
                "trust this recipe, or use a built-in reward.",
            )
        )
    if opt in ONLINE_MERGING and not (doc.get("base") or doc.get("task_vector")):
        problems.append(
            (
                "base",
                f"optimizer {opt} needs the task vector tau = policy - base: give base "
                "(the pretrained checkpoint) or task_vector (from `rlmerge task-vector extract`).",
            )
        )
    problems += _peft_problems(algorithm, opt, doc)
    if doc.get("base") and doc.get("task_vector"):
        problems.append(("task_vector", "give base or task_vector, not both."))
    if opt == "adamw" and isinstance(doc.get("optimizer"), dict):
        for key in sorted(set(doc["optimizer"]) - ADAMW_KEYS):
            if key in OptimizerSpec.model_fields:
                problems.append((f"optimizer.{key}", "used only by ondare and onties."))
    problems += _training_problems(algorithm, doc, training)
    return problems


def _peft_problems(algorithm: Any, opt: str, doc: dict[str, Any]) -> Problems:
    if not doc.get("peft"):
        return []
    problems: Problems = []
    if opt in ONLINE_MERGING:
        problems.append(
            (
                "peft",
                f"optimizer {opt} merges every update with the full-weight task vector tau = "
                "policy - base, and LoRA factors have no counterpart in tau; use optimizer adamw "
                "with peft, or drop peft.",
            )
        )
    if algorithm in SAMPLING and doc.get("reference"):
        problems.append(
            (
                "reference",
                f"with peft, {algorithm} takes the policy with its adapter disabled as the "
                "reference; a separate reference model is not supported. Drop one of them.",
            )
        )
    return problems


def _training_problems(algorithm: Any, doc: dict[str, Any], training: Any) -> Problems:
    problems: Problems = []
    if not isinstance(training, dict):
        return problems
    lr, opt_lr = training.get("learning_rate"), _get(doc, "optimizer", "lr")
    if lr is not None and opt_lr is not None and lr != opt_lr:
        problems.append(("optimizer.lr", f"differs from training.learning_rate ({lr}); give one."))
    if training.get("max_steps") is not None and training.get("num_epochs") is not None:
        problems.append(("training.num_epochs", "give max_steps or num_epochs, not both."))
    ema_anchor = _get(doc, "elastic_reset", "kl_anchor") == "ema"
    if algorithm == "grpo" and (doc.get("reference") or ema_anchor) and not training.get("beta"):
        what = "reference" if doc.get("reference") else "EMA anchor (elastic_reset.kl_anchor)"
        problems.append(
            (
                "training.beta",
                f"grpo ignores the {what} unless beta > 0 (its default is 0); set beta, e.g. 0.04.",
            )
        )
    if algorithm in SAMPLING:
        gen = training.get("num_generations", 4)
        sizes = (training.get("batch_size", 8), training.get("gradient_accumulation_steps", 1))
        batch = sizes[0] * sizes[1] if all(isinstance(n, int) for n in sizes) else 0
        if isinstance(gen, int) and gen >= 1 and batch % gen:
            problems.append(
                (
                    "training.num_generations",
                    f"must divide batch_size x "
                    f"gradient_accumulation_steps ({batch}): each prompt gets {gen} completions.",
                )
            )
    if ema_anchor and doc.get("reference"):
        problems.append(
            (
                "elastic_reset.kl_anchor",
                "ema makes the EMA the KL reference; drop `reference` or use kl_anchor: init.",
            )
        )
    if training.get("deepspeed") and (
        doc.get("elastic_reset") or _get(doc, "optimizer", "name") in ONLINE_MERGING
    ):
        problems.append(("training.deepspeed", DEEPSPEED_REFUSED))
    if training.get("use_vllm") and algorithm in ("dpo", "kto"):
        problems.append(
            ("training.use_vllm", f"used only by grpo and rloo; {algorithm} does not generate.")
        )
    problems += _precision_problems(training)
    problems += _scheduler_problems(training.get("lr_scheduler"))
    problems += trainer_args_problems(algorithm, training.get("trainer_args"))
    return problems


def _precision_problems(training: dict[str, Any]) -> Problems:
    mixed, dtype = training.get("mixed_precision"), training.get("dtype", "float32")
    if mixed in ("bf16", "fp16") and dtype != "float32":
        return [
            (
                "training.mixed_precision",
                f"{mixed} autocast keeps float32 master weights, but training.dtype is {dtype} "
                "(the weights are stored and updated in it); set dtype: float32, or "
                "mixed_precision: no to compute in the weights' dtype.",
            )
        ]
    return []


def scheduler_names() -> list[str]:
    """The learning-rate schedules TRL's trainers take (transformers' SchedulerType)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def _scheduler_problems(name: Any) -> Problems:
    if not isinstance(name, str) or name in (names := scheduler_names()):
        return []
    hint = difflib.get_close_matches(name, names, n=1)
    again = f"did you mean {hint[0]}? " if hint else ""
    return [
        ("training.lr_scheduler", f"unknown scheduler '{name}' ({again}one of {', '.join(names)}).")
    ]


# TRL config argument -> the recipe key that sets it (refused in training.trainer_args)
OWN_ARGS = {
    "output_dir": "training.output_dir",
    "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_steps": "training.warmup_steps",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.num_epochs",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "seed": "training.seed",
    "logging_steps": "training.logging_steps",
    "save_strategy": "training.save_steps",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "weight_decay": "optimizer.weight_decay",
    "adam_beta1": "optimizer.betas",
    "adam_beta2": "optimizer.betas",
    "adam_epsilon": "optimizer.eps",
    "optim": "optimizer.name",
    "bf16": "training.mixed_precision",
    "fp16": "training.mixed_precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "activation_checkpointing": "training.gradient_checkpointing",  # transformers 5's name
    "max_grad_norm": "training.max_grad_norm",
    "report_to": "training.report_to",
    "deepspeed": "training.deepspeed",
    "beta": "training.beta",
    "loss_type": "training.loss_type",
    "max_length": "training.max_length",
    "max_prompt_length": "training.max_prompt_length",
    "max_completion_length": "training.max_completion_length",
    "num_generations": "training.num_generations",
    "temperature": "training.temperature",
    "use_vllm": "training.use_vllm",
    "reward_weights": "reward (each reward's weight)",
    "model_init_kwargs": "training.dtype (rlmerge loads the policy itself)",
    "use_cpu": "none: rlmerge trains on the GPU when there is one",
    "disable_tqdm": "none: rlmerge shows its own progress (-q to silence it)",
    "resume_from_checkpoint": "the --resume option",
}


def trl_config_class(algorithm: str) -> type:
    """DPOConfig, KTOConfig, GRPOConfig or RLOOConfig (TRL's TrainingArguments subclasses)."""
    import trl

    return getattr(trl, f"{algorithm.upper()}Config")


def trl_arg_names(algorithm: str) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(trl_config_class(algorithm)) if f.init]


def trainer_args_problems(algorithm: Any, args: Any) -> Problems:
    """training.trainer_args: each key must be an argument of the algorithm's TRL config that
    no recipe key sets already."""
    if not isinstance(args, dict) or not args or algorithm not in ("dpo", "kto", "grpo", "rloo"):
        return []
    try:
        names = trl_arg_names(algorithm)
    except ImportError:
        return [
            ("training.trainer_args", "checking it needs TRL: pip install 'mergekit-rl[train]'.")
        ]
    config = f"{algorithm.upper()}Config"
    problems: Problems = []
    for key in args:
        where = f"training.trainer_args.{key}"
        if key in OWN_ARGS:
            owner = OWN_ARGS[key]
            problems.append(
                (
                    where,
                    f"set by rlmerge from {owner}; give it there."
                    if not owner.startswith("none:")
                    else f"not settable ({owner[6:]}).",
                )
            )
        elif key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            again = f" (did you mean {hint[0]}?)" if hint else ""
            problems.append((where, f"not an argument of TRL's {config}{again}."))
    return problems


# keys naming files that must exist locally (checked before any model is loaded)
LOCAL_FILES = (
    ("evaluation", "perplexity_text"),
    ("evaluation", "prompts"),
    ("training", "deepspeed"),
)
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_refs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(YAML path, reference) of every checkpoint the recipe names: a local path, a
    .safetensors file (task_vector) or a hub id org/name[@revision]."""
    refs = [(key, _get(doc, *key.split("."))) for key in ("policy", "base", "task_vector")]
    reference = doc.get("reference")
    if isinstance(reference, str):
        refs.append(("reference", reference))
    elif isinstance(reference, dict):
        refs.append(("reference.path", reference.get("path")))
        soup = reference.get("soup")
        refs += (
            [(f"reference.soup[{i}]", r) for i, r in enumerate(soup or [])]
            if isinstance(soup, list)
            else []
        )
    refs.append(("reward.model.path", _get(doc, "reward", "model", "path")))
    return [(key, ref) for key, ref in refs if isinstance(ref, str) and ref]


def hub_dataset_problem(path: str, subset: str | None = None) -> str | None:
    """Why hub dataset `path` cannot be loaded, or None; checked before anything is loaded.

    datasets resolves the id as load_dataset would, without reading any data: online, the
    repository's card and file list; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), the
    datasets cache, so a dataset prepared there earlier passes and any other id fails now
    instead of after the policy is loaded.
    """
    import datasets

    try:
        datasets.load_dataset_builder(path, subset)
    except datasets.exceptions.DatasetNotFoundError as e:
        return f"hub dataset '{path}' not found or not accessible ({e})."
    except ConnectionError:
        return (
            f"'{path}' is not a local file, and as a hub dataset it is not in the local datasets "
            "cache and the hub cannot be reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or "
            "there is no network). Load it once online, or give a .json/.jsonl/.parquet/.csv file."
        )
    except (FileNotFoundError, ValueError) as e:  # no data files, an unknown subset
        return f"hub dataset '{path}': {e}"
    return None


def path_problems(doc: dict[str, Any], config_only: bool = False) -> Problems:
    """Every checkpoint, hub id and file the recipe names that cannot be found, with its YAML
    path (paths relative to the working directory). Checkpoints are resolved as the merge
    commands resolve them: a hub id is looked up (and fetched into the cache) now, so that a
    typo never surfaces after the policy is loaded. config_only: a local directory holding a
    config.json without weights passes (a dry run's memory plan needs the config alone)."""
    from ..io.reference import resolve

    problems: Problems = []
    for key, ref in model_refs(doc):
        if config_only and (Path(ref) / "config.json").is_file():
            continue
        try:
            resolve(ref)
        except UsageError as e:
            problems.append((key, str(e)))
    cwd = Path.cwd()
    for keys in LOCAL_FILES:
        value = _get(doc, *keys)
        if isinstance(value, str) and value and not Path(value).is_file():
            problems.append(
                (".".join(keys), f"file '{value}' not found (paths are relative to {cwd}).")
            )
    data = _get(doc, "dataset", "path")
    local = isinstance(data, str) and (
        data.lower().endswith(DATA_SUFFIXES) or not _HUB_DATASET.match(data)
    )  # a hub dataset id (org/name) is resolved by the datasets library
    if local and data and not Path(data).exists():
        problems.append(
            (
                "dataset.path",
                f"file '{data}' not found (paths are relative to {cwd}); give a "
                ".json/.jsonl/.parquet/.csv file or a hub dataset id.",
            )
        )
    elif isinstance(data, str) and data and not local and not Path(data).exists():
        subset = _get(doc, "dataset", "subset")
        problem = hub_dataset_problem(data, subset if isinstance(subset, str) else None)
        if problem:
            problems.append(("dataset.path", problem))
    return problems


# the one refusal message, used by the recipe check and by the accelerate-environment check
DEEPSPEED_REFUSED = (
    "DeepSpeed ZeRO keeps its own flattened fp32 weights, so the online merging optimizers and "
    "Elastic Reset cannot edit the weights in place; use DDP (accelerate launch --multi_gpu) or "
    "FSDP2 (accelerate launch --config_file recipes/train/accelerate/fsdp2.yaml) instead, or "
    "train with optimizer adamw and no elastic_reset under DeepSpeed."
)


# -- loading ---------------------------------------------------------------------------------


def parse_train_recipe(
    text: str,
    source: str,
    allow_code: bool = False,
    check_paths: bool = False,
    config_only: bool = False,
) -> TrainRecipe:
    """Validate a train recipe's text: the recipe, or one RecipeError with every problem.

    check_paths: also resolve every checkpoint, hub id and file it names (path_problems),
    reporting those problems with the others.
    """
    docs, problems = load_documents(text, source)
    recipe = None
    if len(docs) > 1:
        problems.append(("", f"a train recipe is one YAML document; {source} holds {len(docs)}."))
    elif docs and not isinstance(docs[0], dict):
        problems.append(
            ("", f"a train recipe is a mapping of keys (algorithm, ...), got {docs[0]!r}")
        )
    elif docs:
        try:
            recipe = TrainRecipe.model_validate(docs[0])
        except ValidationError as e:
            problems += train_schema_problems(e)
        problems += cross_problems(docs[0], allow_code)
        if check_paths:
            problems += path_problems(docs[0], config_only)
    if problems or recipe is None:
        raise RecipeError(source, problems)
    return recipe


def read_train_recipe(
    path: str | Path, allow_code: bool = False, config_only: bool = False
) -> tuple[TrainRecipe, str]:
    """The validated recipe in `path` and its text (quoted in the model card). config_only:
    model directories may hold a config.json alone (`path_problems`)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"train recipe '{path}' not found; check the path.")
    text = path.read_text()
    return (
        parse_train_recipe(text, str(path), allow_code, check_paths=True, config_only=config_only),
        text,
    )


def is_train_recipe(text: str) -> bool:
    """Whether recipe text is a train recipe (a mapping with `algorithm`, no `merge_method`);
    `rlmerge validate` checks those with this module's schema."""
    import yaml

    try:
        doc = next(iter(yaml.safe_load_all(text)), None)
    except yaml.YAMLError:
        return False  # the merge loader reports the YAML error
    return isinstance(doc, dict) and "algorithm" in doc and "merge_method" not in doc


def check_train_recipe(path: str | Path) -> TrainRecipe:
    """Validate a train recipe file without resolving what it names (no model, dataset or
    network is touched): `rlmerge validate`. reward.function is accepted, since nothing is
    imported here; `rlmerge train` still asks for --allow-code."""
    path = Path(path)
    return parse_train_recipe(path.read_text(), str(path), allow_code=True)
