"""Peak memory of a soup and a TIES merge of three models with a 256k-vocabulary embedding.

    python bench/bench_memory.py [--vocab 256000 --hidden 3072] [--keep]

Builds three bf16 checkpoints (base m1, fine-tunes m2 and m3: a [vocab, hidden] embedding plus
a few small tensors; 3 x 1.5 GB at the default size) under $RLMERGE_BENCH_WORK/vocab, then runs
`rlmerge soup m1 m2 m3` and `rlmerge merge` of a TIES recipe (m2, m3 over base m1, density
0.5) each in a fresh process, and reports each one's peak RSS (ru_maxrss of the child) above
that of a process that only imports torch. Target: under 1500 MB above idle torch for both
(the engine streams the embedding in row blocks; TIES finds each task vector's magnitude cut
in a streaming pass first). The models are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from harness import IDLE_TORCH, RLMERGE, WORK, machine, measure, save_json

from mergekit_rl.io.writer import CheckpointWriter

TARGET_MB = 1500.0
SMALL_ROWS = {"model.norm.weight": 0, "model.layers.0.mlp.up_proj.weight": 256}  # 0: a vector


def make_model(path: Path, vocab: int, hidden: int, noise_seed: int | None) -> None:
    """A bf16 checkpoint: base weights (seeded per row block), plus noise for a fine-tune.

    Written in row blocks through the checkpoint writer's parts, so building it needs no more
    memory than one block.
    """
    entries = [("model.embed_tokens.weight", (vocab, hidden), torch.bfloat16)]
    for name, rows in SMALL_ROWS.items():
        entries.append((name, (rows, hidden) if rows else (hidden,), torch.bfloat16))
    with CheckpointWriter(path, entries, force=True) as writer:
        order = [e for shard in writer.shards for e in shard.entries]  # the writer's plan order
        for i, (name, shape, dtype) in enumerate(order):
            writer.begin_tensor(name, dtype)
            rows = max(1, (1 << 22) // hidden) if len(shape) == 2 else shape[0]
            for b, start in enumerate(range(0, shape[0], rows)):
                part_shape = (min(rows, shape[0] - start), *shape[1:])
                g = torch.Generator().manual_seed(1000 * i + b)
                block = torch.randn(part_shape, generator=g) * 0.02
                if noise_seed is not None:
                    g = torch.Generator().manual_seed(noise_seed * 1_000_003 + 1000 * i + b)
                    block += torch.randn(part_shape, generator=g) * 0.002
                writer.write_part(block.to(dtype))
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        config.update(vocab_size=vocab, hidden_size=hidden, torch_dtype="bfloat16")
        writer.add_file("config.json", json.dumps(config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = ap.parse_args()
    root = WORK / "vocab"
    models = [root / f"m{i}" for i in (1, 2, 3)]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for i, m in enumerate(models):
            if not (m / "model.safetensors").exists():
                make_model(m, args.vocab, args.hidden, None if i == 0 else i)
        recipe = root / "ties.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "ties",
                    "base_model": str(models[0]),
                    "models": [
                        {"model": str(m), "parameters": {"density": 0.5}} for m in models[1:]
                    ],
                }
            )
        )
        idle = measure(IDLE_TORCH)
        runs = {
            "soup": [*RLMERGE, "soup", *map(str, models), "-o", str(root / "out-soup")],
            "ties": [*RLMERGE, "merge", str(recipe), "-o", str(root / "out-ties")],
        }
        rows = []
        for name, cmd in runs.items():
            got = measure([*cmd, "--quiet", "--force"])
            above = got.peak_rss_mb - idle.peak_rss_mb
            rows.append(
                {
                    "case": name,
                    "seconds": round(got.seconds, 1),
                    "peak_rss_mb": round(got.peak_rss_mb, 1),
                    "above_idle_torch_mb": round(above, 1),
                    "target_mb": TARGET_MB,
                    "ok": above < TARGET_MB,
                }
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    shape = f"{args.vocab} x {args.hidden} bf16"
    print(f"embedding {shape}; idle torch peak RSS {idle.peak_rss_mb:.0f} MB\n")
    print("| case | seconds | peak RSS MB | above idle torch MB | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = "ok" if r["ok"] else "MISSED"
        print(
            f"| {r['case']} | {r['seconds']} | {r['peak_rss_mb']:.0f} | "
            f"{r['above_idle_torch_mb']:.0f} | < {TARGET_MB:.0f} ({mark}) |"
        )
    out = {"embedding": shape, "idle_torch_mb": idle.peak_rss_mb, "runs": rows, **machine()}
    WORK.mkdir(parents=True, exist_ok=True)
    save_json(WORK / "memory.json", out)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
