"""Peak memory of a CPU training loop against `memory_plan` (test_memory).

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.train.memory_worker OPTIMIZER SEQUENCES TOKENS

A Llama (hidden 512, 4 layers, vocab 8000: 19.8M parameters, float32) trains 3 steps on random
tokens (causal LM loss), with AdamW or OnlineMergingAdamW. The peak resident memory (VmHWM)
counts from a baseline taken after every code path ran once on a tiny model (imports and
library caches are not the run's memory); with the mmap threshold fixed low every tensor is
mapped on its own and returned when freed, so resident memory follows live tensors. Prints
one JSON line: the measured peak and the plan's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mergekit_rl.train.memory import PlanSettings, memory_plan, model_shapes
from mergekit_rl.train.optim import OnlineMergingAdamW

CONFIG = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=False,
)  # fmt: skip


def status(key: str) -> int:
    """A /proc/self/status memory line in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key))
    return int(line.split()[1]) * 1024


def run(config: dict, optimizer: str, sequences: int, tokens: int, steps: int) -> None:
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        tau = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
        opt = OnlineMergingAdamW(model.named_parameters(), tau, mode=optimizer, reserve_p=0.01)
        del tau
    gc.collect()
    ids = torch.randint(0, config["vocab_size"], (sequences, tokens))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(optimizer: str, sequences: int, tokens: int) -> None:
    torch.set_num_threads(1)
    tiny = {**CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    run({**tiny, "vocab_size": 100}, optimizer, 2, 8, 1)  # warm up every code path
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    run(CONFIG, optimizer, sequences, tokens, 3)
    measured = status("VmHWM") - base
    shapes, arch = model_shapes({"model_type": "llama", **CONFIG})
    settings = PlanSettings(
        dtype="float32", optimizer=optimizer, sequences=sequences, tokens=tokens
    )
    plan = memory_plan(shapes, arch, settings)
    print(json.dumps({"measured": measured, "plan": plan.total, "items": plan.items}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
