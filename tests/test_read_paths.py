"""Every read path gives the same values, on what only real-size models used to reach.

The engine reads a tensor whole, in row blocks (tensors above `RunOptions.block_elems` entries:
lowered here to 1000 so that every tiny tensor goes through in blocks), or, for an accelerator,
as one row range (`RunOptions.device_reads`, forced here on the CPU). Which path runs may change
the speed, never the bytes: each is held against the whole-tensor path bit for bit, and that one
against a naive reference (peft's merge_and_unload() for adapters, float32 math on the stored
values otherwise), for adapters (LoRA, modules_to_save, tied pairs), every stored dtype (F8
included) and every merge method.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit_rl import ops
from mergekit_rl.engine import RunOptions
from mergekit_rl.io.reader import open_checkpoint
from mergekit_rl.merge.registry import list_methods
from mergekit_rl.recipe.run import MergeOptions, merge_file
from mergekit_rl.tiny import build_family
from tests.conftest import load_state

peft = pytest.importorskip("peft")

HUGE = 1 << 40
PATHS = {
    "whole": RunOptions(progress="none", block_elems=HUGE, device_reads=False),
    "rows": RunOptions(progress="none", block_elems=1000, device_reads=False),
    "device": RunOptions(progress="none", block_elems=HUGE, device_reads=True),
    "device_rows": RunOptions(progress="none", block_elems=1000, device_reads=True),
}
# peft adapters: (base family, LoraConfig arguments). modules_to_save copies are perturbed, so
# that a replacement that is dropped, or written over the wrong tensor, shows.
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("untied", {"target_modules": ["q_proj", "down_proj", "embed_tokens", "lm_head"]}),
    "lora_rslora": ("untied", {"target_modules": ["v_proj", "up_proj"], "use_rslora": True}),
    "untied_save_lm_head": (
        "untied",
        {"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    ),
    "tied_lora": ("tied", {"target_modules": ["lm_head", "q_proj"]}),
    "tied_lora_embed": ("tied", {"target_modules": ["embed_tokens", "o_proj"]}),
    "tied_save_lm_head": ("tied", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "tied_save_embed": (
        "tied",
        {"target_modules": ["gate_proj"], "modules_to_save": ["embed_tokens"]},
    ),
    "tied_save_lm_head_lora_embed": (
        "tied",
        {"target_modules": ["embed_tokens"], "modules_to_save": ["lm_head"]},
    ),
}
UNTIES = {"tied_save_lm_head", "tied_save_embed", "tied_save_lm_head_lora_embed"}


@pytest.fixture(autouse=True)
def _small_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the other size threshold too: the adapter's row grid (16 of 256 rows)."""
    monkeypatch.setattr("mergekit_rl.io.adapter.UPDATE_ROWS", 16)


@pytest.fixture(scope="module")
def fams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """float32 families, untied and tied (peft merges in float32: exact comparisons)."""
    root = tmp_path_factory.mktemp("read_paths")
    return {
        "untied": build_family(root / "untied", seed=11),
        "tied": build_family(root / "tied", tie=True, seed=12),
    }


def make_adapter(base: Path, out: Path, seed: int, **config: Any) -> Any:
    """Save a random peft adapter of `base` (nonzero B, perturbed modules_to_save copies) to
    `out`; return peft's merge_and_unload() model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config)
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(out)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(
    fams: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, dict[str, torch.Tensor], Any]]:
    """name -> (BASE+ADAPTER reference, peft's merged state, peft's merged model)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, (fam, config)) in enumerate(ADAPTERS.items()):
        base = fams[fam]["base"]
        merged = make_adapter(base, root / name, seed=20 + i, **config)
        state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        out[name] = (f"{base}+{root / name}", state, merged)
    return out


def _ids() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) * 7 % 200


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _assert_same_files(a: Path, b: Path) -> None:
    """Two outputs hold the same tensors, bit for bit."""
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name


# ---- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_rows_equal_whole_reads_and_peft(
    name: str, adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]]
) -> None:
    """Checkpoint.read_rows in blocks of 7 rows gives read()'s bits; both are peft's merge."""
    ref, want, _ = adapters[name]
    with open_checkpoint(ref) as ckpt:
        assert ckpt.tied_embeddings == (ADAPTERS[name][0] == "tied" and name not in UNTIES)
        for t in ckpt.names() + (["lm_head.weight"] if ckpt.tied_embeddings else []):
            whole = ckpt.read(t)
            n = ckpt.info(t).shape[0]
            rows = torch.cat([ckpt.read_rows(t, s, min(n, s + 7)) for s in range(0, n, 7)])
            assert torch.equal(rows, whole), t
            torch.testing.assert_close(whole, want[t], atol=1e-5, rtol=1e-5, msg=t)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", [(1000, 333), (257, 64), (130, 4097)])
def test_update_rows_in_any_blocks_equal_the_whole_update(
    shape: tuple[int, int], transpose: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Odd widths (rows not 64-byte multiples), blocks that cut the 64-row grid anywhere:
    each block gets the whole update's bits, and the whole update is W + B @ A * scale."""
    from mergekit_rl.io.adapter import LoraFactors

    monkeypatch.setattr("mergekit_rl.io.adapter.UPDATE_ROWS", 64)
    g = torch.Generator().manual_seed(sum(shape))
    out, inp = shape
    a = torch.randn(5, out if transpose else inp, generator=g)
    b = torch.randn(inp if transpose else out, 5, generator=g)
    f = LoraFactors(a, b, 0.7, transpose)
    w = torch.randn(shape, generator=g)
    whole = f.add_to_(w.clone())
    naive = w + ((b @ a).T if transpose else b @ a) * 0.7
    torch.testing.assert_close(whole, naive, atol=1e-5, rtol=1e-5)
    for step in (1, 37, 64, 100):
        parts = [
            f.add_to_(w[s : s + step].clone(), (s, min(out, s + step))) for s in range(0, out, step)
        ]
        assert torch.equal(torch.cat(parts), whole), step


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_commands_apply_adapters_on_every_read_path(
    name: str,
    path: str,
    adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]],
    fams: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    """soup B+A B+A is peft's merged model; task-vector extract gives merged - base, and apply
    gives merged back; on every read path, bit for bit the whole-tensor path's output."""
    ref, want, _ = adapters[name]
    base = fams[ADAPTERS[name][0]]["base"]
    base_state = load_state(base)
    outs = {}
    for p in dict.fromkeys(["whole", path]):
        opts = ops.WriteOptions(run=PATHS[p], command="test")
        d = tmp_path / p
        ops.soup([ref, ref], d / "soup", opts=opts)
        ops.extract_task_vector(base, ref, d / "tau.safetensors", opts)
        ops.apply_task_vectors(base, [d / "tau.safetensors"], d / "applied", opts=opts)
        outs[p] = d
    soup = load_state(outs[path] / "soup")
    tau = load_state(outs[path] / "tau.safetensors")
    assert soup.keys() == tau.keys() and len(soup) >= len(base_state)
    for t, got in soup.items():
        torch.testing.assert_close(got, want[t], atol=1e-5, rtol=1e-5, msg=t)
        # a tied base stores lm_head as the embedding
        stored = base_state.get(t, base_state["model.embed_tokens.weight"])
        torch.testing.assert_close(tau[t].float(), want[t] - stored, atol=1e-5, rtol=0, msg=t)
    for t, got in load_state(outs[path] / "applied").items():
        torch.testing.assert_close(got, want[t], atol=1e-5, rtol=1e-5, msg=t)
    assert any(bool(x.abs().max() > 1e-3) for x in tau.values())  # the adapter moved weights
    for part in ("soup", "tau.safetensors", "applied"):
        _assert_same_files(outs["whole"] / part, outs[path] / part)


@pytest.mark.parametrize("name", sorted(UNTIES))
def test_tied_base_with_saved_copy_is_written_untied(
    name: str, adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]], tmp_path: Path
) -> None:
    """modules_to_save of one of a tied pair: peft unties them, and so does the output (both
    tensors, tie_word_embeddings false), which transformers loads to peft's logits."""
    from transformers import AutoModelForCausalLM

    ref, want, merged = adapters[name]
    ops.soup([ref, ref], tmp_path / "soup", opts=ops.WriteOptions(run=PATHS["rows"]))
    state = load_state(tmp_path / "soup")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(state)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "soup", dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(_logits(model), _logits(merged), atol=1e-4, rtol=1e-4)
    for t in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(state[t], want[t], atol=1e-6, rtol=1e-6, msg=t)


@pytest.mark.parametrize("name", ["tied_save_lm_head", "tied_save_embed"])
def test_training_loads_an_untying_adapter_as_peft_does(
    name: str, adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]]
) -> None:
    from mergekit_rl.train.run import load_causal_lm

    ref, _, merged = adapters[name]
    model = load_causal_lm(ref, torch.float32).eval()
    torch.testing.assert_close(_logits(model), _logits(merged), atol=1e-4, rtol=1e-4)


def _recipe(method: Any, models: list[str], base: str) -> dict[str, Any]:
    mp: dict[str, Any] = {
        "weight": 0.5,
        "density": 0.5,
        "gamma": 0.1,
        "epsilon": 0.1,
    }
    known = set(method.model_param_names())
    n = max(method.min_models, min(len(models), method.max_models or len(models)))
    entries = [
        {"model": m, "parameters": {k: v for k, v in mp.items() if k in known}} for m in models[:n]
    ]
    for e in entries:
        if not e["parameters"]:
            del e["parameters"]
    recipe: dict[str, Any] = {"merge_method": method.name, "models": entries, "seed": 5}
    if method.needs_base:
        recipe["base_model"] = base
    gp = {"t": 0.4} if "t" in set(method.global_param_names()) else {}
    if "rescale" in set(method.global_param_names()):
        gp["rescale"] = False  # L1 rescaling needs whole tensors: keep the blocks
    if gp:
        recipe["parameters"] = gp
    return recipe


@pytest.mark.parametrize("path", ["rows", "device", "device_rows"])
@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_with_adapters_on_every_read_path(
    method: str,
    path: str,
    adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]],
    fams: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    """A recipe on a tied family, inputs with a shared-matrix LoRA and an untying copy:
    every read path writes the whole-tensor path's bits, and the adapters are applied
    (the result differs from the same recipe without them)."""
    m = next(x for x in list_methods() if x.name == method)
    tied = fams["tied"]
    lora, untie = adapters["tied_lora"][0], adapters["tied_save_lm_head"][0]
    sft1_lora = lora.replace(str(tied["base"]), str(tied["sft1"]))
    rlhf_untie = untie.replace(str(tied["base"]), str(tied["rlhf"]))
    outs = {}
    for label, models in (
        ("plain", [str(tied["sft1"]), str(tied["rlhf"]), str(tied["sft2"])]),
        ("adapters", [sft1_lora, rlhf_untie, str(tied["sft2"])]),
    ):
        recipe = tmp_path / f"{label}.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(m, models, str(tied["base"]))))
        for p in ("whole", path) if label == "adapters" else ("whole",):
            out = tmp_path / f"{label}_{p}"
            merge_file(recipe, out, MergeOptions(write=ops.WriteOptions(run=PATHS[p])))
            outs[label, p] = out
    _assert_same_files(outs["adapters", "whole"], outs["adapters", path])
    plain, adapted = load_state(outs["plain", "whole"]), load_state(outs["adapters", "whole"])
    assert any(k not in plain or not torch.equal(plain[k], v) for k, v in adapted.items())


# ---- every stored dtype ---------------------------------------------------------------------------

DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@pytest.fixture(scope="module")
def typed(fams: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory):
    """The untied family stored in each dtype (weights scaled x10 so float8 keeps detail)."""
    root = tmp_path_factory.mktemp("typed")
    out: dict[str, dict[str, Path]] = {}
    for tag, dtype in DTYPES.items():
        out[tag] = {}
        for k in ("base", "sft1", "sft2"):
            dst = root / tag / k
            shutil.copytree(fams["untied"][k], dst)
            state = load_file(dst / "model.safetensors")
            state = {n: (t * 10).to(dtype) for n, t in state.items()}
            save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
            out[tag][k] = dst
    return out


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("tag", list(DTYPES))
def test_every_dtype_on_every_read_path(
    tag: str, path: str, typed: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """soup, extract, apply and a TIES recipe on models stored in each dtype: the naive
    float32 reference on the stored values, and the whole-tensor path's bits."""
    fam, dtype = typed[tag], DTYPES[tag]
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(fam["base"]),
                "models": [
                    {"model": str(fam[k]), "parameters": {"weight": 0.5, "density": 0.5}}
                    for k in ("sft1", "sft2")
                ],
            }
        )
    )
    outs = {}
    for p in dict.fromkeys(["whole", path]):
        opts = ops.WriteOptions(run=PATHS[p])
        d = tmp_path / p
        ops.soup([fam["sft1"], fam["sft2"]], d / "soup", opts=opts)
        ops.soup(
            [fam["sft1"], fam["sft2"]],
            d / "soup32",
            opts=ops.WriteOptions(run=PATHS[p], dtype=torch.float32),
        )
        ops.extract_task_vector(fam["base"], fam["sft1"], d / "tau.safetensors", opts)
        ops.apply_task_vectors(fam["base"], [d / "tau.safetensors"], d / "applied", opts=opts)
        merge_file(recipe, d / "ties", MergeOptions(write=opts))
        outs[p] = d
    s1, s2, b = (load_state(fam[k]) for k in ("sft1", "sft2", "base"))
    soup, soup32 = load_state(outs[path] / "soup"), load_state(outs[path] / "soup32")
    tau, applied = load_state(outs[path] / "tau.safetensors"), load_state(outs[path] / "applied")
    for t in s1:
        mean = (s1[t].float() + s2[t].float()) / 2
        assert soup[t].dtype == dtype and soup32[t].dtype == torch.float32
        assert torch.equal(soup32[t], mean), t
        assert torch.equal(soup[t].float(), mean.to(dtype).float()), t
        assert torch.equal(tau[t].double(), s1[t].double() - b[t].double()), t  # lossless
        assert applied[t].dtype == dtype and torch.equal(applied[t].float(), s1[t].float()), t
    assert load_state(outs[path] / "ties")["lm_head.weight"].dtype == dtype
    for part in ("soup", "soup32", "tau.safetensors", "applied", "ties"):
        _assert_same_files(outs["whole"] / part, outs[path] / part)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block_elems", [HUGE, 1000])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_on_cuda_equal_the_cpu(
    name: str,
    block_elems: int,
    adapters: dict[str, tuple[str, dict[str, torch.Tensor], Any]],
    fams: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    """The real device path (pinned reads, asynchronous copies): soup B+A B+A and the task
    vector of B+A, bit for bit the CPU's (one exact add, one exact subtraction per entry)."""
    ref = adapters[name][0]
    base = fams[ADAPTERS[name][0]]["base"]
    for dev, run in (
        ("cpu", PATHS["whole"]),
        ("cuda", RunOptions(progress="none", device="cuda", block_elems=block_elems)),
    ):
        opts = ops.WriteOptions(run=run)
        ops.soup([ref, ref], tmp_path / dev / "soup", opts=opts)
        ops.extract_task_vector(base, ref, tmp_path / dev / "tau.safetensors", opts)
    for part in ("soup", "tau.safetensors"):
        _assert_same_files(tmp_path / "cpu" / part, tmp_path / "cuda" / part)


def test_gpt2_conv1d_adapter_and_untied_head_on_every_read_path(tmp_path: Path) -> None:
    """GPT-2: Conv1D weights stored [in, out] (fan_in_fan_out: their update is transposed, so
    its rows are columns of A) and a tied transformer.wte / lm_head pair that a modules_to_save
    copy of lm_head unties; every read path gives peft's model."""
    from transformers import AutoModelForCausalLM

    from tests.arch_models import VOCAB, build_model

    base = build_model(tmp_path / "base", "gpt2", tie=True, seed=3)
    cfg = {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}
    merged = make_adapter(base, tmp_path / "lora", seed=4, modules_to_save=["lm_head"], **cfg)
    want = merged.state_dict()
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    with torch.no_grad():
        want_logits = merged(input_ids=ids).logits
    for p, run in PATHS.items():
        out = tmp_path / p
        ops.soup([f"{base}+{tmp_path / 'lora'}"] * 2, out, opts=ops.WriteOptions(run=run))
        got = load_state(out)
        assert {"lm_head.weight", "transformer.wte.weight"} <= set(got)
        for t, x in got.items():
            torch.testing.assert_close(x, want[t], atol=1e-5, rtol=1e-5, msg=t)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids).logits, want_logits, atol=1e-4, rtol=1e-4
            )
        if p != "whole":
            _assert_same_files(tmp_path / "whole", out)
