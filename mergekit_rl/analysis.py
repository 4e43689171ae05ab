"""Read-only views of checkpoints: `inspect` (what is in a model) and `diff` (how two differ)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .io.reader import check_compatible
from .io.safetensors_format import DTYPE_NAMES
from .ops import open_inputs

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def inspect_model(ref: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, dtypes, shards and size, from headers only."""
    with open_inputs([ref], allow_pickle) as (ckpt,):
        infos = [ckpt.info(n) for n in ckpt.names()]
        cfg = ckpt.config or {}
        dtypes = Counter(DTYPE_NAMES.get(i.dtype, str(i.dtype)) for i in infos)
        return {
            "model": ckpt.source.ref,
            "resolved": ckpt.source.identity,
            "architecture": (cfg.get("architectures") or [None])[0],
            "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers"),
            "hidden_size": cfg.get("hidden_size"),
            "vocab_size": cfg.get("vocab_size"),
            "tied_embeddings": ckpt.tied_embeddings,
            "parameters": sum(i.numel for i in infos),
            "tensors": len(infos),
            "dtypes": dict(dtypes),
            "shards": [p.name for p in ckpt.source.weight_files],
            "bytes": ckpt.nbytes,
            "metadata": ckpt.metadata,
        }


def layer_of(name: str) -> str:
    """Group key: 'layer 3' for transformer blocks, else 'embed', 'head' or 'other'."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in name:
        return "embed"
    if "lm_head" in name or name.endswith("norm.weight"):
        return "head"
    return "other"


@dataclass
class _Acc:
    """Running sums for one group of tensors (float64 to avoid cancellation)."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += v


def _pair_sums(a: Tensor, b: Tensor) -> dict[str, float]:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return {
        "aa": float(a @ a),
        "bb": float(b @ b),
        "ab": float(a @ b),
        "dd": float((a - b) @ (a - b)),
    }


def _summary(s: dict[str, float]) -> dict[str, float]:
    na, nb = s["aa"] ** 0.5, s["bb"] ** 0.5
    return {
        "rel_l2": (s["dd"] ** 0.5) / na if na > 0 else float("nan"),
        "cosine": s["ab"] / (na * nb) if na > 0 and nb > 0 else float("nan"),
    }


def diff_models(
    a: str | Path, b: str | Path, base: str | Path | None = None, allow_pickle: bool = False
) -> dict[str, Any]:
    """Per-tensor relative L2 distance ||a-b||/||a|| and cosine; with a base, task-vector stats.

    With a base, per layer: the task vectors' norms, their cosine and the sign-conflict rate
    (entries where both task vectors are non-zero and disagree in sign).
    """
    refs = [a, b] + ([base] if base is not None else [])
    with open_inputs(refs, allow_pickle) as ckpts:
        names = check_compatible(ckpts)
        tensors, groups = [], defaultdict(_Acc)
        for name in names:
            if not ckpts[0].info(name).dtype.is_floating_point:
                continue
            xa, xb = (c.read(name, torch.float32) for c in ckpts[:2])
            row: dict[str, Any] = {"tensor": name, **_summary(_pair_sums(xa, xb))}
            acc = groups[layer_of(name)]
            acc.add(**_pair_sums(xa, xb))
            if base is not None:
                xbase = ckpts[2].read(name, torch.float32)
                ta, tb = xa - xbase, xb - xbase
                tv = _pair_sums(ta, tb)
                both = (ta != 0) & (tb != 0)
                conflicts = float((both & (torch.sign(ta) != torch.sign(tb))).sum())
                row.update(_tv_summary(tv, conflicts, float(both.sum())))
                acc.add(
                    **{f"tv_{k}": v for k, v in tv.items()}, conf=conflicts, both=float(both.sum())
                )
            tensors.append(row)
        layers = []
        for key, acc in groups.items():
            s = acc.sums
            entry: dict[str, Any] = {"group": key, **_summary(s)}
            if base is not None:
                tv = {k[3:]: v for k, v in s.items() if k.startswith("tv_")}
                entry.update(_tv_summary(tv, s["conf"], s["both"]))
            layers.append(entry)
        return {
            "a": ckpts[0].source.ref,
            "b": ckpts[1].source.ref,
            "base": ckpts[2].source.ref if base is not None else None,
            "layers": layers,
            "tensors": tensors,
        }


def _tv_summary(tv: dict[str, float], conflicts: float, both: float) -> dict[str, float]:
    na, nb = tv["aa"] ** 0.5, tv["bb"] ** 0.5
    return {
        "tv_norm_a": na,
        "tv_norm_b": nb,
        "tv_cosine": tv["ab"] / (na * nb) if na > 0 and nb > 0 else float("nan"),
        "sign_conflict": conflicts / both if both > 0 else 0.0,
    }
