"""The IO floor: the least work any merge of these inputs must do, measured the same way.

    python bench/floor.py --inputs A B C --out DIR [--copies K]

For each tensor, in the first input's storage order (shard by shard, by offset), it reads that
tensor from every input with safetensors (`safe_open(...).get_tensor`, a copy out of the
memory map) and writes the first input's bytes, raw, to K output files laid out like the
first input's shards (DIR/copy-k/<shard name>). So it reads every input byte once and writes K
models' bytes, with no math, no dtype conversion, no headers or index. K = 1 for a merge with
one output; K = 5 matches a 5-alpha interpolation sweep.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open


def shard_files(model: Path) -> list[Path]:
    index = model / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model / n for n in names]
    return [model / "model.safetensors"]


def storage_order(path: Path) -> list[str]:
    """Tensor names of one safetensors file by data offset (safe_open lists them sorted)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def run(inputs: list[Path], out: Path, copies: int) -> int:
    handles = []  # per input: tensor name -> open safe_open handle
    for model in inputs:
        by_name = {}
        for f in shard_files(model):
            h = safe_open(f, framework="pt")
            by_name.update(dict.fromkeys(h.keys(), h))
        handles.append(by_name)
    written = 0
    for shard in shard_files(inputs[0]):
        sinks = []
        for k in range(copies):
            (out / f"copy-{k}").mkdir(parents=True, exist_ok=True)
            sinks.append(open(out / f"copy-{k}" / shard.name, "wb"))  # noqa: SIM115
        for name in storage_order(shard):
            tensors = [h[name].get_tensor(name) for h in handles]
            raw = tensors[0].contiguous().reshape(-1).view(torch.uint8).numpy()
            for s in sinks:
                s.write(raw.data)
                written += raw.nbytes
            del tensors, raw
        for s in sinks:
            s.close()
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=1)
    args = ap.parse_args()
    written = run(args.inputs, args.out, args.copies)
    print(json.dumps({"bytes_written": written}))


if __name__ == "__main__":
    main()
