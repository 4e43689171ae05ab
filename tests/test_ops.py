"""Every whole-model operation against a naive in-memory reference built from full state dicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mergekit_rl import ops
from mergekit_rl.engine import RunOptions
from mergekit_rl.errors import MismatchError, OutputExistsError, RunError, UsageError
from mergekit_rl.io.reader import TIED_METADATA_KEY
from tests.arch_models import ARCHS, arch_config, build_model, finetune
from tests.arch_models import logits as arch_logits
from tests.conftest import assert_states_close, load_state

QUIET = ops.WriteOptions(run=RunOptions(progress="none"), command="rlmerge test")


def _logits(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of a saved model, or of the same architecture loaded with `state` by hand."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


def test_uniform_and_weighted_soup(family: dict[str, Path], tmp_path: Path) -> None:
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    ops.soup([family["sft1"], family["sft2"]], tmp_path / "uniform", opts=QUIET)
    assert_states_close(load_state(tmp_path / "uniform"), {k: (a[k] + b[k]) / 2 for k in a})
    ops.soup([family["sft1"], family["sft2"]], tmp_path / "w", [3.0, 1.0], QUIET)
    want = {k: 0.75 * a[k] + 0.25 * b[k] for k in a}
    assert_states_close(load_state(tmp_path / "w"), want)
    # loads with transformers and gives the reference's logits
    torch.testing.assert_close(_logits(tmp_path / "w"), _logits(family["sft1"], want))


def test_interpolation_sweep_writes_every_alpha_in_one_pass(
    family: dict[str, Path], tmp_path: Path
) -> None:
    s, r = load_state(family["sft1"]), load_state(family["rlhf"])
    alphas = [0.0, 0.25, 1.0, 1.5]
    summary = ops.interpolate(
        family["sft1"], family["rlhf"], tmp_path / "sweep", alphas, opts=QUIET
    )
    assert summary.bytes_read == 2 * sum(t.numel() * 4 for t in s.values())  # one read pass
    for a in alphas:
        got = load_state(tmp_path / "sweep" / ops.alpha_dirname(a))
        assert_states_close(got, {k: (1 - a) * s[k] + a * r[k] for k in s})


def _slerp_ref(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = x0.double().flatten(), x1.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * x0.double() + t * x1.double()).float()
    th = math.acos(cos)
    out = (math.sin((1 - t) * th) * x0.double() + math.sin(t * th) * x1.double()) / math.sin(th)
    return out.float()


def test_slerp_interpolation(family: dict[str, Path], tmp_path: Path) -> None:
    s, r = load_state(family["sft1"]), load_state(family["base"])
    ops.interpolate(family["sft1"], family["base"], tmp_path / "o", [0.3], "slerp", QUIET)
    assert_states_close(load_state(tmp_path / "o"), {k: _slerp_ref(s[k], r[k], 0.3) for k in s})


def test_task_vector_extract_and_apply(family: dict[str, Path], tmp_path: Path) -> None:
    base, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    for name in ("sft1", "sft2"):
        ops.extract_task_vector(
            family["base"], family[name], tmp_path / f"{name}.safetensors", QUIET
        )
    tau1 = load_state(tmp_path / "sft1.safetensors")
    assert_states_close(tau1, {k: s1[k] - base[k] for k in base})
    with safe_open(tmp_path / "sft1.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["rlmerge_kind"] == "task_vector"
    assert meta["rlmerge_base"] == str(family["base"].resolve())
    tvs = [tmp_path / "sft1.safetensors", tmp_path / "sft2.safetensors"]
    ops.apply_task_vectors(family["base"], tvs, tmp_path / "applied", [1.0, -0.5], QUIET)
    want = {k: base[k] + (s1[k] - base[k]) - 0.5 * (s2[k] - base[k]) for k in base}
    assert_states_close(load_state(tmp_path / "applied"), want, atol=2e-6)
    torch.testing.assert_close(_logits(tmp_path / "applied"), _logits(family["base"], want))


def test_apply_to_other_base_warns(family: dict[str, Path], tmp_path: Path) -> None:
    ops.extract_task_vector(family["base"], family["sft1"], tmp_path / "t.safetensors", QUIET)
    with pytest.warns(UserWarning, match="extracted against base"):
        ops.apply_task_vectors(
            family["sft2"], [tmp_path / "t.safetensors"], tmp_path / "o", opts=QUIET
        )


def test_output_dtype_config_card_and_tokenizer(family: dict[str, Path], tmp_path: Path) -> None:
    opts = ops.WriteOptions(
        run=RunOptions(progress="none"), dtype=torch.bfloat16, command="rlmerge soup x"
    )
    ops.soup([family["sft1"], family["sft2"]], tmp_path / "o", opts=opts)
    out = tmp_path / "o"
    assert all(t.dtype == torch.bfloat16 for t in load_state(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert (
        "rlmerge soup x" in card and "license: apache-2.0" in card and str(family["sft2"]) in card
    )
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["rlmerge_inputs"])[1]["ref"] == str(family["sft2"])


def test_sharded_output_loads(family: dict[str, Path], tmp_path: Path) -> None:
    opts = ops.WriteOptions(run=RunOptions(progress="none", max_shard_size=40_000))
    ops.soup([family["sft1"], family["sft2"]], tmp_path / "o", opts=opts)
    assert len(list((tmp_path / "o").glob("model-*.safetensors"))) > 2
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    torch.testing.assert_close(
        _logits(tmp_path / "o"), _logits(family["sft1"], {k: (a[k] + b[k]) / 2 for k in a})
    )


def test_tied_embeddings_stay_tied(tied_family: dict[str, Path], tmp_path: Path) -> None:
    ops.soup([tied_family["sft1"], tied_family["sft2"]], tmp_path / "o", opts=QUIET)
    got = load_state(tmp_path / "o")
    assert "lm_head.weight" not in got
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is True
    a, b = load_state(tied_family["sft1"]), load_state(tied_family["sft2"])
    want = {k: ((a[k].float() + b[k].float()) / 2).bfloat16() for k in a}
    assert_states_close(got, want, atol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_mismatched_inputs_are_refused_before_writing(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state = load_state(family["sft1"])
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-3]  # smaller vocab
    other = tmp_path / "other"
    other.mkdir()
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MismatchError, match="model.embed_tokens.weight.*vocabulary sizes differ"):
        ops.soup([family["sft1"], other], tmp_path / "o", opts=QUIET)
    assert not (tmp_path / "o").exists()


def test_non_finite_output_is_an_error_and_writes_nothing(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state = load_state(family["sft1"])
    state["model.norm.weight"][0] = float("inf")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with (
        pytest.warns(UserWarning, match="'model.norm.weight' contains NaN or Inf"),
        pytest.raises(RunError, match="model.norm.weight"),
    ):
        ops.soup([family["sft1"], bad], tmp_path / "o", opts=QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_bad_arguments(family: dict[str, Path], tmp_path: Path) -> None:
    pair = [family["sft1"], family["sft2"]]
    with pytest.raises(UsageError, match="sum to zero"):
        ops.soup(pair, tmp_path / "o", [1.0, -1.0], QUIET)
    with pytest.raises(UsageError, match="2 models"):
        ops.soup(pair, tmp_path / "o", [1.0], QUIET)
    with pytest.raises(OutputExistsError, match="input"):
        ops.soup(pair, family["sft1"], opts=QUIET)
    with pytest.raises(UsageError, match="slerp"):
        ops.interpolate(*pair, tmp_path / "o", [0.5], "cubic", QUIET)


# ---- tied embeddings by architecture, lossless task vectors, config dtype ------------------------


@pytest.fixture(scope="module")
def arch_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per architecture: a tied and an untied float32 model of the same shapes."""
    root = tmp_path_factory.mktemp("archs")
    return {
        arch: {
            "tied": build_model(root / f"{arch}-tied", arch, tie=True, seed=1),
            "untied": build_model(root / f"{arch}-untied", arch, tie=False, seed=2),
        }
        for arch in ARCHS
    }


def _full_state(path: Path, tied_to: str | None) -> dict[str, torch.Tensor]:
    """The state dict with a tied head written out (the naive reference of a tied model)."""
    state = {k: v.double() for k, v in load_state(path).items()}
    if tied_to is not None:
        state["lm_head.weight"] = state[tied_to]
    return state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied_first", [True, False])
def test_soup_of_tied_and_untied_models(
    arch_pairs: dict[str, dict[str, Path]], arch: str, tied_first: bool, tmp_path: Path
) -> None:
    """GPT-2 stores its embedding as transformer.wte: the tied head comes from the architecture,
    not from Llama's names. Either order writes an untied model with the exact average."""
    pair = arch_pairs[arch]
    embed = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    order = [pair["tied"], pair["untied"]] if tied_first else [pair["untied"], pair["tied"]]
    ops.soup(order, tmp_path / "o", opts=QUIET)
    a, b = _full_state(pair["tied"], embed), _full_state(pair["untied"], None)
    want = {k: ((a[k] + b[k]) / 2).float() for k in b}
    got = load_state(tmp_path / "o")
    assert_states_close(got, want)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ref = arch_logits(arch_config(arch, tie=False), want)
    torch.testing.assert_close(arch_logits(tmp_path / "o"), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_soup_of_tied_models_stays_tied(
    arch_pairs: dict[str, dict[str, Path]], arch: str, tmp_path: Path
) -> None:
    tied = arch_pairs[arch]["tied"]
    other = finetune(tied, tmp_path / "ft", seed=3)
    ops.soup([tied, other], tmp_path / "o", opts=QUIET)
    a, b = load_state(tied), load_state(other)
    want = {k: ((a[k].double() + b[k].double()) / 2).float() for k in a}
    assert_states_close(load_state(tmp_path / "o"), want)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"]
    ref = arch_logits(arch_config(arch, tie=True), want)
    torch.testing.assert_close(arch_logits(tmp_path / "o"), ref)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("qwen2", torch.bfloat16),
        ("qwen2", torch.float16),
        ("qwen2", torch.float32),
        ("gemma", torch.bfloat16),
        ("gpt2", torch.bfloat16),
    ],
)
def test_task_vector_round_trip_is_exact(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    """apply(base, extract(base, x), 1) == x bit for bit, on tied models (the task vector is a
    bare .safetensors file, with no config.json to say that the head is tied)."""
    base = build_model(tmp_path / "base", arch, tie=True, seed=4, dtype=dtype)
    x = finetune(base, tmp_path / "x", seed=5)
    tau = tmp_path / "tau.safetensors"
    ops.extract_task_vector(base, x, tau, QUIET)
    stored = load_state(tau)
    assert "lm_head.weight" not in stored
    with safe_open(tau, "pt") as f:
        assert json.loads(f.metadata()[TIED_METADATA_KEY])[0] == "lm_head.weight"
    wide = torch.float64 if dtype == torch.float32 else torch.float32  # lossless by default
    assert all(t.dtype == wide for t in stored.values())
    ops.apply_task_vectors(base, [tau], tmp_path / "out", [1.0], QUIET)
    got, want = load_state(tmp_path / "out"), load_state(x)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == dtype
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]
    torch.testing.assert_close(arch_logits(tmp_path / "out"), arch_logits(x), atol=0, rtol=0)


def test_task_vector_dtype_on_purpose(tied_family: dict[str, Path], tmp_path: Path) -> None:
    """--dtype bfloat16 stores tau in bf16 as asked (smaller, lossy)."""
    opts = ops.WriteOptions(run=RunOptions(progress="none"), dtype=torch.bfloat16)
    tau = tmp_path / "tau.safetensors"
    ops.extract_task_vector(tied_family["base"], tied_family["sft1"], tau, opts)
    base, sft = load_state(tied_family["base"]), load_state(tied_family["sft1"])
    want = {k: (sft[k].float() - base[k].float()).bfloat16() for k in base}
    assert_states_close(load_state(tau), want, atol=0)


def test_untied_finetune_of_tied_base_task_vector(
    arch_pairs: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """tau of an untied fine-tune of a tied base stores lm_head; applied, the output is untied."""
    pair = arch_pairs["qwen2"]
    tau = tmp_path / "tau.safetensors"
    ops.extract_task_vector(pair["tied"], pair["untied"], tau, QUIET)
    ops.apply_task_vectors(pair["tied"], [tau], tmp_path / "o", opts=QUIET)
    want = _full_state(pair["untied"], None)
    assert_states_close(load_state(tmp_path / "o"), {k: v.float() for k, v in want.items()})
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("tokenizer_source", [0, 1])
def test_config_dtype_is_the_written_dtype(
    family: dict[str, Path], tied_family: dict[str, Path], tmp_path: Path, tokenizer_source: int
) -> None:
    """Mixed input dtypes: the weights take the first input's dtype; so does config.json,
    whichever input the config comes from."""
    fp16 = tmp_path / "fp16"
    finetune(family["sft1"], fp16, seed=6, scale=0.0)  # a float32 copy ...
    model = AutoModelForCausalLM.from_pretrained(fp16, dtype=torch.float16)
    model.save_pretrained(fp16)  # ... saved as float16
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(family["sft2"], dtype=torch.bfloat16).save_pretrained(bf16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "o"
    ops.soup([fp16, bf16], out, opts=QUIET, tokenizer_source=tokenizer_source)
    assert {t.dtype for t in load_state(out).values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.float16


def test_task_vector_float64_is_exact_where_float32_cannot_be(tmp_path: Path) -> None:
    """x = 2e-8 beside b = -0.024 (bf16): x - b needs 28 bits, more than float32 has, so the
    default tau gives x back only within float32 rounding of b; a float64 tau is exact."""
    from safetensors.torch import save_file

    b = torch.tensor([-0.024169921875, 0.5, 1.0], dtype=torch.bfloat16)
    x = torch.tensor([2.1420419216156006e-08, 0.25, -3.0], dtype=torch.bfloat16)
    save_file({"w": b}, tmp_path / "b.safetensors")
    save_file({"w": x}, tmp_path / "x.safetensors")
    results = {}
    for dtype in (None, torch.float64):
        opts = ops.WriteOptions(run=RunOptions(progress="none"), dtype=dtype)
        tau, out = tmp_path / f"tau-{dtype}.safetensors", tmp_path / f"out-{dtype}.safetensors"
        ops.extract_task_vector(tmp_path / "b.safetensors", tmp_path / "x.safetensors", tau, opts)
        ops.apply_task_vectors(tmp_path / "b.safetensors", [tau], out, opts=QUIET)
        results[dtype] = load_state(out)["w"]
    assert not torch.equal(results[None][0], x[0]) and torch.equal(results[None][1:], x[1:])
    assert results[None].dtype == results[torch.float64].dtype == torch.bfloat16
    assert torch.equal(results[torch.float64].view(torch.int16), x.view(torch.int16))
