"""`rlmerge demo`: build a family of tiny checkpoints and run every weight operation on it."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import analysis, ops
from .engine import RunOptions
from .tiny import CORPUS, build_family

Echo = Callable[[str], None]
# written last into a demo directory: a directory holding it is a complete demo made by us
DONE_MARKER = ".rlmerge-demo-complete"
MODELS = ("base", "sft1", "sft2", "rlhf")


def demo_paths(root: Path) -> dict[str, Path]:
    return {**{k: root / "models" / k for k in MODELS}, "outputs": root / "outputs"}


def is_complete_demo(root: Path) -> bool:
    """A demo directory this command finished (the marker, and every model still there)."""
    return (root / DONE_MARKER).is_file() and all(
        (p / "config.json").is_file() for k, p in demo_paths(root).items() if k != "outputs"
    )


def run_demo(root: Path, echo: Echo = print, force: bool = False) -> dict[str, Path]:
    """Build base/sft1/sft2/rlhf under root, then soup, interpolate, task vectors, inspect, diff.

    A directory that already holds a complete demo (made by this function) is reused as it is,
    so that `rlmerge demo demo` can start any guide; `force` rebuilds it. Any other non-empty
    directory is refused.
    """
    t0 = time.time()
    root = Path(root)
    if not force and is_complete_demo(root):
        echo(f"reusing the complete demo in {root} (--force rebuilds it)")
        return demo_paths(root)
    if root.exists() and any(root.iterdir()) and not force:
        raise ops.UsageError(
            f"demo directory '{root}' is not empty and holds no complete demo; pass --force "
            "or another DIR."
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / DONE_MARKER).unlink(missing_ok=True)
    echo(f"building tiny Llama checkpoints and an offline BPE tokenizer in {root}")
    fam = build_family(root / "models")
    out = root / "outputs"
    base_opts = ops.WriteOptions(run=RunOptions(progress="none", force=force))

    def run(cmd: str, fn: Callable[[ops.WriteOptions], object]) -> None:
        echo(f"$ {cmd}")
        fn(replace(base_opts, command=cmd))

    m = {k: str(v) for k, v in fam.items()}
    run(
        f"rlmerge soup {m['sft1']} {m['sft2']} -o {out}/salsa_ref",
        lambda o: ops.soup([m["sft1"], m["sft2"]], out / "salsa_ref", None, o),
    )
    run(
        f"rlmerge interpolate {m['sft1']} {m['rlhf']} -o {out}/sweep --alpha 0,0.5,1",
        lambda o: ops.interpolate(m["sft1"], m["rlhf"], out / "sweep", [0, 0.5, 1], "lerp", o),
    )
    run(
        f"rlmerge interpolate {m['sft1']} {m['rlhf']} -o {out}/slerp --alpha 0.5 --method slerp",
        lambda o: ops.interpolate(m["sft1"], m["rlhf"], out / "slerp", [0.5], "slerp", o),
    )
    tau = out / "tau_rlhf.safetensors"
    run(
        f"rlmerge task-vector extract {m['sft1']} {m['rlhf']} -o {tau}",
        lambda o: ops.extract_task_vector(m["sft1"], m["rlhf"], tau, o),
    )
    echo(
        "# on purpose: the RLHF task vector (extracted against sft1) is applied to sft2, so "
        "rlmerge warns that the bases differ"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(
            f"rlmerge task-vector apply {m['sft2']} {tau} -o {out}/sft2_plus_rl --scale 1.0",
            lambda o: ops.apply_task_vectors(m["sft2"], [tau], out / "sft2_plus_rl", [1.0], o),
        )
    for w in caught:
        echo(f"  warning (expected here): {w.message}")

    echo(f"$ rlmerge inspect {out}/salsa_ref")
    info = analysis.inspect_model(out / "salsa_ref")
    echo(f"  {info['architecture']}: {info['parameters']:,} parameters, {info['dtypes']}")
    echo(f"$ rlmerge diff {m['sft1']} {m['sft2']} --base {m['base']}")
    d = analysis.diff_models(m["sft1"], m["sft2"], m["base"])
    for row in d["layers"]:
        echo(
            f"  {row['group']:>8}: task-vector cosine {row['tv_cosine']:+.3f}, "
            f"sign conflicts {row['sign_conflict']:.1%}"
        )

    echo("loading outputs with transformers.AutoModelForCausalLM and comparing logits")
    _check_outputs(fam, out, echo)
    (root / DONE_MARKER).write_text("rlmerge demo finished here; `rlmerge demo` reuses it\n")
    echo(f"demo finished in {time.time() - t0:.1f}s; everything is under {root}")
    return {**fam, "outputs": out}


@torch.no_grad()
def _check_outputs(fam: dict[str, Path], out: Path, echo: Echo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "salsa_ref")
    ids = tok("the policy model learns", return_tensors="pt").input_ids

    def logits(path: Path) -> torch.Tensor:
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits

    for name, path in [
        ("soup", out / "salsa_ref"),
        ("alpha=0.5", out / "sweep" / "alpha-0.5"),
        ("alpha=1 vs rlhf", out / "sweep" / "alpha-1"),
    ]:
        lg = logits(path)
        echo(f"  {name}: logits {tuple(lg.shape)}, finite={bool(torch.isfinite(lg).all())}")
    gap = (logits(out / "sweep" / "alpha-1") - logits(fam["rlhf"])).abs().max().item()
    echo(f"  alpha=1 reproduces the RLHF model: max |logit difference| = {gap:.2e}")
    model = AutoModelForCausalLM.from_pretrained(out / "salsa_ref").eval()
    gen = model.generate(
        ids,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=_non_text_tokens(tok),
    )
    text = tok.decode(gen[0], skip_special_tokens=True)
    echo(f"  the soup generates (random weights, so random letters): {text!r}")


def _non_text_tokens(tok) -> list[int]:  # noqa: ANN001 - a transformers tokenizer
    """Token ids outside the demo corpus's alphabet. The demo tokenizer is byte-level with no
    merges (259 ids): a random model picks bytes 0x80-0xff that are halves of UTF-8
    characters and decode to U+FFFD, so generation is limited to the letters and spaces the
    corpus uses."""
    alphabet = set("".join(CORPUS))
    pattern = re.compile(f"[{re.escape(''.join(sorted(alphabet)))}]+")
    return [i for i in range(len(tok)) if not pattern.fullmatch(tok.decode([i]))]
