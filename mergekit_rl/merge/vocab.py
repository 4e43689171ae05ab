"""Union vocabularies (`tokenizer_source: union`) and chat templates of merged tokenizers.

The union tokenizer starts from the base model's tokenizer (its ids are kept); every token of
another input's vocabulary (ids below that model's config vocab_size) that the base lacks is
appended: regular tokens first, in input order, then the inputs' added and special tokens (the
first input's settings for a token win).

Each input gets a permutation: for each union id, the model's own id for that token, or -1.
Its embedding rows (input embedding and lm_head alike) are gathered through it; a token the
model lacks gets a default row: the row of the one model that has it (the base counted among
the models), zeros when no model has it, the base's row when several have it and the base is
one of them, else the mean of their rows. The merge method then runs on the remapped tensors.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError

# Built-in chat templates, written from each format's public definition.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}
MIN_JINJA_CHARS = 20  # a shorter value (or one without '{') is a mistyped name, not a template


def chat_template_problem(value: str) -> str | None:
    """Why `value` is not a valid `chat_template` (a name, 'auto' or Jinja), or None."""
    if value == "auto" or value in CHAT_TEMPLATES:
        return None
    if len(value) < MIN_JINJA_CHARS or "{" not in value:
        names = ", ".join(["auto", *sorted(CHAT_TEMPLATES)])
        return f"unknown template {value!r}: use one of {names}, or a Jinja template string"
    return None


def pick_chat_template(value: str, tokenizers: Sequence[Any]) -> str | None:
    """The template text for `value`: a built-in name, 'auto' (the most common template among
    the inputs' tokenizers, the first one on a tie; None when none has one), or Jinja."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    found = [t.chat_template for t in tokenizers if isinstance(t.chat_template, str)]
    if not found:
        warnings.warn(
            "chat_template: auto found no chat template in the inputs' tokenizers; the output "
            "has none.",
            stacklevel=2,
        )
        return None
    counts = Counter(found)
    return max(found, key=lambda t: counts[t])  # max keeps the first of equal counts


def load_tokenizer(root: Path, ref: str) -> Any:
    """A model folder's tokenizer (transformers AutoTokenizer), or a UsageError naming it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"{ref}: cannot load its tokenizer from '{root}' ({e}); tokenizer_source: union and "
            "chat_template need each input's tokenizer files."
        ) from e


def build_union(
    tokenizers: Sequence[Any], vocab_sizes: Sequence[int], base: int = 0
) -> tuple[Any, list[Tensor]]:
    """The union tokenizer (a copy of tokenizers[base] with the missing tokens added) and one
    permutation per input: int64 [union size], the input's id for each union id or -1.

    vocab_sizes: each input's embedding rows (config vocab_size); ids at or beyond it are not
    counted as the model's tokens."""
    from tokenizers import AddedToken

    regular: dict[str, None] = {}  # ordered set
    added: dict[str, AddedToken] = {}
    for tok, size in zip(tokenizers, vocab_sizes, strict=True):
        decoder = tok.added_tokens_decoder  # id -> AddedToken
        names = {info.content for info in decoder.values()}
        for name, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size and name not in names:
                regular.setdefault(name, None)
        for idx, info in sorted(decoder.items()):
            if idx < size:
                added.setdefault(info.content, info)
    out = copy.deepcopy(tokenizers[base])
    have = out.get_vocab()
    new = [t for t in regular if t not in have and t not in added]
    if new:
        out.add_tokens(new)
    extra = [info for name, info in added.items() if name not in have]
    if extra:
        out.add_tokens(extra)
    return out, permutations(out, tokenizers, vocab_sizes)


def permutations(out: Any, tokenizers: Sequence[Any], vocab_sizes: Sequence[int]) -> list[Tensor]:
    """For each input: int64 [union size], its id for each union token, -1 where it has none."""
    union = out.get_vocab()
    size = max(union.values()) + 1
    perms = []
    for tok, vsize in zip(tokenizers, vocab_sizes, strict=True):
        vocab = tok.get_vocab()
        p = torch.full((size,), -1, dtype=torch.int64)
        for name, uid in union.items():
            idx = vocab.get(name, -1)
            if 0 <= idx < vsize:
                p[uid] = idx
        perms.append(p)
    return perms


def absent_tokens(perms: Sequence[Tensor]) -> int:
    """How many union ids no input has (their rows become zeros)."""
    present = torch.stack([p >= 0 for p in perms]).any(0)
    return int((~present).sum())


def padded_size(size: int, multiple: int | None) -> int:
    """`size` rounded up to a multiple of `multiple` (unchanged for None)."""
    return -(-size // multiple) * multiple if multiple else size


def remap_rows(
    xs: Sequence[Tensor], perms: Sequence[Tensor], base: int | None, rows: int | None = None
) -> list[Tensor]:
    """Each input's vocabulary tensor [its rows, ...] -> [rows, ...] (see the module doc).

    base: the position of the base model in xs, or None when it is not among them. rows: the
    output rows (a padded vocabulary, pad_to_multiple_of); rows past the union's tokens are
    the mean of each model's token rows. Whole tensors: besides xs, memory for len(xs) + 2
    union-sized tensors."""
    present = torch.stack([p >= 0 for p in perms])  # [n, size]
    count = present.sum(0)  # [size]
    gathered = []
    for x, p, has in zip(xs, perms, present, strict=True):
        own = x[p.clamp(min=0).to(x.device)]  # [size, ...]
        own[~has.to(x.device)] = 0  # rows of tokens it lacks: zeros until the defaults are known
        gathered.append(own)
    total = gathered[0].clone()  # absent rows are zeros: the sum of the rows that exist
    for g in gathered[1:]:
        total += g
    shape = (-1, *([1] * (total.dim() - 1)))
    default = total.div_(count.clamp(min=1).to(total.device, total.dtype).view(shape))
    if base is not None:  # several (or one) models have it and the base is one: the base's row
        default = torch.where(present[base].to(total.device).view(shape), gathered[base], default)
    out = gathered
    for g, has in zip(out, present, strict=True):  # in place: no second copy of every input
        missing = ~has.to(g.device)
        g[missing] = default[missing]
    extra = (rows or 0) - len(perms[0])
    if extra > 0:  # padding rows: the model's mean token row (a neutral start for new tokens)
        out = [torch.cat([t, t.mean(0, keepdim=True).expand(extra, *t.shape[1:])]) for t in out]
    return out


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files `save_pretrained` writes for a tokenizer: relative name -> content."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rlmerge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
