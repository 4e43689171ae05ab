"""The final model written from FSDP2 (`fully_shard`) shards one gathered tensor at a time, on
2 CPU processes over gloo: the same files as the gathered write, bit for bit.

One launch of `tests.train.shard_write_worker` (about 20 s on 2 cores) runs a tiny bfloat16
Llama policy trained "in float32" (its weights moved by less than a bfloat16 ulp for most
entries), untied (written by `shard_write.stream_full_tensors` directly) and with tied
embeddings (through `run.write_final`, the trainer's call), with 259 vocabulary rows split
130 + 129.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from mergekit_rl.tiny import build_family
from mergekit_rl.train.run import saved_tensor
from tests.train.shard_write_worker import CASES
from tests.train.test_ddp import dpo_doc, gloo_ranks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
]
SEED = 42


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("shard_write")
    for case in CASES:
        fam = build_family(root / f"fam-{case}", tie=case == "tied", dtype=torch.bfloat16)
        doc = dpo_doc(fam, root / f"train-{case}", "ondare", 2)
        doc["training"]["seed"] = SEED
        (root / f"{case}.yaml").write_text(yaml.safe_dump(doc))
    return root, gloo_ranks("tests.train.shard_write_worker", str(root))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", CASES)
def test_streamed_files_equal_the_gathered_write(run: tuple[Path, list[dict]], case: str) -> None:
    """Every file of the streamed output (weights with their header and metadata, config,
    tokenizer, card, recipe) equals the one `run._write` makes from the unsharded model; the
    shards were uneven (130 / 129 embedding rows); the tied lm_head is stored once."""
    root, ranks = run
    sharded, plain = files(root / case / "sharded"), files(root / case / "plain")
    assert "model.safetensors" in sharded and "config.json" in sharded
    assert sharded == plain
    assert [r[case]["embed_rows"] for r in ranks] == [130, 129]
    names = load_file(root / case / "sharded" / "model.safetensors")
    assert ("lm_head.weight" in names) is (case == "untied")
    assert ranks[0][case]["names"] == ranks[1][case]["names"] == list(names)


@pytest.mark.parametrize("case", CASES)
def test_streamed_weights_are_the_stochastically_rounded_trained_weights(
    run: tuple[Path, list[dict]], case: str
) -> None:
    """Each written tensor is the trained float32 tensor rounded to bfloat16 with the bits keyed
    by (seed, tensor name), and the rounding did matter (entries that round-to-nearest would
    have written differently); transformers loads the output with these weights."""
    from transformers import AutoModelForCausalLM

    root, _ = run
    written = load_file(root / case / "sharded" / "model.safetensors")
    trained = load_file(root / case / "weights.safetensors")
    assert written.keys() == trained.keys()
    away_from_nearest = 0
    for name, w in trained.items():
        assert written[name].dtype == torch.bfloat16, name
        assert torch.equal(written[name], saved_tensor(name, w, torch.bfloat16, SEED)), name
        away_from_nearest += int((written[name] != w.to(torch.bfloat16)).sum())
    assert away_from_nearest > 1000
    model = AutoModelForCausalLM.from_pretrained(root / case / "sharded", dtype=torch.bfloat16)
    for name, p in model.state_dict().items():
        key = "model.embed_tokens.weight" if name not in written else name  # tied lm_head
        assert torch.equal(p, written[key]), name


@pytest.mark.parametrize("case", CASES)
def test_rank_0_holds_one_gathered_tensor_at_a_time(
    run: tuple[Path, list[dict]], case: str
) -> None:
    """Every DTensor is gathered once on each rank; on rank 0 no earlier gathered tensor is
    alive when the next gather starts, and exactly one (the one written) while the writer
    appends it."""
    _, ranks = run
    for r in ranks:
        assert r[case]["gathers"] == r[case]["dtensors"] == len(r[case]["names"])
    zero = ranks[0][case]
    assert zero["live_at_gather"] == [0] * zero["gathers"]
    assert zero["live_at_add"] == [1] * len(zero["names"])
    assert ranks[1][case]["live_at_add"] == []


def test_a_failure_on_the_writing_rank_stops_every_rank(run: tuple[Path, list[dict]]) -> None:
    """A NaN in rank 1's rows reaches rank 0 in the gathered embedding: rank 0 refuses it, rank
    1 is told (it does not wait in the next gather), and no output appears."""
    _, ranks = run
    assert "'model.embed_tokens.weight' contains NaN or Inf" in ranks[0]["nan"]["error"]
    assert "failed while writing tensor 'model.embed_tokens.weight'" in ranks[1]["nan"]["error"]
    assert ranks[0]["nan"]["output_exists"] is ranks[1]["nan"]["output_exists"] is False


def test_sharded_state_names_ignore_wrappers_and_drop_tied_twins() -> None:
    """A torch.compile wrapper's module name does not show in the names written (as in the
    unwrapped model's); a tied lm_head is kept once (the first name), as `run.unique_tensors`
    keeps it."""
    from transformers import LlamaForCausalLM

    from mergekit_rl.tiny import tiny_config
    from mergekit_rl.train.run import unique_tensors
    from mergekit_rl.train.shard_write import sharded_state

    model = LlamaForCausalLM(tiny_config(259, hidden=32, layers=2, tie=True))
    want = list(unique_tensors(model.state_dict()))
    wrapped = torch.compile(model)  # nothing compiles until it is called
    assert all(n.startswith("_orig_mod.") for n in wrapped.state_dict())
    state = sharded_state(wrapped)
    assert list(state) == want and "lm_head.weight" not in state
    assert state["model.layers.1.mlp.up_proj.weight"] is model.model.layers[1].mlp.up_proj.weight
