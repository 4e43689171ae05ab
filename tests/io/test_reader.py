from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_rl.errors import InputNotFoundError, MismatchError, PickleRefusedError, UsageError
from mergekit_rl.io.reader import (
    TIED_BY_MODEL_TYPE,
    TIED_METADATA_KEY,
    TIED_PAIR,
    all_finite,
    check_compatible,
    open_checkpoint,
)
from mergekit_rl.io.reference import natural_key, resolve
from tests.conftest import load_state


def test_lists_headers_and_reads_every_tensor(family: dict[str, Path]) -> None:
    ref = load_state(family["sft1"])
    with open_checkpoint(family["sft1"]) as ckpt:
        assert set(ckpt.names()) == set(ref)
        for name in ckpt.names():
            info = ckpt.info(name)
            assert info.shape == tuple(ref[name].shape) and info.dtype == ref[name].dtype
            assert torch.equal(ckpt.read(name), ref[name])
        assert ckpt.config is not None and ckpt.config["model_type"] == "llama"
        assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in ref.values())


def test_reads_shards_in_natural_order(tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.w": torch.full((3,), float(i)) for i in (0, 2, 10)}
    save_file(
        {k: v for k, v in tensors.items() if "10" in k},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    save_file(
        {k: v for k, v in tensors.items() if "10" not in k},
        tmp_path / "model-00001-of-00002.safetensors",
    )
    index = {
        "metadata": {},
        "weight_map": {
            k: (
                "model-00002-of-00002.safetensors"
                if "10" in k
                else "model-00001-of-00002.safetensors"
            )
            for k in tensors
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names()[-1] == "model.layers.10.w"
        assert torch.equal(
            ckpt.read("model.layers.10.w", torch.float64),
            torch.full((3,), 10.0, dtype=torch.float64),
        )
    assert sorted(["layers.10", "layers.2"], key=natural_key) == ["layers.2", "layers.10"]


def test_single_file_and_missing_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    src = resolve(tmp_path / "x.safetensors")
    assert src.is_file and src.weight_files == ((tmp_path / "x.safetensors").resolve(),)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "nope.safetensors"}})
    )
    with pytest.raises(InputNotFoundError, match="nope.safetensors"):
        resolve(bad)


def test_missing_model_names_the_reference() -> None:
    with pytest.raises(InputNotFoundError, match="no/such-model"):
        resolve("no/such-model")  # hub id: offline and not cached
    with pytest.raises(InputNotFoundError, match="./nowhere"):
        resolve("./nowhere")


def test_pickle_refused_then_allowed(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.arange(4.0))


def test_corrupt_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UsageError, match="model.safetensors"):
        open_checkpoint(tmp_path)


def test_hub_id_resolves_from_offline_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: dict[str, Path]
) -> None:
    """A cached hub snapshot resolves offline, and its commit hash is recorded."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in family["sft1"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = resolve("org/tiny")
    assert src.revision == commit and src.identity == f"org/tiny@{commit}"
    with open_checkpoint("org/tiny") as ckpt:
        assert "model.embed_tokens.weight" in ckpt.names()


def test_check_compatible_reports_names_and_shapes(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, tmp_path / "x.safetensors")
    save_file({"a": torch.ones(2), "c": torch.ones(3)}, tmp_path / "y.safetensors")
    save_file({"a": torch.ones(4), "b": torch.ones(3)}, tmp_path / "z.safetensors")
    x, y, z = (open_checkpoint(tmp_path / f"{n}.safetensors") for n in "xyz")
    with pytest.raises(MismatchError, match="1 tensor is in .*x.safetensors but not in .*: 'b'"):
        check_compatible([x, y])
    with pytest.raises(MismatchError, match=r"'a' has shape \[2\]"):
        check_compatible([x, z])


def _headers_only(path: Path, layers: int, hidden: int) -> Path:
    """A Llama checkpoint of this size whose data is a hole in a sparse file (headers are
    all that check_compatible reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_rl.io.safetensors_format import build_header, tensor_nbytes

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        state = LlamaForCausalLM(cfg).state_dict()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    path.mkdir()
    cfg.to_json_file(path / "config.json")
    with open(path / "model.safetensors", "wb") as f:
        f.write(build_header(entries, {"format": "pt"}))
        f.truncate(f.tell() + sum(tensor_nbytes(s, d) for _, s, d in entries))
    return path


def test_mismatch_error_counts_every_difference(tmp_path: Path) -> None:
    """2 layers / 64 wide against 12 layers / 1024 wide: all 90 extra tensors and all 21
    shapes are counted, the first few of each listed."""
    small = _headers_only(tmp_path / "small", 2, 64)
    big = _headers_only(tmp_path / "big", 12, 1024)
    with open_checkpoint(small) as a, open_checkpoint(big) as b:
        assert len(b.names()) - len(a.names()) == 90
        with pytest.raises(MismatchError) as err:
            check_compatible([a, b])
    msg = str(err.value)
    assert f"90 tensors are in {big} but not in {small}: 'model.layers.2." in msg
    assert "(and 85 more)" in msg and "(and 16 more)" in msg
    assert "21 of their 21 common tensors differ in shape: 'lm_head.weight'" in msg
    assert "vocabulary sizes differ" not in msg  # the widths differ, not the vocabularies
    assert "but not in " + str(big) not in msg  # nothing is only in the small one


def test_tied_checkpoint_matches_untied_twin(tied_family: dict[str, Path], tmp_path: Path) -> None:
    with open_checkpoint(tied_family["base"]) as tied:
        assert tied.tied_embeddings and "lm_head.weight" not in tied.names()
        state = load_state(tied_family["base"])
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, tmp_path / "untied.safetensors")
        with open_checkpoint(tmp_path / "untied.safetensors") as untied:
            names = check_compatible([tied, untied])
            assert "lm_head.weight" in names
            assert torch.equal(tied.read("lm_head.weight"), state["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_all_finite_matches_isfinite(dtype: torch.dtype, bad: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(), (1,), (7, 5), (3, 4, 6)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        if bad is not None:
            x.view(-1)[-1] = bad  # the last entry: a reduction must see every element
        assert all_finite(x) == bool(torch.isfinite(x).all()) == (bad is None)
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers are always finite


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_all_finite_on_float8(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """float8 has no min/max kernels: it is checked in float32 chunks (3 entries here)."""
    monkeypatch.setattr("mergekit_rl.io.reader.UPCAST_CHUNK", 3)
    x = torch.linspace(-4, 4, 11).to(dtype)
    assert all_finite(x) and all_finite(x.reshape(1, 11))
    bad = [float("nan")] + ([float("inf"), -float("inf")] if dtype == torch.float8_e5m2 else [])
    for value in bad:
        y = x.clone()
        y[-1] = value  # in the last, partial chunk
        assert not all_finite(y)


@pytest.mark.parametrize(
    "model_type", sorted({*TIED_BY_MODEL_TYPE, "llama", "qwen2", "gemma", "mistral", "phi3"})
)
def test_tied_names_agree_with_transformers(model_type: str) -> None:
    """Our (lm_head, input embedding) names are the model class's own tied-weights keys."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(model_type))]
    ours = TIED_BY_MODEL_TYPE.get(model_type, TIED_PAIR)
    assert dict([ours]) == dict(cls._tied_weights_keys)


def test_tied_pair_from_config_metadata_or_names(tmp_path: Path) -> None:
    wte = {"transformer.wte.weight": torch.ones(4, 2), "transformer.h.0.w": torch.ones(2)}
    save_file(wte, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # tie by default
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.tied_pair == ("lm_head.weight", "transformer.wte.weight")
        assert ckpt.has("lm_head.weight") and ckpt.info("lm_head.weight").shape == (4, 2)
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with open_checkpoint(tmp_path) as ckpt:
        assert not ckpt.tied_embeddings and not ckpt.has("lm_head.weight")
    # a bare file: the pair recorded at extract time, else the names
    save_file(wte, tmp_path / "tv.safetensors", {TIED_METADATA_KEY: '["lm_head.weight", "x"]'})
    with open_checkpoint(tmp_path / "tv.safetensors") as ckpt:
        assert ckpt.tied_pair == ("lm_head.weight", "transformer.wte.weight")  # x is absent
    save_file(wte, tmp_path / "bare.safetensors")
    with open_checkpoint(tmp_path / "bare.safetensors") as ckpt:
        assert ckpt.tied_pair == ("lm_head.weight", "transformer.wte.weight")
    save_file({**wte, "lm_head.weight": torch.ones(4, 2)}, tmp_path / "untied.safetensors")
    with open_checkpoint(tmp_path / "untied.safetensors") as ckpt:
        assert not ckpt.tied_embeddings


def test_reads_into_a_given_buffer_equal_fresh_reads(tmp_path: Path) -> None:
    # the engine's pooled read buffers: read / read_rows fill `out` (returned) with the same
    # bits as a fresh read; a buffer of another dtype or shape is refused, not overrun
    x = torch.randn(7, 5).bfloat16()
    save_file({"w": x, "s": torch.tensor(3.0)}, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        out = torch.full((7, 5), float("nan"), dtype=torch.bfloat16)
        got = ckpt.read("w", out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, x)
        rows = torch.empty(3, 5, dtype=torch.bfloat16)
        got = ckpt.read_rows("w", 2, 5, out=rows)
        assert got.data_ptr() == rows.data_ptr() and torch.equal(got, x[2:5])
        scalar = torch.empty((), dtype=torch.float32)
        assert ckpt.read("s", out=scalar).item() == 3.0 and scalar.item() == 3.0
        with pytest.raises(ValueError, match="read buffer"):
            ckpt.read("w", out=torch.empty(7, 5))
        with pytest.raises(ValueError, match="read buffer"):
            ckpt.read_rows("w", 0, 4, out=rows)
