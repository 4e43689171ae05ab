"""Recipe runs on tiny models, checked against naive full-state-dict computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergekit_rl.errors import OutputExistsError, RecipeError
from mergekit_rl.recipe.checks import load_pipeline
from mergekit_rl.recipe.run import RECIPE_FILE, MergeOptions, merge_file, plan_file
from mergekit_rl.tiny import build_family
from tests.conftest import assert_states_close, load_state

LAYERS = 3


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-layer family, so that a gradient has a value strictly inside its range."""
    return build_family(tmp_path_factory.mktemp("deep"), layers=LAYERS, hidden=32)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run(recipe: Path, out: Path, **kw) -> list:
    return merge_file(recipe, out, MergeOptions(**kw))


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


# ---- naive references (float64, whole state dicts) -------------------------------------------


def naive_ties(base, models, weights, densities, at_least_one=True):
    """TIES on one tensor: top-k |delta| per model, majority sign of the weighted sum (0 -> +),
    mean over agreeing models weighted by w, added to base. k = int(d * n), raised to 1 for any
    d > 0 with mergekit's rule (at_least_one)."""
    b = base.double()
    kept = []
    for x, d in zip(models, densities, strict=True):
        delta = x.double() - b
        k = int(d * delta.numel())
        if at_least_one and d > 0:
            k = max(k, 1)
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        if k > 0:
            mask[delta.abs().flatten().topk(k).indices] = True
        kept.append(delta * mask.reshape(delta.shape))
    weighted = [w * k for w, k in zip(weights, kept, strict=True)]
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    num = sum(wk * (torch.sign(wk) == sign) for wk in weighted)
    den = sum(w * (torch.sign(wk) == sign) for w, wk in zip(weights, weighted, strict=True))
    den = torch.where(den == 0, torch.ones_like(den), den)
    return b + num / den


def naive_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.reshape(a.shape)


# ---- single merges -------------------------------------------------------------------------


def test_linear_with_relative_paths(family, tmp_path, monkeypatch):
    monkeypatch.chdir(family["base"].parent)
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n"
        "  - {model: sft1, parameters: {weight: 3}}\n"
        "  - {model: ./sft2, parameters: {weight: 1}}\n",
    )
    out = tmp_path / "out"
    [result] = run(recipe, out)
    assert result.status == "merged"
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    want = {k: (3 * a[k].double() + b[k].double()) / 4 for k in a}
    assert_states_close(load_state(out), want)
    saved = (out / RECIPE_FILE).read_text()
    [stage] = load_pipeline(saved, "saved")  # the saved recipe is itself a valid recipe
    assert [s.ref for s in stage.slices[0].sources] == ["sft1", "./sft2"]
    assert stage.recipe.seed == 0 and "seed: 0" in saved
    assert f"sft1 -> {family['sft1'].resolve()}" in saved
    assert saved.split("\n", 1)[1] in (out / "README.md").read_text()


def test_ties_matches_naive(family, tmp_path):
    recipe = write(
        tmp_path / "ties.yaml",
        f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {family["sft1"]}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {family["sft2"]}
    parameters: {{weight: 0.3, density: 0.8}}
""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    base, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    want = {k: naive_ties(base[k], [s1[k], s2[k]], [0.7, 0.3], [0.4, 0.8]) for k in base}
    assert_states_close(load_state(out), want, atol=1e-5)


@pytest.mark.parametrize("rule", [None, "mergekit", "floor"])
def test_ties_small_density_keeps_one_entry_like_mergekit(family, tmp_path, rule):
    """density 0.01 on 64-entry norm weights: int(0.64) = 0. mergekit (the default) keeps the
    largest entry of each task vector there; `topk_count: floor` keeps none (the base's norm)."""
    key = f"topk_count: {rule}\n" if rule else ""
    recipe = write(
        tmp_path / "ties.yaml",
        f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {family["sft1"]}
    parameters: {{weight: 1.0, density: 0.01}}
  - model: {family["sft2"]}
    parameters: {{weight: 0.6, density: 0.01}}
{key}""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    base, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    one = rule != "floor"
    want = {k: naive_ties(base[k], [s1[k], s2[k]], [1.0, 0.6], [0.01, 0.01], one) for k in base}
    got = load_state(out)
    assert_states_close(got, want, atol=1e-5)
    norm = "model.norm.weight"
    assert base[norm].numel() == 64
    changed = int((got[norm] != base[norm]).sum())
    assert changed == (0 if rule == "floor" else 2)  # each model's largest change (distinct)


@pytest.mark.parametrize("outer_depth", [None, "ends"])
def test_slerp_gradient_per_layer(deep_family, tmp_path, outer_depth):
    """t: [0.2, 0.8] gives 0.2, 0.5, 0.8 on the three layers; embeddings take t = 0 (0.2); the
    final norm and lm_head t = 0 too (mergekit's rule, the default), or t = 1 (0.8) with
    `outer_depth: ends`."""
    key = f"outer_depth: {outer_depth}\n" if outer_depth else ""
    recipe = write(
        tmp_path / "slerp.yaml",
        f"""
merge_method: slerp
base_model: {deep_family["base"]}
models: [{{model: {deep_family["rlhf"]}}}]
parameters: {{t: [0.2, 0.8]}}
{key}""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    base, rl = load_state(deep_family["base"]), load_state(deep_family["rlhf"])
    got = load_state(out)
    for name in base:
        layer = layer_of(name)
        if layer is not None:
            t = 0.2 + 0.6 * layer / (LAYERS - 1)
        else:
            t = 0.8 if outer_depth == "ends" and "embed" not in name else 0.2
        torch.testing.assert_close(
            got[name].double(), naive_slerp(base[name], rl[name], t), atol=1e-6, rtol=1e-5
        )


def test_filter_list_and_precedence(family, tmp_path):
    """A per-model value beats the global one; a filter entry applies to matching tensors."""
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {family["base"]}
models:
  - model: {family["sft1"]}
    parameters:
      weight: [{{filter: mlp, value: 2.0}}, {{value: 1.0}}]
  - model: {family["sft2"]}
parameters: {{weight: 0.5}}
""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    base, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    want = {
        k: base[k].double()
        + (2.0 if "mlp" in k else 1.0) * (s1[k].double() - base[k].double())
        + 0.5 * (s2[k].double() - base[k].double())
        for k in base
    }
    assert_states_close(load_state(out), want, atol=1e-5)


def test_tied_inputs_stay_tied(tied_family, tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {tied_family['sft1']}\n"
        f"  - model: {tied_family['sft2']}\ndtype: bfloat16\n",
    )
    out = tmp_path / "out"
    run(recipe, out)
    got = load_state(out)
    assert "lm_head.weight" not in got
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    import json

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


# ---- reproducibility -----------------------------------------------------------------------


def test_dare_is_bit_identical_per_seed(family, tmp_path):
    def recipe(seed: int) -> Path:
        return write(
            tmp_path / f"dare{seed}.yaml",
            f"""
merge_method: dare_ties
base_model: {family["base"]}
models:
  - {{model: {family["sft1"]}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {family["sft2"]}, parameters: {{weight: 0.5, density: 0.5}}}}
seed: {seed}
""",
        )

    run(recipe(1), tmp_path / "a")
    run(recipe(1), tmp_path / "b")
    run(recipe(2), tmp_path / "c")
    a, b, c = (load_state(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"]
    )


# ---- slices --------------------------------------------------------------------------------


def stack_recipe(models: dict[str, Path], tmp_path: Path) -> Path:
    """sft1's layers 0-1 stacked under sft2's layers 1-2 (a passthrough frankenmerge)."""
    return write(
        tmp_path / "stack.yaml",
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {models["sft1"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {models["sft2"]}, layer_range: [1, 3]}}]
""",
    )


def test_slices_load_with_transformers(deep_family, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = stack_recipe(deep_family, tmp_path)
    out = tmp_path / "out"
    run(recipe, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    got = model.state_dict()
    s1, s2 = load_state(deep_family["sft1"]), load_state(deep_family["sft2"])
    key = "model.layers.{}.self_attn.q_proj.weight"
    for out_layer, (src, in_layer) in enumerate([(s1, 0), (s1, 1), (s2, 1), (s2, 2)]):
        assert torch.equal(got[key.format(out_layer)], src[key.format(in_layer)])
    assert torch.equal(got["model.embed_tokens.weight"], s1["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], s2["model.norm.weight"])


def test_slice_gradient_is_per_slice(deep_family, tmp_path):
    """Two sources in one slice: depth runs over the slice's own layers."""
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
slices:
  - sources:
      - {{model: {deep_family["sft1"]}, layer_range: [1, 3], parameters: {{weight: [1.0, 0.0]}}}}
      - {{model: {deep_family["sft2"]}, layer_range: [0, 2], parameters: {{weight: [0.0, 1.0]}}}}
""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    got = load_state(out)
    s1, s2 = load_state(deep_family["sft1"]), load_state(deep_family["sft2"])
    key = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[key.format(0)], s1[key.format(1)])
    torch.testing.assert_close(got[key.format(1)], s2[key.format(1)])
    assert set(got) == {k for k in s1 if layer_of(k) in (None, 0, 1)}


# ---- pipelines, dry runs, errors -----------------------------------------------------------


def pipeline(family: dict[str, Path], tmp_path: Path) -> Path:
    return write(
        tmp_path / "pipe.yaml",
        f"""
name: soup
merge_method: linear
models: [{{model: {family["sft1"]}}}, {{model: {family["sft2"]}}}]
---
name: final
merge_method: task_arithmetic
base_model: {family["base"]}
models: [{{model: soup, parameters: {{weight: 2.0}}}}]
""",
    )


def test_pipeline_runs_then_skips(family, tmp_path):
    recipe, out = pipeline(family, tmp_path), tmp_path / "out"
    first = run(recipe, out)
    assert [r.status for r in first] == ["merged", "merged"]
    base, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    soup = {k: (s1[k].double() + s2[k].double()) / 2 for k in base}
    assert_states_close(load_state(out / "soup"), soup)
    want = {k: base[k].double() + 2 * (soup[k] - base[k].double()) for k in base}
    got = {k: v for k, v in load_state(out).items()}  # top-level files only
    assert_states_close(got, want, atol=1e-5)
    assert (out / "soup" / RECIPE_FILE).is_file()

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = run(recipe, out)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    forced = run(recipe, out, write=_forced())
    assert [r.status for r in forced] == ["merged", "merged"]
    assert (out / "soup" / "model.safetensors").is_file()


def _forced():
    from mergekit_rl.engine import RunOptions
    from mergekit_rl.ops import WriteOptions

    return WriteOptions(run=RunOptions(force=True, progress="none"))


def test_dry_run_writes_nothing_and_plans_pipeline(family, tmp_path):
    recipe, out = pipeline(family, tmp_path), tmp_path / "out"
    plan = plan_file(recipe, out, MergeOptions())
    assert not out.exists()
    soup, final = plan["stages"]
    assert soup["output"] == str(out / "soup") and final["output"] == str(out)
    assert [i["ref"] for i in final["inputs"]] == [str(family["base"]), "soup"]
    names = [t["name"] for t in final["tensors"]]
    assert names[0] == "model.embed_tokens.weight" and len(names) == 21
    assert final["tensors"][0]["model_params"] == {"soup": {"weight": 2.0}}
    assert final["bytes"] == sum(s["bytes"] for s in final["shards"])
    largest = max(math.prod(t["shape"]) for t in final["tensors"])
    assert final["peak_memory_bytes"] == 4 * 4 * largest + 400 * 2**20  # (2 inputs + 2) x f32


def test_missing_inputs_named_before_writing(family, tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {tmp_path / "nowhere"}
  - model: someorg/not-cached@main
""",
    )
    with pytest.raises(RecipeError) as err:
        run(recipe, tmp_path / "out")
    paths = [p for p, _ in err.value.problems]
    assert paths == ["models[0].model", "models[1].model"]
    assert "someorg/not-cached@main" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_refused(family, tmp_path):
    recipe = write(
        tmp_path / "r.yaml", f"merge_method: linear\nmodels: [{{model: {family['sft1']}}}]\n"
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        run(recipe, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")  # a folder a pipeline did not write
    with pytest.raises(OutputExistsError, match="not written by an rlmerge pipeline"):
        run(pipeline(family, tmp_path), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_pipeline_reruns_changed_stages_and_their_readers(family, tmp_path):
    recipe, out = pipeline(family, tmp_path), tmp_path / "out"
    run(recipe, out)
    text = recipe.read_text()
    write(recipe, text.replace("weight: 2.0", "weight: 3.0"))  # the last stage only
    assert [r.status for r in run(recipe, out)] == ["skipped", "merged"]
    base, soup = load_state(family["base"]), load_state(out / "soup")
    want = {k: base[k].double() + 3 * (soup[k].double() - base[k].double()) for k in base}
    assert_states_close(load_state(out), want, atol=1e-5)
    # the first stage changes: the stage reading it reruns although its own text is unchanged
    write(recipe, recipe.read_text().replace("name: soup\n", "name: soup\nout_dtype: float16\n"))
    assert [r.status for r in run(recipe, out)] == ["merged", "merged"]
    assert load_state(out / "soup")["model.norm.weight"].dtype == torch.float16


def test_shards_and_tokenizer_source(family, tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {family["base"]}
models: [{{model: {family["sft1"]}}}, {{model: {family["rlhf"]}}}]
tokenizer_source: {family["rlhf"]}
max_shard_size: 200KB
""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    import json

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    base, s1, rl = (load_state(family[k]) for k in ("base", "sft1", "rlhf"))
    want = {k: s1[k].double() + rl[k].double() - base[k].double() for k in base}
    assert_states_close(load_state(out), want, atol=1e-5)
    inputs = (out / RECIPE_FILE).read_text()
    assert f"{family['rlhf']} -> {family['rlhf'].resolve()}" in inputs
    assert (out / "tokenizer.json").read_bytes() == (family["rlhf"] / "tokenizer.json").read_bytes()


def test_layer_range_past_the_model_is_named(family, tmp_path):
    recipe = stack_recipe(family, tmp_path)  # layer 2 exists in deep_family only
    with pytest.raises(RecipeError) as err:
        run(recipe, tmp_path / "out")
    assert err.value.problems == [
        ("slices[1].sources[0].model", f"'{family['sft2']}' has 2 layers; layer 2 does not exist")
    ]
    assert not (tmp_path / "out").exists()


def test_single_file_output_keeps_the_recipe_in_metadata(family, tmp_path):
    from safetensors import safe_open

    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels: [{{model: {family['sft1']}}}, {{model: {family['sft2']}}}]\n",
    )
    out = tmp_path / "soup.safetensors"
    run(recipe, out)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert "merge_method: linear" in meta["rlmerge_recipe"]
    a, b = load_state(family["sft1"]), load_state(family["sft2"])
    assert_states_close(load_state(out), {k: (a[k] + b[k]) / 2 for k in a})


def test_one_model_twice_in_a_slice(deep_family, tmp_path):
    """A self-merge: the same model's layers 0-1 and 1-2 averaged (sources are told apart)."""
    m = deep_family["sft1"]
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
slices:
  - sources:
      - {{model: {m}, layer_range: [0, 2]}}
      - {{model: {m}, layer_range: [1, 3]}}
""",
    )
    out = tmp_path / "out"
    run(recipe, out)
    s, got = load_state(m), load_state(out)
    key = "model.layers.{}.mlp.up_proj.weight"
    for k in (0, 1):
        want = (s[key.format(k)].double() + s[key.format(k + 1)].double()) / 2
        torch.testing.assert_close(got[key.format(k)].double(), want, atol=1e-6, rtol=1e-6)


def test_dare_is_bit_identical_across_thread_counts(tmp_path):
    """A tensor large enough for torch to split its sums across threads (> 32768 entries)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(512, 300, generator=gen)
    for name, scale in (("base", 0.0), ("a", 0.01), ("b", 0.02)):
        (tmp_path / name).mkdir()
        w = base + scale * torch.randn(base.shape, generator=gen)
        save_file({"w": w}, tmp_path / name / "model.safetensors")
    recipe = write(
        tmp_path / "r.yaml",
        f"""
merge_method: dare_linear
base_model: {tmp_path / "base"}
models:
  - {{model: {tmp_path / "a"}, parameters: {{weight: 0.5, density: 0.3}}}}
  - {{model: {tmp_path / "b"}, parameters: {{weight: 0.5, density: 0.3}}}}
""",
    )
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            run(recipe, tmp_path / f"out{n}")
    finally:
        torch.set_num_threads(threads)
    outs = [load_state(tmp_path / f"out{n}")["w"] for n in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---- an unlisted base_model: merged in (linear, karcher), config and tokenizer from it ---------


def test_linear_merges_an_unlisted_base_as_mergekit_does(family, tmp_path):
    """mergekit 0.1.5 appends an unlisted base_model to a `models:` merge's inputs, with the
    global weight: (base + m1 + m2) / 3 here, not (m1 + m2) / 2."""
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nbase_model: {family['base']}\n"
        f"models: [{{model: {family['sft1']}}}, {{model: {family['sft2']}, "
        "parameters: {weight: 2}}]\nparameters: {weight: 0.5}\n",
    )
    run(recipe, tmp_path / "out")
    b, s1, s2 = (load_state(family[k]) for k in ("base", "sft1", "sft2"))
    want = {k: (0.5 * b[k].double() + 0.5 * s1[k].double() + 2 * s2[k].double()) / 3 for k in b}
    assert_states_close(load_state(tmp_path / "out"), want)
    # listed once already: merged once, not twice
    listed = write(
        tmp_path / "l.yaml",
        f"merge_method: linear\nbase_model: {family['base']}\n"
        f"models: [{{model: {family['base']}}}, {{model: {family['sft1']}}}]\n",
    )
    run(listed, tmp_path / "out2")
    want = {k: (b[k].double() + s1[k].double()) / 2 for k in b}
    assert_states_close(load_state(tmp_path / "out2"), want)


def test_karcher_merges_an_unlisted_base(family, tmp_path):
    from tests.merge.test_methods import ref_karcher_direction

    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: karcher\nbase_model: {family['base']}\n"
        f"models: [{{model: {family['sft1']}}}, {{model: {family['sft2']}}}]\n"
        "parameters: {max_iter: 200, tol: 1.0e-12}\n",
    )
    run(recipe, tmp_path / "out")
    got = load_state(tmp_path / "out")
    states = [load_state(family[k]) for k in ("sft1", "sft2", "base")]
    for k in got:
        xs = [s[k].double().flatten() for s in states]
        norms = [float(x.norm()) for x in xs]
        m = ref_karcher_direction([x / r for x, r in zip(xs, norms, strict=True)])
        want = (m * sum(norms) / 3).reshape(got[k].shape)
        torch.testing.assert_close(got[k].double(), want, atol=2e-6, rtol=1e-5, msg=k)


def _marked_base(family, root: Path) -> Path:
    """A copy of base whose config, tokenizer config and chat template can be told apart."""
    import json
    import shutil

    base = root / "marked-base"
    shutil.copytree(family["base"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rlmerge_test_marker": "base"}))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 777}))
    (base / "chat_template.jinja").write_text("{{ 'base template' }}")
    return base


@pytest.mark.parametrize("method", ["linear", "karcher", "passthrough"])
@pytest.mark.parametrize("key", ["tokenizer_source: base", "tokenizer: {source: base}"])
def test_tokenizer_source_base_when_base_is_not_merged(family, tmp_path, method, key):
    import json

    base = _marked_base(family, tmp_path)
    if method == "passthrough":
        body = f"slices:\n  - sources: [{{model: {family['sft1']}, layer_range: [0, 2]}}]\n"
    else:
        body = f"models: [{{model: {family['sft1']}}}, {{model: {family['sft2']}}}]\n"
    recipe = write(
        tmp_path / "r.yaml", f"merge_method: {method}\nbase_model: {base}\n{body}{key}\n"
    )
    out = tmp_path / "out"
    run(recipe, out)
    assert json.loads((out / "config.json").read_text())["rlmerge_test_marker"] == "base"
    for name in ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    if method == "passthrough":  # the base is not merged: the weights are sft1's
        assert_states_close(load_state(out), load_state(family["sft1"]), atol=0)


def test_config_from_an_untied_base_keeps_a_tied_output_tied(tmp_path):
    """The output stores no lm_head (its inputs are tied): the config must say tied even when
    it comes from an untied base_model, or transformers would leave lm_head random."""
    import json

    from tests.arch_models import build_model, logits

    tied = build_model(tmp_path / "tied", "qwen2", tie=True, seed=1)
    untied = build_model(tmp_path / "untied", "qwen2", tie=False, seed=2)
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: passthrough\nbase_model: {untied}\ntokenizer_source: base\n"
        f"slices:\n  - sources: [{{model: {tied}, layer_range: [0, 2]}}]\n",
    )
    run(recipe, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]
    torch.testing.assert_close(logits(tmp_path / "out"), logits(tied), atol=0, rtol=0)


def test_dry_run_on_a_hub_id_fetches_headers_only(family, tmp_path, monkeypatch):
    """--dry-run plans a hub model from its safetensors headers (huggingface_hub's range-request
    metadata call, faked here from a cached header-only file) and downloads nothing."""
    import json
    import struct

    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
    from huggingface_hub.utils import TensorInfo as HubTensorInfo

    raw = (family["sft1"] / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    fixture = tmp_path / "header-only.safetensors"  # what the range requests return
    fixture.write_bytes(raw[: 8 + n])
    calls = []

    def fake_metadata(repo_id, *, revision=None, **kw):
        calls.append((repo_id, revision))
        header = json.loads(fixture.read_bytes()[8:])
        meta = header.pop("__metadata__", {})
        tensors = {
            k: HubTensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=v["data_offsets"])
            for k, v in header.items()
        }
        files = {"model.safetensors": SafetensorsFileMetadata(metadata=meta, tensors=tensors)}
        weight_map = dict.fromkeys(tensors, "model.safetensors")
        return SafetensorsRepoMetadata(None, False, weight_map, files)

    def no_download(*a, **kw):
        raise AssertionError(f"a dry run downloaded something: {a} {kw}")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_metadata)
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, no_download)
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels: [{{model: org/tiny@v1}}, {{model: {family['sft2']}}}]\n",
    )
    out = tmp_path / "out"
    plan = plan_file(recipe, out, MergeOptions())
    assert calls == [("org/tiny", "v1")]
    [stage] = plan["stages"]
    assert stage["inputs"][0] == {"ref": "org/tiny@v1", "resolved": "org/tiny@v1", "revision": None}
    want = load_state(family["sft1"])
    planned = {t["name"]: t for t in stage["tensors"]}
    assert set(planned) == set(want)
    assert all(planned[k]["shape"] == list(v.shape) for k, v in want.items())
    assert planned["lm_head.weight"]["sources"][0] == ["org/tiny@v1", "lm_head.weight"]
    assert not out.exists()
    with pytest.raises(AssertionError, match="downloaded"):  # a real run must download
        run(recipe, out)


def test_mergekit_rule_keys_are_validated() -> None:
    """topk_count / outer_depth take their documented values only (pydantic schema)."""
    text = "merge_method: linear\nmodels: [{model: a}]\ntopk_count: ceil\nouter_depth: top\n"
    with pytest.raises(RecipeError) as err:
        load_pipeline(text, "r.yaml")
    paths = [p for p, _ in err.value.problems]
    assert "topk_count" in paths and "outer_depth" in paths
    assert "'mergekit' or 'floor'" in str(err.value)
