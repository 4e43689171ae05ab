"""The recipe keys a real run needs (gradient checkpointing, mixed precision, clipping,
schedulers, report_to, trainer_args, use_vllm): accepted, passed to the trainer, and doing what
they say; progress output; Hub metadata in model cards."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from mergekit_rl.cli.app import app
from transformers import TrainerCallback
from typer.testing import CliRunner

from mergekit_rl.errors import RecipeError, UsageError
from mergekit_rl.io.card import front_matter
from mergekit_rl.train.progress import TrainProgress, format_eta
from mergekit_rl.train.recipe import OWN_ARGS, parse_train_recipe
from mergekit_rl.train.run import TrainOptions, check_environment, train, trainer_config

DATA = Path(__file__).resolve().parents[2] / "recipes" / "train" / "data"


def recipe_doc(family: dict[str, Path], out: Path, **training: Any) -> dict[str, Any]:
    """Plain-AdamW DPO on the tiny family, 2 steps of batch 4."""
    return {
        "algorithm": "dpo",
        "policy": str(family["sft1"]),
        "dataset": {"path": str(DATA / "prefs.jsonl")},
        "training": {
            "output_dir": str(out),
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 48,
            "save_steps": None,
            **training,
        },
    }


def parse(doc: dict[str, Any]):  # noqa: ANN201
    return parse_train_recipe(yaml.safe_dump(doc), "r.yaml")


def problems(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(RecipeError) as e:
        parse(doc)
    return dict(e.value.problems)


# -- the keys reach the TRL config ---------------------------------------------------------------


def test_new_keys_reach_the_trainer_arguments(family: dict[str, Path], tmp_path: Path) -> None:
    doc = recipe_doc(
        family,
        tmp_path / "run",
        gradient_checkpointing=True,
        mixed_precision="bf16",
        max_grad_norm=0.25,
        lr_scheduler="cosine_with_min_lr",
        report_to="tensorboard",
        trainer_args={"label_smoothing": 0.1, "lr_scheduler_kwargs": {"min_lr": 1e-5}},
    )
    args = trainer_config(parse(doc), None)
    assert args.gradient_checkpointing is True
    assert args.bf16 is True and args.fp16 is False
    assert args.max_grad_norm == 0.25
    assert args.lr_scheduler_type.value == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert args.report_to == ["tensorboard"]
    assert args.label_smoothing == 0.1
    # defaults: clipping at 1.0 (the trainer's), nothing reported, no autocast on CPU
    args = trainer_config(parse(recipe_doc(family, tmp_path / "run")), None)
    assert args.max_grad_norm == 1.0 and args.report_to in ([], ["none"])
    assert args.gradient_checkpointing is False and args.bf16 is torch.cuda.is_available()
    off = trainer_config(parse(recipe_doc(family, tmp_path / "r", max_grad_norm=None)), None)
    assert off.max_grad_norm == 0.0  # 0: the trainer does not clip


def test_every_argument_we_set_is_guarded_in_trainer_args(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """A trainer_args key that we set from a recipe key is refused (OWN_ARGS names them all)."""
    from mergekit_rl.train.run import trainer_kwargs

    for algorithm in ("dpo", "grpo"):
        doc = recipe_doc(family, tmp_path / "run", num_generations=2)
        if algorithm == "grpo":
            doc |= {"algorithm": "grpo", "reward": {"length": {"target": 4}}}
            doc["dataset"] = {"path": str(DATA / "prompts.jsonl")}
        assert set(trainer_kwargs(parse(doc), None)) <= set(OWN_ARGS)


def test_trainer_args_unknown_and_conflicting_keys_are_refused(
    family: dict[str, Path], tmp_path: Path
) -> None:
    doc = recipe_doc(
        family,
        tmp_path / "run",
        trainer_args={"label_smothing": 0.1, "max_grad_norm": 2.0, "use_cpu": True},
    )
    found = problems(doc)
    assert found["training.trainer_args.label_smothing"] == (
        "not an argument of TRL's DPOConfig (did you mean label_smoothing?)."
    )
    assert "training.max_grad_norm" in found["training.trainer_args.max_grad_norm"]
    assert "not settable" in found["training.trainer_args.use_cpu"]
    # a GRPO argument is not a DPO one
    grpo_only = recipe_doc(family, tmp_path / "run", trainer_args={"top_p": 0.9})
    assert "DPOConfig" in problems(grpo_only)["training.trainer_args.top_p"]


def test_unknown_trainer_arg_is_refused_before_any_model_is_loaded(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def never(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    path = tmp_path / "r.yaml"
    doc = recipe_doc(family, tmp_path / "run", trainer_args={"lr_scheduler_kwarg": 0.1})
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "training.trainer_args.lr_scheduler_kwarg" in result.stderr
    assert "did you mean lr_scheduler_kwargs?" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("training", "key", "words"),
    [
        ({"lr_scheduler": "cosin"}, "training.lr_scheduler", "did you mean cosine?"),
        (
            {"mixed_precision": "bf16", "dtype": "bfloat16"},
            "training.mixed_precision",
            "float32 master weights",
        ),
        ({"use_vllm": True}, "training.use_vllm", "only by grpo and rloo"),
        ({"report_to": "mlflow"}, "training.report_to", "none"),
    ],
)
def test_bad_values_are_named(
    family: dict[str, Path], tmp_path: Path, training: dict, key: str, words: str
) -> None:
    found = problems(recipe_doc(family, tmp_path / "run", **training))
    assert words in found[key], found


def test_missing_optional_packages_are_refused(family: dict[str, Path], tmp_path: Path) -> None:
    cases = [("wandb", {"report_to": ["tensorboard", "wandb"]}, "training.report_to: wandb")]
    cases.append(("vllm", {"use_vllm": True}, "training.use_vllm"))
    for package, training, key in cases:
        if importlib.util.find_spec(package) is not None:
            continue  # installed here: nothing to refuse
        if "tensorboard" in training.get("report_to", []) and not importlib.util.find_spec(
            "tensorboard"
        ):
            continue  # tensorboard, listed first, would be refused first
        doc = recipe_doc(family, tmp_path / "run", num_generations=2, **training)
        if package == "vllm":
            doc |= {"algorithm": "grpo", "reward": {"length": {"target": 4}}}
        with pytest.raises(UsageError, match=f"{key} needs the '{package}' package"):
            check_environment(parse(doc))


def test_dry_run_shows_the_trainer_arguments(family: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    doc = recipe_doc(family, tmp_path / "run", trainer_args={"label_smoothing": 0.2})
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    trainer = json.loads(result.stdout)["trainer"]
    assert trainer["class"] == "DPOConfig"
    assert trainer["args"]["label_smoothing"] == 0.2
    assert trainer["args"]["max_grad_norm"] == 1.0 and trainer["args"]["max_steps"] == 2
    text = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert "label_smoothing: 0.2" in text.stdout and "class: DPOConfig" in text.stdout


# -- the keys change what they should (a real 2-step run) -------------------------------------


class Probe(TrainerCallback):
    """Records, per optimizer step, the global gradient norm after clipping (the trainer logs
    the norm before it), the dtype of a Linear's output, and how often layer 0 ran."""

    def __init__(self) -> None:
        self.clipped: list[float] = []
        self.logged: list[float] = []
        self.out_dtypes: set[torch.dtype] = set()
        self.layer_calls = 0
        self.checkpointing: bool | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self.checkpointing = model.is_gradient_checkpointing
        # a module inside layer 0, before it runs (transformers checkpoints the layer's forward,
        # so hooks on the layer itself run once; torch's recompute may stop before the layer's
        # last module returns, so a forward pre-hook is what counts the recompute)
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.register_forward_pre_hook(
            lambda m, i: setattr(self, "layer_calls", self.layer_calls + 1)
        )
        proj = model.model.layers[0].self_attn.q_proj
        proj.register_forward_hook(lambda m, i, o: self.out_dtypes.add(o.dtype))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw):
        grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
        self.clipped.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "grad_norm" in logs:
            self.logged.append(float(logs["grad_norm"]))


def run_probed(family: dict[str, Path], out: Path, **training: Any) -> tuple[Probe, Any]:
    doc = recipe_doc(family, out, **training)
    text = yaml.safe_dump(doc)
    probe = Probe()
    train(parse(doc), text, TrainOptions(echo=lambda s: None, callbacks=[probe]))
    return probe, out / "final"


@pytest.mark.slow
def test_checkpointing_autocast_clipping_and_tensorboard(
    family: dict[str, Path], tmp_path: Path
) -> None:
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    plain, _ = run_probed(family, tmp_path / "plain", max_grad_norm=None)
    probe, final = run_probed(
        family,
        tmp_path / "real",
        gradient_checkpointing=True,
        mixed_precision="bf16",
        max_grad_norm=1e-3,
        report_to="tensorboard" if tensorboard else "none",
    )
    # gradient checkpointing: on, and layer 0 runs again in backward (2 forwards per pass)
    assert plain.checkpointing is False and probe.checkpointing is True
    assert probe.layer_calls == 2 * plain.layer_calls > 0
    # bf16 autocast: bf16 matmul outputs over float32 weights (the final model stays float32)
    assert plain.out_dtypes == {torch.float32} and probe.out_dtypes == {torch.bfloat16}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    # clipping: the norm before (logged) is above 1e-3, after it is 1e-3; unclipped: equal
    assert len(probe.clipped) == len(probe.logged) == 2
    assert all(before > 1e-2 for before in probe.logged)
    assert probe.clipped == pytest.approx([1e-3, 1e-3], rel=1e-3)
    assert plain.clipped == pytest.approx(plain.logged, rel=1e-3)
    if tensorboard:
        events = list((tmp_path / "real").rglob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    # the model card: Hub front matter naming the policy, tagged as DPO (not merge)
    meta = front_matter((final / "README.md").read_text())
    assert meta["base_model"] == str(family["sft1"])
    assert meta["base_model_relation"] == "finetune"
    assert meta["tags"] == ["rlmerge", "trl", "dpo"] and meta["license"] == "apache-2.0"


# -- progress ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_progress_lines_in_a_pipe_and_nothing_with_quiet(
    family: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_doc(family, tmp_path / "run", max_steps=4)))
    piped = CliRunner().invoke(app, ["train", str(path), "--max-steps", "4"])
    assert piped.exit_code == 0, piped.output
    lines = [x for x in piped.stderr.splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == [f"step {i}/4" for i in range(1, 5)]
    assert all("steps/s  ETA " in x for x in lines) and lines[-1].endswith("ETA 0s")
    quiet = CliRunner().invoke(app, ["train", str(path), "--max-steps", "4", "--force", "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout == ""


def _state(step: int, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(max_steps=10, global_step=step, is_world_process_zero=main)


def test_progress_bar_on_a_terminal_and_only_on_the_main_process() -> None:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    bar = TrainProgress("bar", console=console)
    bar.on_train_begin(None, _state(0), None)
    for step in (1, 2, 3):
        bar.on_step_end(None, _state(step), None)
    bar.on_log(None, _state(3), None, logs={"loss": 0.6931})
    bar.close()
    shown = buf.getvalue()
    assert "3/10" in shown and "loss 0.6931" in shown and "steps/s" in shown and "ETA" in shown
    other = io.StringIO()
    rank1 = TrainProgress("bar", console=Console(file=other, force_terminal=True))
    rank1.on_train_begin(None, _state(0, main=False), None)
    rank1.on_step_end(None, _state(1, main=False), None)
    rank1.close()
    assert other.getvalue() == ""


def test_progress_line_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    import mergekit_rl.train.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    p = TrainProgress("lines")
    p.on_train_begin(None, _state(4), None)  # resumed at step 4: the clock starts there
    assert p.line(4, "loss 1") == "step 4/10: loss 1  - steps/s  ETA ?"
    now[0] = 104.0
    p.on_step_end(None, _state(6), None)  # 2 steps in 4 s: 0.5 steps/s, 4 left: 8 s
    assert p.line(6, "loss 1") == "step 6/10: loss 1  0.5 steps/s  ETA 8s"
    assert format_eta(3725) == "1h02m" and format_eta(185) == "3m05s"


# -- model cards ---------------------------------------------------------------------------------


def test_merge_and_adapter_cards_name_their_inputs(family: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    soup = runner.invoke(
        app, ["soup", str(family["sft1"]), str(family["sft2"]), "-o", str(tmp_path / "s")]
    )
    assert soup.exit_code == 0, soup.output
    meta = front_matter((tmp_path / "s" / "README.md").read_text())
    assert meta["base_model"] == [str(family["sft1"]), str(family["sft2"])]
    assert meta["base_model_relation"] == "merge" and "merge" in meta["tags"]
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    lora = runner.invoke(
        app,
        [
            "lora",
            "extract",
            str(family["base"]),
            str(family["sft1"]),
            "--rank",
            "2",
            "-o",
            str(tmp_path / "a"),
        ],
    )
    assert lora.exit_code == 0, lora.output
    meta = front_matter((tmp_path / "a" / "README.md").read_text())
    assert meta["base_model"] == str(family["base"]) and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and "merge" not in meta["tags"]


def test_use_vllm_reaches_the_grpo_config(family: dict[str, Path], tmp_path: Path) -> None:
    doc = recipe_doc(family, tmp_path / "run", num_generations=2, use_vllm=True)
    doc |= {"algorithm": "grpo", "reward": {"length": {"target": 4}}}
    doc["dataset"] = {"path": str(DATA / "prompts.jsonl")}
    args = trainer_config(parse(doc), None)
    assert type(args).__name__ == "GRPOConfig" and args.use_vllm is True
    doc["training"]["use_vllm"] = False
    assert trainer_config(parse(doc), None).use_vllm is False


def test_validate_checks_train_recipes_without_loading(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rlmerge validate` reads a train recipe with the train schema; paths are not resolved
    (a hub id that does not exist passes), recipe problems are listed with their YAML paths."""
    good = recipe_doc(family, tmp_path / "run")
    good["policy"] = "some-org/not-a-real-model"
    bad = recipe_doc(family, tmp_path / "run", trainer_args={"label_smothing": 0.1})
    bad["training"]["lr_scheduler"] = "cosin"
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok = CliRunner().invoke(app, ["validate", str(tmp_path / "good.yaml")])
    assert ok.exit_code == 0 and "(train recipe, dpo)" in ok.stdout, ok.output
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml"), "--json"])
    assert res.exit_code == 2
    problems = json.loads(res.stdout)["recipes"][0]["problems"]
    assert {p["path"] for p in problems} == {
        "training.trainer_args.label_smothing",
        "training.lr_scheduler",
    }


def test_implicit_prompt_preferences_are_split(tmp_path: Path) -> None:
    from mergekit_rl.train.data import load_train_dataset, split_implicit_prompt
    from mergekit_rl.train.recipe import DatasetSpec

    user = {"role": "user", "content": "Why merge?"}
    chat = split_implicit_prompt(
        [user, {"role": "assistant", "content": "To keep skills."}],
        [user, {"role": "assistant", "content": "Bananas."}],
    )
    assert chat == (
        [user],
        [{"role": "assistant", "content": "To keep skills."}],
        [{"role": "assistant", "content": "Bananas."}],
    )
    # text: the shared words, never half a word (both answers start with "s")
    assert split_implicit_prompt("Q: why? A: safe", "Q: why? A: silly") == (
        "Q: why? A: ",
        "safe",
        "silly",
    )
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [user, {"role": "assistant", "content": "b"}],
        },
        {
            "chosen": [{"role": "user", "content": "x"}],
            "rejected": [{"role": "user", "content": "y"}],
        },
    ]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    ds = load_train_dataset(DatasetSpec(path=str(path)), "dpo")
    assert ds[0]["prompt"] == [user] and ds[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match="no prompt column, and row 1 does not hold one"):
        load_train_dataset(DatasetSpec(path=str(path)), "dpo")


def test_card_license_only_when_the_inputs_agree(family: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(family["sft2"], other)
    (other / "README.md").write_text("---\nlicense: mit\n---\n")
    runner = CliRunner()
    res = runner.invoke(app, ["soup", str(family["sft1"]), str(other), "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    meta = front_matter((tmp_path / "s" / "README.md").read_text())
    assert "license" not in meta and meta["base_model"] == [str(family["sft1"]), str(other)]
