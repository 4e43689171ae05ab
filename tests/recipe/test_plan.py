"""Planning a stage: tensors, sources, depth, parameters, slices and config rewrites."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from mergekit_rl.errors import MismatchError, RecipeError
from mergekit_rl.io.reader import open_checkpoint
from mergekit_rl.recipe.checks import load_pipeline
from mergekit_rl.recipe.plan import (
    PEAK_CONSTANT_BYTES,
    StagePlan,
    _config_updates,
    _model_ids,
    plan_stage,
    split_layer,
)


def plan(text: str, stack: ExitStack) -> StagePlan:
    [stage] = load_pipeline(text, "r.yaml")
    ckpts = {ref: stack.enter_context(open_checkpoint(ref)) for ref in stage.refs()}
    return plan_stage(stage, ckpts, "r.yaml")


def test_split_layer() -> None:
    assert split_layer("model.layers.12.mlp.up_proj.weight") == (
        "model.layers.",
        12,
        ".mlp.up_proj.weight",
    )
    assert split_layer("transformer.h.3.attn.c_attn.weight") == (
        "transformer.h.",
        3,
        ".attn.c_attn.weight",
    )
    assert split_layer("model.language_model.layers.0.x") == (
        "model.language_model.layers.",
        0,
        ".x",
    )
    assert split_layer("model.embed_tokens.weight") is None
    assert split_layer("lm_head.weight") is None


def test_models_plan_sources_depth_and_params(family: dict[str, Path]) -> None:
    b, s1, s2 = (str(family[k]) for k in ("base", "sft1", "sft2"))
    text = f"""
merge_method: ties
base_model: {b}
models:
  - model: {s1}
    parameters: {{density: [0.2, 0.6], weight: 0.5}}
  - model: {s2}
parameters: {{lambda: [{{filter: mlp, value: 2.0}}, {{value: 1.0}}]}}
"""
    with ExitStack() as stack:
        p = plan(text, stack)
    assert p.refs == [b, s1, s2]
    assert p.aux_from is not None and p.aux_from.source.ref == b
    assert p.config_updates == {}
    by_name = {t.job.name: t for t in p.tensors}
    assert len(by_name) == 21 and p.tensors[0].job.name == "model.embed_tokens.weight"
    up1 = by_name["model.layers.1.mlp.up_proj.weight"]
    assert up1.job.sources == ((0, up1.job.name), (1, up1.job.name), (2, up1.job.name))
    assert up1.has_base and up1.model_ids == (s1, s2) and up1.t == 1.0
    assert up1.model_params == ({"weight": 0.5, "density": 0.6}, {})
    assert up1.global_params == {"lambda": 2.0}
    q0 = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q0.t == 0.0 and q0.model_params[0]["density"] == pytest.approx(0.2)
    assert q0.global_params == {"lambda": 1.0}
    assert by_name["model.embed_tokens.weight"].t == 0.0
    # mergekit's rule: the final norm and lm_head take the gradient's first value too
    assert by_name["model.norm.weight"].t == 0.0 and by_name["lm_head.weight"].t == 0.0
    assert by_name["lm_head.weight"].model_params[0]["density"] == pytest.approx(0.2)
    largest = 259 * 64  # the embedding and lm_head
    assert p.peak_memory_bytes() == 4 * (3 + 2) * largest + PEAK_CONSTANT_BYTES
    with ExitStack() as stack:  # ours, by choice: the top of the model at t = 1
        ends = {t.job.name: t for t in plan(text + "outer_depth: ends\n", stack).tensors}
    assert ends["model.norm.weight"].t == 1.0 and ends["lm_head.weight"].t == 1.0
    assert ends["lm_head.weight"].model_params[0]["density"] == pytest.approx(0.6)
    assert ends["model.embed_tokens.weight"].t == 0.0


def test_slices_renumber_and_rewrite_config(family: dict[str, Path]) -> None:
    s1, s2 = str(family["sft1"]), str(family["sft2"])
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {s1}, layer_range: [1, 2]}}]
  - sources: [{{model: {s2}, layer_range: [0, 2]}}]
"""
    with ExitStack() as stack:
        p = plan(text, stack)
    assert p.config_updates == {"num_hidden_layers": 3}
    reads = {t.job.name: (p.refs[t.job.sources[0][0]], t.job.sources[0][1]) for t in p.tensors}
    k = "model.layers.{}.mlp.up_proj.weight"
    assert reads[k.format(0)] == (s1, k.format(1))
    assert reads[k.format(1)] == (s2, k.format(0))
    assert reads[k.format(2)] == (s2, k.format(1))
    assert reads["model.embed_tokens.weight"][0] == s1 and reads["model.norm.weight"][0] == s2
    ts = {t.job.name: t.t for t in p.tensors}
    assert ts[k.format(0)] == 1.0  # a one-layer slice sits at t = 1
    assert (ts[k.format(1)], ts[k.format(2)]) == (0.0, 1.0)


def test_config_updates_pick_per_layer_lists(family: dict[str, Path]) -> None:
    s1 = str(family["sft1"])
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {s1}, layer_range: [1, 2]}}]
  - sources: [{{model: {s1}, layer_range: [0, 2]}}]
"""
    with ExitStack() as stack:
        p = plan(text, stack)
        aux = p.aux_from
        assert aux is not None
        aux.config = {"num_hidden_layers": 2, "layer_types": ["a", "b"], "layers_other": 7}
        ranges = [{"slices[0].sources[0].model": (1, 2)}, {"slices[1].sources[0].model": (0, 2)}]
        got = _config_updates(aux, p.stage, ranges, 3)
    assert got == {"num_hidden_layers": 3, "layer_types": ["b", "a", "b"]}


def test_repeated_models_get_distinct_ids() -> None:
    assert _model_ids(["a", "b", "a", "a"]) == ("a", "b", "a#2", "a#3")


def test_per_tensor_checks_name_the_tensor(family: dict[str, Path]) -> None:
    """della: epsilon 0.2 is fine at density 0.5 but not at density 0.1 (layer 0)."""
    b, s1 = str(family["base"]), str(family["sft1"])
    text = f"""
merge_method: della
base_model: {b}
models: [{{model: {s1}, parameters: {{density: [0.1, 0.5], epsilon: 0.2}}}}]
"""
    with ExitStack() as stack, pytest.raises(RecipeError) as err:
        plan(text, stack)
    # one line for the 12 tensors at depth 0: the embeddings, layer 0, the final norm, lm_head
    [(path, msg)] = err.value.problems
    assert path == "parameters" and "lower epsilon" in msg
    assert msg.startswith("tensor 'model.embed_tokens.weight' (and 11 more tensors)")


def test_vocabulary_mismatch_is_an_error(family: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from tests.conftest import load_state

    small = tmp_path / "small"
    shutil.copytree(family["sft2"], small)
    state = load_state(family["sft2"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:-3].contiguous()
    save_file(state, small / "model.safetensors")
    s1 = str(family["sft1"])
    models = f"merge_method: linear\nmodels: [{{model: {s1}}}, {{model: {small}}}]\n"
    with ExitStack() as stack, pytest.raises(MismatchError, match="vocabulary sizes differ"):
        plan(models, stack)
    sliced = (
        "merge_method: linear\nslices:\n  - sources:\n"
        f"    - {{model: {s1}, layer_range: [0, 2]}}\n"
        f"    - {{model: {small}, layer_range: [0, 2]}}\n"
    )
    with ExitStack() as stack, pytest.raises(RecipeError) as err:
        plan(sliced, stack)
    assert (
        "'model.embed_tokens.weight' has different shapes (vocabulary sizes differ; "
        "`tokenizer_source: union` merges them)" in str(err.value)
    )
