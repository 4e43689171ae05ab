"""BASE+ADAPTER inputs against peft's own merge_and_unload(), on tiny models built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergekit_rl import ops
from mergekit_rl.engine import RunOptions
from mergekit_rl.errors import InputNotFoundError, MismatchError, UsageError
from mergekit_rl.io.reader import open_checkpoint
from tests.conftest import assert_states_close, load_state

peft = pytest.importorskip("peft")

QUIET = ops.WriteOptions(run=RunOptions(progress="none"), command="rlmerge test")


def make_adapter(
    base: Path, out: Path, targets: list[str], seed: int = 0, **config: object
) -> dict[str, torch.Tensor]:
    """Save a random (nonzero B) LoRA adapter of `base` to `out`; return peft's merged state."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **config
    )
    wrapped = peft.get_peft_model(model, cfg)
    wrapped.save_pretrained(out)
    merged = wrapped.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_all(ref: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(ref) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def test_adapter_equals_peft_merge_and_unload(family: dict[str, Path], tmp_path: Path) -> None:
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
    want = make_adapter(family["base"], tmp_path / "lora", targets, use_rslora=True)
    got = read_all(f"{family['base']}+{tmp_path / 'lora'}")
    base = load_state(family["base"])
    assert_states_close(got, {k: want[k] for k in got}, atol=1e-5)
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.0.self_attn.k_proj.weight" not in changed  # not a target


def test_alpha_pattern_and_fan_in_fan_out_config(family: dict[str, Path], tmp_path: Path) -> None:
    want = make_adapter(
        family["base"],
        tmp_path / "lora",
        ["q_proj", "o_proj"],
        seed=3,
        alpha_pattern={"o_proj": 32},
        rank_pattern={"q_proj": 2},
    )
    got = read_all(f"{family['base']}+{tmp_path / 'lora'}")
    assert_states_close(got, {k: want[k] for k in got}, atol=1e-5)


def test_adapter_on_tied_embeddings(tied_family: dict[str, Path], tmp_path: Path) -> None:
    """A tied model stores only the embedding; an lm_head update lands on it, as in peft."""
    from transformers import AutoModelForCausalLM

    base = tied_family["base"]
    # peft in float32 on a float32 copy; our reader merges in float32 and casts back to bf16
    want = make_adapter(base, tmp_path / "lora", ["lm_head", "q_proj"], seed=5)
    with open_checkpoint(f"{base}+{tmp_path / 'lora'}") as ckpt:
        assert ckpt.tied_embeddings and "lm_head.weight" not in ckpt.names()
        emb = ckpt.read("model.embed_tokens.weight")
        assert emb.dtype == torch.bfloat16
        torch.testing.assert_close(emb, want["lm_head.weight"].to(torch.bfloat16))
        torch.testing.assert_close(ckpt.read("lm_head.weight"), emb)
    # a soup of (base+adapter) with itself writes a tied model that transformers loads
    ops.soup([f"{base}+{tmp_path / 'lora'}"] * 2, tmp_path / "soup", opts=QUIET)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "soup", dtype=torch.float32)
    torch.testing.assert_close(
        model.get_input_embeddings().weight, want["lm_head.weight"].to(torch.bfloat16).float()
    )


def test_every_command_takes_an_adapter(family: dict[str, Path], tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    merged = make_adapter(family["sft1"], lora, ["q_proj", "gate_proj"], seed=1)
    ref = f"{family['sft1']}+{lora}"
    sft2, base = load_state(family["sft2"]), load_state(family["base"])
    merged = {k: merged[k] for k in sft2}

    ops.soup([ref, family["sft2"]], tmp_path / "soup", opts=QUIET)
    assert_states_close(
        load_state(tmp_path / "soup"), {k: (merged[k] + sft2[k]) / 2 for k in sft2}, atol=1e-5
    )
    ops.interpolate(family["sft2"], ref, tmp_path / "mid", [0.25], "lerp", QUIET)
    assert_states_close(
        load_state(tmp_path / "mid"),
        {k: 0.75 * sft2[k] + 0.25 * merged[k] for k in sft2},
        atol=1e-5,
    )
    tau = tmp_path / "tau.safetensors"
    ops.extract_task_vector(family["base"], ref, tau, QUIET)  # an adapter's dense task vector
    assert_states_close(load_state(tau), {k: merged[k] - base[k] for k in base}, atol=1e-5)
    card = (tmp_path / "soup" / "README.md").read_text()
    assert f"{family['sft1']}+{lora}" in card


def test_merge_recipe_takes_an_adapter(family: dict[str, Path], tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    merged = make_adapter(family["sft1"], lora, ["k_proj"], seed=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {family['sft1']}+{lora}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {family['sft2']}\n    parameters: {{weight: 1.0}}\n"
        "dtype: float32\n"
    )
    from mergekit_rl.cli.app import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    sft2 = load_state(family["sft2"])
    assert_states_close(
        load_state(tmp_path / "out"), {k: (merged[k] + sft2[k]) / 2 for k in sft2}, atol=1e-5
    )


def test_adapter_of_another_base_is_refused(
    family: dict[str, Path], tmp_path: Path, tied_family: dict[str, Path]
) -> None:
    from mergekit_rl.tiny import build_tokenizer, save_model, tiny_config

    lora = tmp_path / "lora"
    make_adapter(family["base"], lora, ["q_proj"])
    # a base of another width: same names, other shapes
    cfg = tiny_config(256, hidden=32)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(cfg)
    save_model(other.state_dict(), cfg, build_tokenizer(), tmp_path / "other")
    with pytest.raises(MismatchError, match=r"q_proj.weight.*another base model"):
        open_checkpoint(f"{tmp_path / 'other'}+{lora}")
    # a target the base does not have at all
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in state.items()}
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(MismatchError, match=r"qkv_proj.weight.*does not have"):
        open_checkpoint(f"{family['base']}+{bad}")


def test_bad_adapter_references(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="adapter"):
        open_checkpoint(f"{family['base']}+{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a PEFT adapter"):
        open_checkpoint(f"{family['base']}+{tmp_path / 'empty'}")
    lora = tmp_path / "lora"
    make_adapter(family["base"], lora, ["q_proj"])
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UsageError, match="use_dora"):
        open_checkpoint(f"{family['base']}+{lora}")


def test_hub_adapter_offline_from_cache(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """org/lora@revision resolves from a hub cache laid out as huggingface_hub writes it."""
    lora = tmp_path / "lora"
    want = make_adapter(family["base"], lora, ["v_proj"], seed=4)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-lora"
    shutil.copytree(lora, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for ref in ("someone/tiny-lora", f"someone/tiny-lora@{commit}"):
        with open_checkpoint(f"{family['base']}+{ref}") as ckpt:
            assert ckpt.source.adapter is not None and ckpt.source.adapter.revision == commit
            assert ckpt.source.identity.endswith(f"+someone/tiny-lora@{commit}")
            name = "model.layers.1.self_attn.v_proj.weight"
            torch.testing.assert_close(ckpt.read(name), want[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputNotFoundError, match="not in the local cache"):
        open_checkpoint(f"{family['base']}+someone/other-lora")


def test_output_inside_the_adapter_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    from mergekit_rl.errors import OutputExistsError

    lora = tmp_path / "lora"
    make_adapter(family["base"], lora, ["q_proj"])
    with pytest.raises(OutputExistsError, match="inside the input"):
        ops.soup([f"{family['base']}+{lora}"] * 2, lora / "soup", opts=QUIET)
    assert not (lora / "soup").exists()


def test_adapter_keys_without_the_peft_prefix(family: dict[str, Path], tmp_path: Path) -> None:
    """Some tools save adapters without peft's 'base_model.model.' prefix; embeddings included."""
    from safetensors.torch import load_file, save_file

    want = make_adapter(family["base"], tmp_path / "lora", ["embed_tokens", "k_proj"], seed=9)
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
    save_file(state, weights)
    got = read_all(f"{family['base']}+{tmp_path / 'lora'}")
    assert_states_close(got, {k: want[k] for k in got}, atol=1e-5)


def test_trainable_token_indices_replace_rows_as_peft_merges(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """trainable_token_indices: the listed embedding rows become the adapter's rows (peft's
    index_copy), alongside the LoRA update."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=[3, 5, 7]
    )
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # trained tokens: new rows (they start as copies of the base's)
        for name, p in wrapped.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    wrapped.save_pretrained(tmp_path / "tt")
    want = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    got = read_all(f"{family['base']}+{tmp_path / 'tt'}")
    assert_states_close(got, {k: want[k] for k in got}, atol=1e-5)
    base = load_state(family["base"])["model.embed_tokens.weight"]
    emb = got["model.embed_tokens.weight"]
    moved = (emb - base).abs().amax(dim=1) > 0.1
    assert moved.nonzero().flatten().tolist() == [3, 5, 7]
    # row blocks (the row-blocked and device read paths) get the same rows: blocks that split
    # the trained tokens (4..6 holds 5 only), hold none, or all
    ckpt = open_checkpoint(f"{family['base']}+{tmp_path / 'tt'}")
    name = "model.embed_tokens.weight"
    for step in (1, 2, 5, emb.shape[0]):
        blocks = [
            ckpt.read_rows(name, i, min(i + step, emb.shape[0]))
            for i in range(0, emb.shape[0], step)
        ]
        assert torch.equal(torch.cat(blocks), emb), step


@pytest.mark.parametrize("damage", ["truncated", "not_object", "bad_regex", "bad_index"])
def test_malformed_adapter_is_a_user_error_naming_the_file(
    family: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    from mergekit_rl.cli.app import app
    from typer.testing import CliRunner

    lora = tmp_path / "lora"
    make_adapter(family["base"], lora, ["q_proj"])
    weights, config = lora / "adapter_model.safetensors", lora / "adapter_config.json"
    cfg = json.loads(config.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        named = weights
    elif damage == "not_object":
        config.write_text(json.dumps([cfg]))
        named = config
    elif damage == "bad_regex":
        config.write_text(json.dumps({**cfg, "alpha_pattern": {"q_proj(": 16}}))
        named = config
    else:
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        state[f"base_model.model.model.embed_tokens{'.token_adapter.trainable_tokens_delta'}"] = (
            torch.zeros(2, 64)
        )
        save_file(state, weights)
        config.write_text(json.dumps({**cfg, "trainable_token_indices": [1, 100000]}))
        named = config
    with pytest.raises(UsageError, match=str(named)):
        open_checkpoint(f"{family['base']}+{lora}")
    args = ["soup", f"{family['base']}+{lora}", str(family["sft1"]), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and str(named) in res.output and "internal" not in res.output
    assert not (tmp_path / "o").exists()
