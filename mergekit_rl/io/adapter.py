"""LoRA / PEFT adapters as inputs: `BASE+ADAPTER` is the base with the adapter merged in.

The reference syntax is mergekit's: `models/base+adapters/lora`, or hub ids with revisions,
`org/base@rev+org/lora@rev`. A path that exists as written is never split on "+"
(io/reference.py resolves both parts).

Merging is done tensor by tensor while the base streams: each adapted weight is read, its low-rank
update added in float32, and the result cast back to the stored dtype, so the full merged model is
never held in memory (only the adapter's small factors are). The update is the one `peft`'s
`merge_and_unload()` applies:

    Linear    W [out, in]  += B [out, r] @ A [r, in] * scale     (transposed with fan_in_fan_out)
    Embedding W [vocab, d] += (B [d, r] @ A [r, vocab]).T * scale
    scale = alpha / r  (alpha / sqrt(r) with use_rslora; alpha from alpha_pattern when it matches)

Full tensors in the adapter (`modules_to_save`, embedding layers saved with
`save_embedding_layers`) replace the base's before the update is added. Trainable tokens
(`trainable_token_indices`) replace the listed rows of their embedding with the adapter's
`trainable_tokens_delta` rows, as peft's merge does (`index_copy` on dim 0; despite its name the
tensor holds the new rows, not a difference). With tied embeddings (no lm_head stored) a LoRA
update of lm_head or of the embedding lands on the one shared matrix, as in peft where both
modules hold one tensor; a `modules_to_save` copy of either unties them, as peft's
merge_and_unload() does: the copy replaces that one, the other keeps the base's values.
A block of rows of a weight gets the same rows of the update (`apply(..., rows=)`), so a large
tensor can be merged block by block.
DoRA, LoRA biases and non-LoRA adapter types are refused with a message naming the adapter;
a malformed adapter (unreadable weights, a config that is not a JSON object, a bad regex in
`alpha_pattern`) is an error naming the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import MismatchError, UsageError
from .reference import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSource, ModelSource
from .safetensors_format import TensorInfo

PEFT_PREFIX = "base_model.model."
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # peft's TrainableTokens rows
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)


class BaseCheckpoint(Protocol):
    """What an adapter reads of the checkpoint it is merged into: `reader.Checkpoint`, which
    builds its adapter (`load_adapter`) and passes itself in."""

    source: ModelSource

    @property
    def shared_pair(self) -> tuple[str, str] | None: ...

    def has(self, name: str) -> bool: ...

    def info(self, name: str) -> TensorInfo: ...


# -- the merged weights ----------------------------------------------------------------------


# the update of a weight is computed this many rows (dim 0) at a time, on a grid from row 0:
# rows read in any blocks get the bits of a whole-tensor read (see LoraFactors.add_to_)
UPDATE_ROWS = 1024


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: W += transpose?(B @ A) * scale."""

    a: Tensor  # [r, in] (Linear) or [r, vocab] (Embedding)
    b: Tensor  # [out, r] (Linear) or [d, r] (Embedding)
    scale: float
    transpose: bool  # Embedding, or fan_in_fan_out Linear: the product is transposed

    def delta(self, device: torch.device | str = "cpu") -> Tensor:
        """The dense update in float32, shaped like the weight."""
        return self.add_to_(torch.zeros(self._shape(), device=device))

    def add_to_(self, w: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """w += transpose?(B @ A) * scale, in place, one fused matmul-add per chunk.

        `rows` (start, stop): w holds only those rows of the weight and gets those rows of the
        update. The weight's rows are updated in chunks of UPDATE_ROWS on a fixed grid from row
        0, each with the same matmul whichever range is read (a matmul's rounding can depend
        on its row count): a chunk that the range cuts runs whole on a padded copy. So every
        block of rows gets exactly the bits of a whole-tensor read."""
        start, stop = rows if rows is not None else (0, w.shape[0])
        a, b = self.a.to(w.device, torch.float32), self.b.to(w.device, torch.float32)
        for lo in range(start - start % UPDATE_ROWS, stop, UPDATE_ROWS):
            hi = min(lo + UPDATE_ROWS, self._shape()[0])
            first, last = max(lo, start), min(hi, stop)
            if (first, last) == (lo, hi):
                self._add_chunk(w[lo - start : hi - start], a, b, lo, hi)
                continue
            pad = w.new_zeros(hi - lo, *w.shape[1:])  # rows lo..hi, ours copied in
            pad[first - lo : last - lo] = w[first - start : last - start]
            self._add_chunk(pad, a, b, lo, hi)
            w[first - start : last - start] = pad[first - lo : last - lo]
        return w

    def _add_chunk(self, w: Tensor, a: Tensor, b: Tensor, lo: int, hi: int) -> None:
        """w [hi - lo, in] += rows lo..hi of the update; transposed, those are columns of A."""
        if self.transpose:  # (B @ A).T = A.T @ B.T
            w.addmm_(a[:, lo:hi].T, b.T, alpha=self.scale)
        else:
            w.addmm_(b[lo:hi], a, alpha=self.scale)

    def _shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)


class LoraAdapter:
    """A PEFT LoRA adapter matched to a base checkpoint's tensor names.

    `updates[name]` lists the low-rank factors to add to the tensor `name`; `replaced[name]`
    holds modules_to_save tensors. Keys are the names Checkpoint.info gives: a tied lm_head's
    are the embedding's, unless the adapter `unties` the pair. Built once per Checkpoint (the
    factors are small).
    """

    def __init__(self, source: AdapterSource, base: BaseCheckpoint):
        self.source = source
        self.config = _read_config(source)
        tensors = _read_weights(source)
        self.updates: dict[str, list[LoraFactors]] = {}
        self.replaced: dict[str, Tensor] = {}
        self.rows: dict[
            str, tuple[Tensor, Tensor]
        ] = {}  # trainable tokens: (index [n], rows [n, d])
        self.unties = False  # a modules_to_save copy of one of a tied pair (Checkpoint._untie)
        self._collect(tensors, base)

    def _collect(self, tensors: dict[str, Tensor], base: BaseCheckpoint) -> None:
        pairs: dict[str, dict[str, Tensor]] = {}  # module -> {lora_A | lora_embedding_A | ...}
        copies: set[str] = set()  # modules_to_save: the module's own copy, not a base layer
        for key, t in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            m = _LORA_KEY.match(name)
            if name.endswith(TOKENS_SUFFIX):
                module = name.removesuffix(TOKENS_SUFFIX)
                self._token_rows(module, t, self._stored(f"{module}.weight", base), base)
            elif m is None:  # modules_to_save / saved embedding layers: full tensors that replace
                copy = ".base_layer." not in name  # save_embedding_layers saves base layers
                for wrapper in (".modules_to_save.", ".base_layer.", ".default."):
                    name = name.replace(wrapper, ".")
                stored = self._stored(name, base)
                self.replaced[stored] = t
                if copy:
                    copies.add(stored)
            else:
                pairs.setdefault(m.group("module"), {})[m.group("part")] = t
        for module, parts in pairs.items():
            factors = self._factors(module, parts)
            name = self._stored(f"{module}.weight", base)
            self._check_shape(name, factors, base)
            self.updates.setdefault(name, []).append(factors)
        pair = base.shared_pair
        self.unties = pair is not None and bool(copies & set(pair))
        if pair is not None and not self.unties:
            self._share(*pair)

    def _share(self, out: str, inp: str) -> None:
        """A tied pair is one matrix: what the adapter does to lm_head lands on the embedding."""
        if out in self.updates:
            self.updates.setdefault(inp, []).extend(self.updates.pop(out))
        if out in self.replaced:
            self.replaced.setdefault(inp, self.replaced.pop(out))
        if out in self.rows:
            self.rows.setdefault(inp, self.rows.pop(out))

    def _factors(self, module: str, parts: dict[str, Tensor]) -> LoraFactors:
        emb = "lora_embedding_A" in parts  # Embedding layers store A [r, vocab], B [d, r]
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise UsageError(f"{self._where()}: module '{module}' has only {sorted(parts)}.")
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        return LoraFactors(a, b, self._scale(module, a.shape[0]), emb or fan_in_fan_out)

    def _scale(self, module: str, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", 8))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def _stored(self, name: str, base: BaseCheckpoint) -> str:
        """`name` as the base stores it, checked to be there (a tied lm_head counts; see
        _share). peft names GPT-2 modules `transformer.h.0...`; some files store `h.0...`."""
        unprefixed = name.partition(".")[2]
        if not base.has(name) and unprefixed and base.has(unprefixed):
            return unprefixed
        if not base.has(name):
            raise MismatchError(
                f"{self._where()} adapts '{name}', which the base model {base.source.ref} does "
                "not have: the adapter was trained on another architecture. Check BASE+ADAPTER."
            )
        return name

    def _token_rows(self, module: str, rows: Tensor, name: str, base: BaseCheckpoint) -> None:
        """Trainable tokens of `module`: its config indices and the rows [n, d] that replace
        them in the stored tensor `name`."""
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):  # {module name or suffix: indices}
            spec = next(
                (v for k, v in spec.items() if module == k or module.endswith(f".{k}")), None
            )
        ok = isinstance(spec, list) and all(type(i) is int for i in spec)
        want = tuple(base.info(name).shape)
        if not ok or len(want) != 2 or not all(0 <= i < want[0] for i in spec):
            raise UsageError(
                f"{self._where()}: trainable_token_indices in {self.source.root / ADAPTER_CONFIG} "
                f"gives no valid row indices of '{name}' {list(want)} for module '{module}' "
                f"(got {spec!r})."
            )
        if tuple(rows.shape) != (len(spec), want[1]):
            raise MismatchError(
                f"{self._where()}: the trainable tokens of '{name}' are {list(rows.shape)}, but "
                f"{len(spec)} indices of a {list(want)} matrix need [{len(spec)}, {want[1]}]: "
                "the adapter belongs to another base model."
            )
        self.rows[name] = (torch.tensor(spec, dtype=torch.long), rows)

    def _check_shape(self, name: str, f: LoraFactors, base: BaseCheckpoint) -> None:
        shape = tuple(f.b.shape[:1]) + tuple(f.a.shape[1:])
        want = tuple(base.info(name).shape)
        if (shape[::-1] if f.transpose else shape) != want:
            raise MismatchError(
                f"{self._where()}: the update of '{name}' has shape {list(shape)} but the base "
                f"{base.source.ref} stores {list(want)}: the adapter belongs to another base model."
            )

    def _where(self) -> str:
        return f"adapter '{self.source.ref}' ({self.source.root / ADAPTER_WEIGHTS})"

    def apply(self, name: str, weight: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """The tensor `name` with the adapter merged in (same dtype and device). `rows`
        (start, stop): `weight` is only those rows (dim 0), and gets the same rows of the
        replacement and of the update, so that blocks equal the whole tensor's rows."""
        if name in self.replaced:
            full = self.replaced[name]
            weight = (full if rows is None else full[rows[0] : rows[1]]).to(
                weight.device, weight.dtype
            )
        if name in self.rows:  # a new tensor: the caller's is never edited
            index, new = self.rows[name]
            if rows is not None:  # only the trainable tokens inside this block, block-relative
                inside = (index >= rows[0]) & (index < rows[1])
                index, new = index[inside] - rows[0], new[inside]
            weight = weight.index_copy(0, index.to(weight.device), new.to(weight))
        factors = self.updates.get(name)
        if not factors:
            return weight
        merged = weight.to(torch.float32)  # a copy unless the weight is float32 already
        if merged is weight:
            merged = weight.clone()  # never edit the caller's tensor
        for f in factors:
            f.add_to_(merged, rows)
        return merged.to(weight.dtype)


def _read_weights(source: AdapterSource) -> dict[str, Tensor]:
    path = source.root / ADAPTER_WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UsageError(
            f"adapter '{source.ref}': {path} cannot be read as safetensors ({e}); the file is "
            "damaged or truncated (an interrupted download or copy?). Fetch or save it again."
        ) from e


def _read_config(source: AdapterSource) -> dict[str, Any]:
    path = source.root / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid JSON ({e}).") from e
    if not isinstance(config, dict):
        raise UsageError(
            f"{path}: a PEFT adapter config is a JSON object (peft_type, r, lora_alpha, ...), "
            f"got {type(config).__name__}."
        )
    _check_patterns(config, path)
    kind = str(config.get("peft_type", "LORA")).upper()
    unsupported = [
        (kind != "LORA", f"peft_type {kind} (only LoRA adapters can be merged)"),
        (bool(config.get("use_dora")), "use_dora: true (DoRA rescales columns; not supported)"),
        (config.get("lora_bias") is True, "lora_bias: true"),
        (config.get("bias", "none") != "none", f"bias: {config.get('bias')}"),
    ]
    problems = [what for bad, what in unsupported if bad]
    if problems:
        raise UsageError(
            f"adapter '{source.ref}' ({path}) cannot be merged: {'; '.join(problems)}. Merge it "
            "with peft's merge_and_unload() and give the merged model instead."
        )
    return config


def _check_patterns(config: dict[str, Any], path: Path) -> None:
    """alpha_pattern / rank_pattern: objects whose keys are regular expressions."""
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise UsageError(f"{path}: {key} must be an object {{regex: value}}, got {patterns!r}.")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(
                    f"{path}: {key} key {pattern!r} is not a valid regular expression ({e})."
                ) from e


def load_adapter(ckpt: BaseCheckpoint) -> LoraAdapter | None:
    """The adapter a Checkpoint's source names, matched to that checkpoint (None without)."""
    adapter = getattr(ckpt.source, "adapter", None)
    return None if adapter is None else LoraAdapter(adapter, ckpt)
