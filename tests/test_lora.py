"""`rlmerge lora extract`: truncated SVD per matrix, saved as an adapter that peft loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit_rl.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_rl.errors import OutputExistsError, UsageError
from mergekit_rl.io.reader import open_checkpoint
from mergekit_rl.lora import extract_lora, low_rank
from tests.cli.envelope import check
from tests.conftest import load_state

peft = pytest.importorskip("peft")


def test_low_rank_is_the_eckart_young_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(24, 40, generator=g)
    up, down, kept = low_rank(m, 5)
    assert up.shape == (24, 5) and down.shape == (5, 40)
    # the error of the best rank-5 approximation is the norm of the dropped singular values
    s = torch.linalg.svdvals(m)
    err = torch.linalg.matrix_norm(m - up @ down)
    torch.testing.assert_close(err, s[5:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)
    assert kept == pytest.approx(float(s[:5].square().sum() / s.square().sum()), rel=1e-5)
    # an exactly rank-3 matrix comes back exactly, and a rank above min(out, in) is zero-padded
    low = torch.randn(24, 3, generator=g) @ torch.randn(3, 40, generator=g)
    up, down, kept = low_rank(low, 3)
    torch.testing.assert_close(up @ down, low, atol=1e-4, rtol=1e-4)
    up, down, _ = low_rank(torch.randn(4, 6, generator=g), 8)
    assert up.shape == (4, 8) and down.shape == (8, 6) and not down[4:].any()


def test_extract_recovers_a_lora_and_peft_loads_it(family: dict[str, Path], tmp_path: Path):
    """A rank-4 adapter merged into base, extracted at rank 4, is the same dense update."""
    from transformers import AutoModelForCausalLM

    from tests.io.test_adapter import make_adapter

    merged = make_adapter(family["base"], tmp_path / "lora", ["q_proj", "up_proj"], seed=6)
    # the fine-tuned model: base+adapter written out by a soup of itself (the streamed merge)
    from mergekit_rl import ops
    from mergekit_rl.engine import RunOptions

    quiet = ops.WriteOptions(run=RunOptions(progress="none"))
    ops.soup([f"{family['base']}+{tmp_path / 'lora'}"] * 2, tmp_path / "ft", opts=quiet)
    summary = extract_lora(family["base"], tmp_path / "ft", tmp_path / "out", rank=4)
    assert summary.modules == 4 and summary.dropped == []  # q_proj, up_proj in 2 layers
    assert summary.kept == pytest.approx(1.0, abs=1e-6)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    meta_card = (tmp_path / "out" / "README.md").read_text()
    assert "Rank-4 LoRA" in meta_card

    base_model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base_model, tmp_path / "out").merge_and_unload()
    got = loaded.state_dict()
    for k, v in load_state(tmp_path / "ft").items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(got[k], merged[k], atol=1e-5, rtol=1e-5)
    # and rlmerge reads it back as BASE+ADAPTER
    with open_checkpoint(f"{family['base']}+{tmp_path / 'out'}") as ckpt:
        name = "model.layers.1.self_attn.q_proj.weight"
        torch.testing.assert_close(ckpt.read(name), merged[name], atol=1e-5, rtol=1e-5)


def test_cli_extract_low_rank_of_a_full_finetune(family: dict[str, Path], tmp_path: Path):
    """sft1 - base is full rank: rank 2 keeps part of it; norms' changes are reported."""
    out = tmp_path / "adapter"
    args = ["lora", "extract", str(family["base"]), str(family["sft1"]), "-r", "2", "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    report = check(res.stdout, "lora extract")  # the documented --json envelope
    assert report["outputs"] == [str(out)] and 0.0 < report["energy_kept"] < 1.0
    assert "model.norm.weight" in report["dropped"]  # the tiny family perturbs every tensor
    factors = load_file(out / "adapter_model.safetensors")
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    name = "model.layers.0.mlp.down_proj"
    b = factors[f"base_model.model.{name}.lora_B.weight"]
    a = factors[f"base_model.model.{name}.lora_A.weight"]
    tau = sft[f"{name}.weight"] - base[f"{name}.weight"]
    u, s, vh = torch.linalg.svd(tau)  # the naive reference: full SVD, keep 2
    torch.testing.assert_close(b @ a, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)
    # no overwrite without --force; exit 2
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(app, [*args, "--force", "-q"])
    assert res.exit_code == 0, res.output


def test_extract_refusals(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="task vector is zero"):
        extract_lora(family["base"], family["base"], tmp_path / "a", rank=2)
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputExistsError):
        extract_lora(family["base"], family["sft1"], family["sft1"] / "lora", rank=2)
    res = CliRunner().invoke(
        app, ["lora", "extract", str(family["base"]), str(family["sft1"]), "-o", "x", "-r", "0"]
    )
    assert res.exit_code == 2


def test_gpt2_conv1d_adapter_loads_in_peft_and_gives_the_finetune(tmp_path: Path) -> None:
    """GPT-2 stores its linear layers as Conv1D, W [in, out]: the factors must be peft's
    B [out, r] @ A [r, in] with fan_in_fan_out, and wte / wpe are embeddings, not targets."""
    from transformers import AutoModelForCausalLM

    from tests.arch_models import build_model, finetune

    base = build_model(tmp_path / "base", "gpt2", tie=True, seed=0)
    ft = finetune(base, tmp_path / "ft", seed=1, scale=0.05)
    # rank 96 >= every matrix's smaller side (32): the factors carry each task vector exactly
    summary = extract_lora(base, ft, tmp_path / "out", rank=96)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    modules = {m.rsplit(".", 1)[-1] for m in config["target_modules"]}
    assert modules == {"c_attn", "c_proj", "c_fc"}, config["target_modules"]
    assert summary.modules == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(summary.dropped)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "out").merge_and_unload()
    got, want, was = merged.state_dict(), load_state(ft), load_state(base)
    for name in want:
        # the adapted matrices are the fine-tune's; everything else stays the base's
        adapted = name.endswith(".weight") and name.rsplit(".", 2)[-2] in modules
        expect = want[name] if adapted else was[name]
        torch.testing.assert_close(got[name], expect, atol=2e-5, rtol=1e-4, msg=name)
    name = "transformer.h.1.attn.c_attn.weight"
    assert (want[name] - was[name]).abs().max() > 1e-3  # the check above is not vacuous
    # and rlmerge reads BASE+ADAPTER as peft merges it
    with open_checkpoint(f"{base}+{tmp_path / 'out'}") as ckpt:
        torch.testing.assert_close(ckpt.read(name), got[name], atol=2e-5, rtol=1e-4)


def test_force_replaces_a_symlink_atomically_under_the_lock(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """--force over a symbolic link replaces the link (its target is left alone), and a writer
    holding the output's lock makes a second one refuse before touching anything."""
    from mergekit_rl.io.writer import OutputLock

    target = tmp_path / "old-adapter"
    extract_lora(family["base"], family["sft1"], target, rank=1)
    before = (target / "adapter_model.safetensors").read_bytes()
    link = tmp_path / "adapter"
    link.symlink_to(target)
    lock = OutputLock(link.absolute())
    lock.acquire()
    try:
        with pytest.raises(OutputExistsError, match="being written by another"):
            extract_lora(family["base"], family["sft1"], link, rank=2, force=True)
        assert link.is_symlink()
    finally:
        lock.release()
    extract_lora(family["base"], family["sft1"], link, rank=2, force=True)
    assert link.is_dir() and not link.is_symlink()
    assert json.loads((link / "adapter_config.json").read_text())["r"] == 2
    assert (target / "adapter_model.safetensors").read_bytes() == before  # target untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "old-adapter"]  # no temps


def test_gpt2_checkpoint_without_the_base_prefix(tmp_path: Path) -> None:
    """The original GPT-2 files name `h.0.attn.c_attn.weight` (no `transformer.`): the adapter
    names peft's module `transformer.h.0.attn.c_attn`, and rlmerge maps it back."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests.arch_models import build_model, finetune

    base = build_model(tmp_path / "base", "gpt2", tie=True, seed=0)
    ft = finetune(base, tmp_path / "ft", seed=2, scale=0.05)
    for path in (base, ft):
        state = {k.removeprefix("transformer."): v for k, v in load_state(path).items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    extract_lora(base, ft, tmp_path / "out", rank=96)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert all(m.startswith("transformer.h.") for m in config["target_modules"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "out").merge_and_unload()
    want = load_state(ft)["h.1.mlp.c_fc.weight"]
    got = merged.state_dict()["transformer.h.1.mlp.c_fc.weight"]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with open_checkpoint(f"{base}+{tmp_path / 'out'}") as ckpt:
        torch.testing.assert_close(ckpt.read("h.1.mlp.c_fc.weight"), want, atol=2e-5, rtol=1e-4)
