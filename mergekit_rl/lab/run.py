"""`rlmerge lab`: the three papers' trade-offs, in miniature, on a CPU.

    make data (lab/data.py)  ->  BPE tokenizer  ->  pretrain a tiny Llama on the corpus (base)
    -> SFT it with two seeds (sft-1 is every arm's policy and KL reference; soup(sft-1, sft-2)
       is the SALSA reference)
    -> preference pairs: completions of sft-1 ranked by the sentiment reward (DPO data)
    -> arms, each over the seeds, through `rlmerge train`'s runner (train/run.py):
       DPO (AdamW) at several beta, DPO + OnDARE, DPO + OnTIES, GRPO with KL at several beta,
       GRPO + Elastic Reset, GRPO with the SALSA soup as its reference
    -> the interpolation sweep sft-1 -> final of the plain arm with the most reward (ops)
    -> `rlmerge eval` of every model, `rlmerge plot`, report.md and results.json.

Pretraining and SFT use TRL's SFTTrainer (no training loop of our own).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__, ops
from ..engine import RunOptions
from ..errors import OutputExistsError, UsageError
from ..known_warnings import ignore_harmless_warnings
from . import data as labdata
from . import metrics
from .evaluate import EvalSettings, Scorer, evaluate, load_model, read_prompts, sample
from .plot import plot

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    """Sizes and steps; DEFAULT fits 20 minutes on 2 CPU cores, QUICK 3 minutes."""

    seeds: int = 3
    hidden: int = 64
    layers: int = 3
    vocab: int = 600  # enough merges that every template word is one token
    corpus: int = 3000
    heldout: int = 200
    sft: int = 1500
    prompts: int = 200
    eval_prompts: int = 40
    eval_samples: int = 2
    pref_samples: int = 4  # completions per prompt ranked into one (chosen, rejected) pair
    pretrain_steps: int = 400
    sft_steps: int = 150
    dpo_steps: int = 50
    grpo_steps: int = 32
    dpo_betas: tuple[float, ...] = (0.1, 0.5)
    grpo_betas: tuple[float, ...] = (0.02, 0.2)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    dpo_lr: float = 5e-4
    grpo_lr: float = 5e-4
    max_new_tokens: int = 16  # a completion is ~10 tokens: cut words would score 0


DEFAULT = Budget()
QUICK = replace(
    DEFAULT,
    seeds=1,
    corpus=1500,
    heldout=64,
    sft=600,
    prompts=64,
    eval_prompts=16,
    pretrain_steps=120,
    sft_steps=60,
    dpo_steps=10,
    grpo_steps=6,
    dpo_betas=(0.1,),
    grpo_betas=(0.02,),
    alphas=(0.5,),
)


@dataclass(frozen=True)
class Arm:
    name: str  # directory name
    method: str  # legend label: one colour per method
    algorithm: str
    param: float  # the swept value (beta)
    extra: dict[str, Any] = field(default_factory=dict)  # recipe keys on top of the plain ones


@dataclass
class LabResult:
    out: Path
    report: Path
    results: Path
    plots: list[Path]
    stages: list[dict[str, Any]]
    seconds: float


def run_lab(
    out: Path,
    seeds: int | None = None,
    quick: bool = False,
    force: bool = False,
    echo: Echo = print,
) -> LabResult:
    """Run the whole experiment into `out`; see the module docstring.

    On CPU it runs with one torch thread: the models are so small that threads only add
    synchronisation, and on a busy machine two spinning threads per process made a GRPO step
    30x slower (measured 7.1 s against 0.24 s per step, load average 8 on 2 cores).
    """
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        return _run_lab(out, seeds, quick, force, echo)
    finally:
        torch.set_num_threads(threads)


def _run_lab(out: Path, seeds: int | None, quick: bool, force: bool, echo: Echo) -> LabResult:
    t0 = time.time()
    budget = QUICK if quick else DEFAULT
    if seeds is not None:
        budget = replace(budget, seeds=seeds)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file; give a directory for the lab.")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"lab directory '{out}' is not empty; pass --force or another DIR.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.md", "results.json", "pareto_kl.png", "pareto_ppl.png"):
        (out / stale).unlink(missing_ok=True)  # a rerun never leaves an old report beside
    stages: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        s = time.time()
        echo(f"[lab] {name} ...")
        value = fn()
        stages.append({"stage": name, "seconds": round(time.time() - s, 1)})
        echo(f"[lab] {name}: {stages[-1]['seconds']}s")
        return value

    quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {k: getattr(budget, k) for k in ("corpus", "heldout", "sft", "prompts", "eval_prompts")}
    workers = 1 if device == "cuda" else max(1, min(2, os.cpu_count() or 1))
    with worker_pool(workers) as pool:
        for _ in range(workers if pool is not None else 0):
            pool.submit(int)  # start the workers now: they import while we pretrain
        return _stages(out, budget, device, workers, pool, sizes, stage, stages, echo, quick, t0)


def _stages(
    out: Path,
    budget: Budget,
    device: str,
    workers: int,
    pool: Any,
    sizes: dict[str, int],
    stage: Callable[[str, Callable[[], Any]], Any],
    stages: list[dict[str, Any]],
    echo: Echo,
    quick: bool,
    t0: float,
) -> LabResult:
    files = stage("data", lambda: labdata.make_data(out / "data", 0, sizes))
    models = out / "models"
    stage("pretrain", lambda: pretrain(files, models / "base", budget, device))
    sft_jobs = [(sft, (files, models / "base", models / f"sft-{s}", s, budget)) for s in (1, 2)]
    stage("sft seeds 1, 2", lambda: parallel(sft_jobs, pool))
    soup_opts = ops.WriteOptions(run=RunOptions(progress="none", force=True), command="rlmerge lab")
    stage(
        "soup",
        lambda: ops.soup(
            [models / "sft-1", models / "sft-2"], models / "sft-soup", None, soup_opts
        ),
    )
    prefs = stage(
        "preference pairs", lambda: preference_pairs(files, models / "sft-1", out, budget, device)
    )
    echo(f"[lab] {prefs['pairs']} preference pairs (mean reward gap {prefs['gap']:.3f})")

    arms = make_arms(budget, models)
    runs = [(a, seed) for a in arms for seed in range(budget.seeds)]
    jobs = [(train_arm, (a, seed, out, files, models, budget)) for a, seed in runs]
    done = stage(f"train {len(jobs)} runs on {workers} worker(s)", lambda: parallel(jobs, pool))
    finals = [(a, seed, final) for (a, seed), (final, _) in zip(runs, done, strict=True)]
    stages += [
        {"stage": f"  train {a.name} seed {seed}", "seconds": sec}
        for (a, seed), (_, sec) in zip(runs, done, strict=True)
    ]

    settings = EvalSettings(
        prompts=str(files["eval_prompts"]),
        reward={"sentiment": {"weight": 1.0}},
        reference=str(models / "sft-1"),
        heldout=str(files["heldout"]),
        samples=budget.eval_samples,
        max_new_tokens=budget.max_new_tokens,
        seed=0,
        batch_size=32,
        win_rate=True,
        device=device,
    )
    base_rows = [
        (models / "sft-1", {"method": "SFT (policy init, KL reference)", "arm": "sft-1"}),
        (models / "sft-2", {"method": "SFT seed 2", "arm": "sft-2"}),
        (models / "sft-soup", {"method": "SFT soup (SALSA reference)", "arm": "sft-soup"}),
    ]
    run_rows = [
        (p, {"method": a.method, "arm": a.name, "param": a.param, "sweep": "beta", "seed": s})
        for a, s, p in finals
    ]
    rows = stage("eval", lambda: eval_parallel(base_rows + run_rows, settings, pool, workers))

    best = best_plain_arm(rows, arms)
    interp = stage(
        f"interpolate sft-1 -> {best.name}",
        lambda: interpolate(best, finals, models, out, budget),
    )
    rows += stage("eval interpolations", lambda: eval_parallel(interp, settings, pool, workers))

    plots = [out / "pareto_kl.png", out / "pareto_ppl.png"]
    stage("plot", lambda: [plot(rows, plots[0], "kl"), plot(rows, plots[1], "ppl")])
    seconds = round(time.time() - t0, 1)
    results = {
        "schema_version": 1,
        "command": "lab",
        "ok": True,
        "quick": quick,
        "budget": asdict(budget),
        "eval_settings": asdict(settings),
        "interpolated_arm": best.name,
        "preference_pairs": prefs,
        "machine": machine(device) | {"workers": workers},
        "seconds": seconds,
        "stages": stages,
        "rows": rows,
        "summary": summarize(rows),
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_atomic(out / "report.md", report(results, arms, best))
    return LabResult(out, out / "report.md", out / "results.json", plots, stages, seconds)


def quiet_libraries() -> None:
    """No per-step progress bars from datasets / transformers (the lab prints its stages)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _worker_init() -> None:
    """A spawned worker starts with Python's default warning filters (the parent's are not
    inherited): it runs only lab jobs, so the known-harmless filters hold for its life."""
    torch.set_num_threads(1)
    quiet_libraries()
    ignore_harmless_warnings()


def _timed(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float]:
    t = time.time()
    value = fn(*args)
    return value, round(time.time() - t, 1)


def worker_pool(workers: int) -> Any:
    """A pool of `workers` processes (one torch thread each), started once for the whole run
    (each start imports torch and transformers again); None for one worker."""
    if workers <= 1:
        return contextlib.nullcontext(None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no forked torch / tokenizer state
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)


def parallel(jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]], pool: Any) -> list[Any]:
    """Run independent jobs (fn, args) on the pool, or here in order without one; results
    in job order, each as (value, seconds)."""
    if pool is None or len(jobs) == 1:
        return [_timed(fn, args) for fn, args in jobs]
    futures = [pool.submit(_timed, fn, args) for fn, args in jobs]
    return [f.result() for f in futures]


def eval_parallel(
    models: list[tuple[Path, dict[str, Any]]], s: EvalSettings, pool: Any, workers: int
) -> list[dict[str, Any]]:
    """eval_rows over `workers` contiguous chunks of the models, rows in model order."""
    size = -(-len(models) // max(workers, 1))
    chunks = [models[i : i + size] for i in range(0, len(models), size)]
    done = parallel([(eval_rows, (c, s)) for c in chunks], pool)
    return [row for rows, _ in done for row in rows]


# -- stages ----------------------------------------------------------------------------------


def trl_args(out_dir: Path, steps: int, lr: float, batch: int, seed: int, max_length: int) -> Any:
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        per_device_train_batch_size=batch,
        seed=seed,
        max_length=max_length,
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=False,
        **_checkpointing(SFTConfig),
    )


def _checkpointing(config_cls: type) -> dict[str, Any]:
    """TRL's default (checkpointing on) under transformers 5's name for it, so that the
    config does not warn that `gradient_checkpointing` is deprecated; nothing on versions
    without the new name."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return {"activation_checkpointing": True} if "activation_checkpointing" in fields else {}


def _fit(model: Any, tok: Any, rows: list[dict[str, str]], args: Any) -> None:
    import datasets
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()


def pretrain(files: dict[str, Path], dest: Path, b: Budget, device: str) -> None:
    """A tiny Llama from scratch, trained on the corpus (language modelling)."""
    from transformers import LlamaForCausalLM

    from ..tiny import build_tokenizer, tiny_config

    tok = build_tokenizer(b.vocab, labdata.tokenizer_corpus())
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tok), b.hidden, b.layers))
    lines = files["corpus"].read_text().splitlines()
    args = trl_args(dest.parent / "_pretrain", b.pretrain_steps, 3e-3, 32, 0, 48)
    _fit(model, tok, [{"text": t} for t in lines], args)
    _save(model, tok, dest)


def sft(files: dict[str, Path], base: Path, dest: Path, seed: int, b: Budget) -> None:
    """Supervised fine-tuning on (prompt, completion) pairs: loss on the completion only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [json.loads(ln) for ln in files["sft"].read_text().splitlines()]
    args = trl_args(dest.parent / f"_sft{seed}", b.sft_steps, 1e-3, 32, seed, 48)
    _fit(model, tok, rows, args)
    _save(model, tok, dest)


def _save(model: Any, tok: Any, dest: Path) -> None:
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    (dest / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# rlmerge lab model\n")


def preference_pairs(
    files: dict[str, Path], policy: Path, out: Path, b: Budget, device: str
) -> dict[str, Any]:
    """Sample `pref_samples` completions per train prompt from the SFT model; the best and
    worst under the sentiment reward become (chosen, rejected) when they differ."""
    s = EvalSettings(
        prompts=str(files["prompts"]),
        reward={"sentiment": {}},
        samples=b.pref_samples,
        max_new_tokens=b.max_new_tokens,
        seed=1,
        batch_size=64,
        device=device,
    )
    data = read_prompts(s.prompts, "prompts file")
    prompts = data.prompts
    tok, model = load_model(str(policy), device)
    got = sample(model, tok, prompts, s)
    rewards = Scorer(s.reward, device, False).samples(got, data, tok)
    pairs, gaps = [], []
    k = b.pref_samples
    for i, prompt in enumerate(prompts):
        group = list(zip(rewards[i * k : (i + 1) * k], got.texts[i * k : (i + 1) * k], strict=True))
        hi, lo = max(group), min(group)
        if hi[0] > lo[0]:
            pairs.append({"prompt": prompt, "chosen": hi[1], "rejected": lo[1]})
            gaps.append(hi[0] - lo[0])
    path = out / "data" / "prefs.jsonl"
    labdata.write_jsonl(path, pairs)
    return {"pairs": len(pairs), "gap": statistics.mean(gaps) if gaps else 0.0, "path": str(path)}


def make_arms(b: Budget, models: Path) -> list[Arm]:
    base = str(models / "base")
    merging = {"reserve_p": 0.1, "alpha": 1e-5}  # see docs/lab.md for why not 0.01 / 1e-7
    beta_d, beta_g = b.dpo_betas[0], b.grpo_betas[0]
    arms = [Arm(f"dpo-b{x:g}", "DPO (AdamW)", "dpo", x) for x in b.dpo_betas]
    arms += [
        Arm("dpo-ondare", "DPO + OnDARE", "dpo", beta_d,
            {"base": base, "optimizer": {"name": "ondare", **merging}}),
        Arm("dpo-onties", "DPO + OnTIES", "dpo", beta_d,
            {"base": base, "optimizer": {"name": "onties", **merging}}),
    ]  # fmt: skip
    arms += [Arm(f"grpo-b{x:g}", "GRPO + KL", "grpo", x) for x in b.grpo_betas]
    reset_every = max(2, b.grpo_steps // 3)
    arms += [
        Arm("grpo-elastic", "GRPO + Elastic Reset", "grpo", beta_g,
            {"elastic_reset": {"ema_decay": 0.9, "reset_every": reset_every}}),
        Arm("grpo-salsa", "GRPO + SALSA soup ref", "grpo", beta_g,
            {"reference": {"soup": [str(models / "sft-1"), str(models / "sft-2")]}}),
    ]  # fmt: skip
    return arms


def recipe_for(
    arm: Arm, seed: int, out: Path, files: dict[str, Path], models: Path, b: Budget
) -> dict[str, Any]:
    training: dict[str, Any] = {
        "output_dir": str(out / "runs" / f"{arm.name}-s{seed}"),
        "lr_scheduler": "constant",
        "batch_size": 8,
        "beta": arm.param,
        "seed": seed,
        "logging_steps": 5,
        "save_steps": None,
    }
    doc: dict[str, Any] = {"algorithm": arm.algorithm, "policy": str(models / "sft-1")}
    if arm.algorithm == "dpo":
        doc["dataset"] = {"path": str(out / "data" / "prefs.jsonl")}
        training |= {"learning_rate": b.dpo_lr, "max_steps": b.dpo_steps, "max_length": 48}
    else:
        doc["dataset"] = {"path": str(files["prompts"])}
        doc["reward"] = {"sentiment": {"weight": 1.0}}
        training |= {
            "learning_rate": b.grpo_lr,
            "max_steps": b.grpo_steps,
            "num_generations": 4,
            "max_completion_length": b.max_new_tokens,
        }
    doc |= arm.extra
    doc["training"] = training
    if "optimizer" in doc:  # the optimizer's learning rate is training.learning_rate
        doc["optimizer"] = dict(doc["optimizer"])
    return doc


def train_arm(
    arm: Arm, seed: int, out: Path, files: dict[str, Path], models: Path, b: Budget
) -> Path:
    """One `rlmerge train` run (the same runner, recipe checks included); its final model."""
    from ..train.recipe import parse_train_recipe
    from ..train.run import TrainOptions, train

    doc = recipe_for(arm, seed, out, files, models, b)
    text = yaml.safe_dump(doc, sort_keys=False)
    path = out / "recipes" / f"{arm.name}-s{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    recipe = parse_train_recipe(text, str(path))
    (out / "runs").mkdir(exist_ok=True)
    log = (out / "runs" / f"{arm.name}-s{seed}.log").open("w")
    try:
        opts = TrainOptions(
            force=True, command=f"rlmerge train {path}", echo=lambda m: print(m, file=log)
        )
        return train(recipe, text, opts).final
    finally:
        log.close()


def eval_rows(models: list[tuple[Path, dict[str, Any]]], s: EvalSettings) -> list[dict[str, Any]]:
    labels = [m.get("arm", "") + (f"-s{m['seed']}" if "seed" in m else "") for _, m in models]
    rows = evaluate([str(p) for p, _ in models], s, labels)
    return [{**meta, **row} for (_, meta), row in zip(models, rows, strict=True)]


def best_plain_arm(rows: list[dict[str, Any]], arms: list[Arm]) -> Arm:
    """The plain arm (DPO AdamW or GRPO + KL) with the highest mean reward over seeds."""
    plain = [a for a in arms if a.method in ("DPO (AdamW)", "GRPO + KL")]

    def reward(a: Arm) -> float:
        return statistics.mean(r["reward"] for r in rows if r.get("arm") == a.name)

    return max(plain, key=reward)


def interpolate(
    arm: Arm, finals: list[tuple[Arm, int, Path]], models: Path, out: Path, b: Budget
) -> list[tuple[Path, dict[str, Any]]]:
    """theta(alpha) = (1 - alpha) sft-1 + alpha final, per seed (`rlmerge interpolate`)."""
    got = []
    for a, seed, final in finals:
        if a.name != arm.name:
            continue
        dest = out / "interp" / f"{arm.name}-s{seed}"
        opts = ops.WriteOptions(
            run=RunOptions(progress="none", force=True),
            command=f"rlmerge interpolate {models / 'sft-1'} {final} -o {dest} --alpha "
            + ",".join(f"{x:g}" for x in b.alphas),
        )
        ops.interpolate(models / "sft-1", final, dest, list(b.alphas), "lerp", opts)
        for alpha in b.alphas:
            path = dest / ops.alpha_dirname(alpha) if len(b.alphas) > 1 else dest
            meta = {
                "method": f"interpolation sft-1 -> {arm.name}",
                "arm": f"interp-{arm.name}-a{alpha:g}",
                "param": alpha,
                "sweep": "alpha",
                "seed": seed,
            }
            got.append((path, meta))
    return got


# -- results ---------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, param): mean and std over seeds of reward, kl, ppl, win rate."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("param")), []).append(r)
    out = []
    for (method, param), rs in groups.items():
        entry: dict[str, Any] = {"method": method, "param": param, "seeds": len(rs)}
        for key in ("reward", "kl", "ppl", "win_rate"):
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            entry[key] = statistics.mean(vals) if vals else None
            entry[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        # the standard error of a run's mean reward over its samples (the noise of one seed)
        ses = [float(r["reward_se"]) for r in rs if r.get("reward_se") is not None]
        entry["reward_se"] = statistics.mean(ses) if ses else 0.0
        out.append(entry)
    return out


def machine(device: str) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rlmerge": __version__,
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(entry: dict[str, Any], key: str, digits: int = 3) -> str:
    v = entry.get(key)
    if v is None:
        return "-"
    std = entry.get(key + "_std") or 0.0
    return f"{v:.{digits}f} ± {std:.{digits}f}" if entry["seeds"] > 1 else f"{v:.{digits}f}"


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| method | beta / alpha | seeds | reward | KL per token | held-out ppl | win rate vs SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        param = "-" if e["param"] is None else f"{e['param']:g}"
        lines.append(
            f"| {e['method']} | {param} | {e['seeds']} | {_fmt(e, 'reward')} | "
            f"{_fmt(e, 'kl', 4)} | {_fmt(e, 'ppl', 2)} | {_fmt(e, 'win_rate', 2)} |"
        )
    return "\n".join(lines)


def noise(m: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    """How large a difference of `key` must be to count: the seed spread of the difference,
    sqrt(std_m^2 + std_base^2), with several seeds; with one seed the reward's standard error
    over samples, sqrt(se_m^2 + se_base^2), and None (unknown) for the other measures."""
    if m["seeds"] > 1 and base["seeds"] > 1:
        return (m[key + "_std"] ** 2 + base[key + "_std"] ** 2) ** 0.5
    if key == "reward":
        return (m["reward_se"] ** 2 + base["reward_se"] ** 2) ** 0.5
    return None


def direction(diff: float, limit: float | None) -> int:
    """+1 / -1 for a difference larger than its noise, 0 otherwise (or when it is unknown)."""
    if limit is None or abs(diff) <= limit:
        return 0
    return 1 if diff > 0 else -1


VERDICTS = {  # (reward, KL) directions -> words; a verdict never goes beyond the numbers
    (0, 0): "no measurable difference",
    (1, 0): "more reward, no measurable difference in KL",
    (1, -1): "more reward and less KL",
    (1, 1): "more reward but also more KL: a different point on the trade-off",
    (0, -1): "less KL, no measurable difference in reward",
    (0, 1): "more KL, no measurable difference in reward",
    (-1, -1): "less reward but also less KL: a different point on the trade-off",
    (-1, 0): "less reward, no measurable difference in KL",
    (-1, 1): "less reward and more KL",
}


def verdict(m: dict[str, Any], base: dict[str, Any], quick: bool) -> str:
    """The comparison in words: a difference counts only when it exceeds its noise."""
    if quick:
        return "not measurable: --quick checks the plumbing (one seed, a few steps)"
    nr, nk = noise(m, base, "reward"), noise(m, base, "kl")
    words = VERDICTS[
        (direction(m["reward"] - base["reward"], nr), direction(m["kl"] - base["kl"], nk))
    ]
    bounds = f"reward noise {nr:.3f}" + (
        f", KL noise {nk:.4f}" if nk is not None else ", KL noise unknown with one seed"
    )
    return f"{words} ({bounds})"


def comparisons(summary: list[dict[str, Any]], b: Budget, quick: bool = False) -> list[str]:
    """Each method against its baseline at the same beta, in words computed from the numbers."""
    by = {(e["method"], e["param"]): e for e in summary}
    pairs = [
        ("DPO + OnDARE", "DPO (AdamW)", b.dpo_betas[0], "Online Merging Optimizers"),
        ("DPO + OnTIES", "DPO (AdamW)", b.dpo_betas[0], "Online Merging Optimizers"),
        ("GRPO + Elastic Reset", "GRPO + KL", b.grpo_betas[0], "Elastic Reset"),
        ("GRPO + SALSA soup ref", "GRPO + KL", b.grpo_betas[0], "SALSA"),
    ]
    lines = []
    for method, baseline, beta, paper in pairs:
        m, base = by.get((method, beta)), by.get((baseline, beta))
        if not m or not base:
            continue
        dr, dk = m["reward"] - base["reward"], m["kl"] - base["kl"]
        dp = m["ppl"] - base["ppl"]
        lines.append(
            f"- **{method}** vs {baseline} at beta {beta:g} ({paper}): reward {dr:+.3f}, "
            f"KL {dk:+.4f}, held-out perplexity {dp:+.2f}; {verdict(m, base, quick)}."
        )
    return lines


def report(results: dict[str, Any], arms: list[Arm], best: Arm) -> str:
    b = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["budget"].items()})
    summary = results["summary"]
    front_kl = [
        summary[i]
        for i in metrics.pareto_front(
            [(e["kl"] if e["kl"] is not None else float("nan"), e["reward"]) for e in summary]
        )
    ]
    stage_lines = [f"| {s['stage']} | {s['seconds']} |" for s in results["stages"]]
    m = results["machine"]
    examples = [
        f"- {r['label']}: " + " / ".join(f"`{x}`" for x in r["examples"][:2])
        for r in results["rows"]
        if r.get("seed", 0) == 0
    ]
    parts = [
        "# rlmerge lab report",
        "",
        f"Run {'with --quick' if results['quick'] else 'with the default budget'}: "
        f"{b.seeds} seed(s), {results['seconds'] / 60:.1f} minutes on {m['device']} "
        f"({m['cpu_count']} cores visible, {m['torch_threads']} torch threads; rlmerge "
        f"{m['rlmerge']}, torch {m['torch']}).",
        "",
        "## What was run",
        "",
        f"- Data made from templates (nothing downloaded): {b.corpus} corpus lines (plain "
        f"sentences and mixed-sentiment reviews), {b.sft} SFT examples (review opening -> "
        f"continuation, positive and negative words at even odds), {b.prompts} train prompts; "
        f"held out, never trained on: {b.eval_prompts} distinct eval prompts and {b.heldout} "
        "lines of the corpus's grammar, built on review openings (subject, verb) and sentence "
        "openings (thing, action) that no corpus line, SFT example or train prompt uses.",
        f"- A Llama with {b.layers} layers, hidden size {b.hidden}, a {b.vocab}-token BPE "
        f"vocabulary, pretrained {b.pretrain_steps} steps on the corpus, then SFT'd "
        f"{b.sft_steps} steps with seeds 1 and 2 (sft-1, sft-2); their uniform soup is the "
        "SALSA reference.",
        f"- Task: continue a review positively; reward: VADER compound sentiment in [-1, 1]. "
        f"DPO pairs: {results['preference_pairs']['pairs']} prompts' best and worst of "
        f"{b.pref_samples} sft-1 samples (mean reward gap "
        f"{results['preference_pairs']['gap']:.3f}).",
        f"- Arms (policy sft-1; {b.seeds} training seed(s) each; recipes in `recipes/`): "
        + "; ".join(f"{a.name} ({a.method}, beta {a.param:g})" for a in arms)
        + f". DPO {b.dpo_steps} steps at lr {b.dpo_lr:g}, GRPO {b.grpo_steps} steps at lr "
        f"{b.grpo_lr:g}, batch 8 (GRPO: 4 completions per prompt).",
        f"- Interpolation sweep sft-1 -> {best.name} (the plain arm with the most reward), "
        f"alpha {', '.join(f'{x:g}' for x in b.alphas)}, per seed.",
        f"- Evaluation (`rlmerge eval`): {b.eval_prompts} held-out prompts x {b.eval_samples} "
        f"samples (temperature 1, seed 0, {b.max_new_tokens} new tokens); KL per token to "
        "sft-1 on each model's own samples (at temperature 1 without top-k: the models' own "
        "distributions); perplexity on the held-out text; win rate against "
        "sft-1's samples.",
        "",
        "## Results",
        "",
        "Mean ± std over seeds (a single run shows its value only).",
        "",
        table(summary),
        "",
        "![reward against KL](pareto_kl.png)",
        "",
        "![reward against perplexity](pareto_ppl.png)",
        "",
        "## Against the papers' claims",
        "",
        "A difference counts when it is larger than its noise: the seed spread of the "
        "difference (sqrt of the sum of the two variances over seeds), or with one seed the "
        "reward's standard error over samples; otherwise it reads no measurable difference.",
        "",
        *comparisons(summary, b, results["quick"]),
        "",
        "Pareto front (reward against KL): "
        + ", ".join(
            f"{e['method']}" + (f" ({e['param']:g})" if e["param"] is not None else "")
            for e in front_kl
        )
        + ".",
        "",
        "## Example completions (seed 0)",
        "",
        *examples,
        "",
        "## Time per stage (seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *stage_lines,
        "",
    ]
    return "\n".join(parts)
