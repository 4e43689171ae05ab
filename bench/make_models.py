"""Generate random Llama checkpoints for the benchmarks, tensor by tensor.

    python bench/make_models.py --size 1.5B --n 3 --out bench/_work/1.5B

writes DIR/m1 ... DIR/mN: bf16, sharded safetensors with an index, and a config.json that
transformers loads as a LlamaConfig. m1 is a seeded random model; m2..mN are m1 plus small
seeded noise (std NOISE, a tenth of the weights' std), so m1 can serve as the base of
task-vector merges and the task vectors m_k - m1 are meaningful. All N models are written at
once through our streaming writer: one tensor is drawn, then appended to every model, so
generation holds one tensor (and its noisy copy) in memory whatever the model size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig

from mergekit_rl.io.writer import CheckpointWriter, Entry

# Llama-like shapes; vocab 32000, untied lm_head, full multi-head attention unless the size
# names its key/value heads (grouped-query attention, as TinyLlama).
SIZES: dict[str, dict[str, int]] = {
    "micro": dict(  # ~8 MB, for the smoke test
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4
    ),
    "tiny": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4
    ),
    "small": dict(  # 0.13B: the 0.5B family's largest tensors (32000 x 1024), 4 layers
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16
    ),
    "0.5B": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=26, num_attention_heads=16
    ),
    "0.35B": dict(  # the 1.1B layout at half the width: its tensors a quarter as large
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "1.1B": dict(  # TinyLlama-1.1B's shapes (the merge benchmarks' reference family)
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "1.5B": dict(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=28, num_attention_heads=16
    ),
}
VOCAB = 32000
STD = 0.02  # weights ~ N(0, STD^2); norms = 1
NOISE = 0.002  # fine-tuning deltas ~ N(0, NOISE^2)


def make_config(size: str) -> LlamaConfig:
    shape = {"num_key_value_heads": SIZES[size]["num_attention_heads"], **SIZES[size]}
    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
        **shape,
    )


def tensor_plan(cfg: LlamaConfig) -> list[Entry]:
    """(name, shape, dtype) of every tensor, in Hugging Face's save order."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    bf16 = torch.bfloat16
    plan: list[Entry] = [("model.embed_tokens.weight", (v, h), bf16)]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        plan += [
            (p + "self_attn.q_proj.weight", (h, h), bf16),
            (p + "self_attn.k_proj.weight", (kv, h), bf16),
            (p + "self_attn.v_proj.weight", (kv, h), bf16),
            (p + "self_attn.o_proj.weight", (h, h), bf16),
            (p + "mlp.gate_proj.weight", (i, h), bf16),
            (p + "mlp.up_proj.weight", (i, h), bf16),
            (p + "mlp.down_proj.weight", (h, i), bf16),
            (p + "input_layernorm.weight", (h,), bf16),
            (p + "post_attention_layernorm.weight", (h,), bf16),
        ]
    plan += [("model.norm.weight", (h,), bf16), ("lm_head.weight", (v, h), bf16)]
    return plan


def draw(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """float32 N(0, std^2) from its own generator: each tensor reproducible on its own."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).mul_(std)


def model_tensors(plan: list[Entry], n_models: int, seed: int) -> Iterator[list[torch.Tensor]]:
    """For each tensor of the plan, its bf16 value in every model (m1 first)."""
    for t, (name, shape, _) in enumerate(plan):
        base = draw(shape, STD, seed * 1_000_003 + t)
        if name.endswith("norm.weight"):
            base.add_(1.0)
        out = [base.to(torch.bfloat16)]
        for k in range(1, n_models):
            noise = draw(shape, NOISE, (seed + k) * 1_000_003 + t)
            out.append(noise.add_(base).to(torch.bfloat16))
            del noise
        yield out


def generate(size: str, n_models: int, out: Path, max_shard: int, seed: int, force: bool) -> None:
    cfg = make_config(size)
    plan = tensor_plan(cfg)
    dirs = [out / f"m{k + 1}" for k in range(n_models)]
    if all((d / "config.json").exists() for d in dirs) and not force:
        print(f"{out}: {n_models} models already there (use --force to regenerate)")
        return
    n_params = sum(torch.Size(s).numel() for _, s, _ in plan)
    print(f"{size}: {n_params / 1e9:.3f}B parameters, {2 * n_params / 1e9:.2f} GB per model")
    t0 = time.time()
    meta = {"format": "pt"}
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(CheckpointWriter(d, plan, meta, max_shard, force=force))
            for d in dirs
        ]
        for (name, _, _), values in zip(plan, model_tensors(plan, n_models, seed), strict=True):
            for w, v in zip(writers, values, strict=True):
                w.add(name, v)
        for w in writers:
            w.add_file("config.json", cfg.to_json_string())
    print(f"wrote {n_models} models to {out} in {time.time() - t0:.1f} s")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, mult in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), required=True)
    ap.add_argument("--n", type=int, default=3, help="number of models (m1 + noisy copies)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-shard-size", default="1GB", help="shard size, e.g. 1GB (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate existing models")
    args = ap.parse_args(argv)
    generate(args.size, args.n, args.out, parse_size(args.max_shard_size), args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
