"""`rlmerge eval`: score checkpoints side by side on reward and drift (the alignment tax).

For each model, on the same prompts with the same seed:
- reward: completions sampled per prompt (batched, left-padded), scored by a reward that
  `rlmerge train` accepts; mean and standard error over all samples;
- KL(model || reference) per token: the exact KL over the vocabulary at each completion
  position of the model's own samples, summed over tokens and divided by their count (an
  unbiased estimate of the per-token sequence KL);
- perplexity on held-out text: exp(total NLL / tokens);
- win rate against the reference: each sample's reward against the reference's sample for the
  same prompt and sample index (ties count one half).
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import Tensor, nn

from ..errors import InputNotFoundError, UsageError
from ..train.data import read_records
from ..train.recipe import RewardSpec, known_keys
from . import metrics

OnBatch = Callable[[str, int, int], None]  # (model label, batches done, batches in all)


def read_lines(
    path: str | Path, what: str, key: str = "prompt", limit: int | None = None
) -> list[str]:
    """The `key` text of each held-out record (train.data.read_records: .jsonl / .json objects,
    or one per line of any other file). Chat prompts (message lists) are refused: eval samples
    from plain text."""
    texts = []
    for n, record in enumerate(read_records(path, what, key, limit), 1):
        value = record[key]
        if not isinstance(value, str):
            raise UsageError(
                f"{what} {path} record {n}: '{key}' must be text; rlmerge eval does not take "
                "chat prompts (message lists) yet."
            )
        texts.append(value)
    return texts


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides the numbers; written beside them in every output."""

    prompts: str
    reward: dict[str, Any]  # a train recipe's `reward:` mapping
    reference: str | None = None
    heldout: str | None = None  # perplexity text: one document per line (or .jsonl "text")
    samples: int = 1  # completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0
    batch_size: int = 16
    max_prompts: int | None = None
    max_heldout: int | None = None
    max_length: int = 256  # held-out texts are cut to this many tokens
    win_rate: bool = False
    device: str = "cpu"
    allow_code: bool = False


@dataclass
class Samples:
    """A model's completions to the prompts (samples x prompts, prompt-major)."""

    prompts: list[str]
    texts: list[str]
    ids: list[list[int]]
    rewards: list[float] = field(default_factory=list)
    kl_sum: float = 0.0
    kl_tokens: float = 0.0


def parse_reward(text: str) -> dict[str, Any]:
    """`sentiment`, an inline YAML mapping (`{keyword: {words: [great]}}`), or a YAML file
    (a reward mapping, or a train recipe whose `reward:` is used) -> the checked mapping."""
    source = "--reward"
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise InputNotFoundError(f"--reward file '{text}' not found; check the path.")
        source, text = str(path), path.read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{source}: not valid YAML ({e}).") from e
    if isinstance(doc, dict) and "reward" in doc:
        doc = doc["reward"]
    if isinstance(doc, str):
        doc = {doc: {}}
    if not isinstance(doc, dict):
        raise UsageError(f"{source}: expected a reward name or mapping, got {doc!r}.")
    try:
        return RewardSpec.model_validate(doc).model_dump(exclude_none=True)
    except ValidationError as e:
        where = "; ".join(_reward_problems(e))
        keys = ", ".join(RewardSpec.model_fields)
        raise UsageError(f"{source}: invalid reward ({where}); rewards are {keys}.") from e


def _reward_problems(err: ValidationError) -> list[str]:
    """'sentimnet: unknown reward (did you mean sentiment?)', with the train recipe's hints for
    keys inside a reward; pydantic's own message otherwise."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), known_keys(("reward", *loc)), n=1)
            what = "unknown reward" if len(loc) == 1 else "unknown key"
            out.append(f"{where}: {what}" + (f" (did you mean {hint[0]}?)" if hint else ""))
        else:
            out.append(f"{where}: {e['msg']}")
    return out


class Scorer:
    """The weighted sum of a reward mapping's functions; reward models are loaded here."""

    def __init__(self, reward: dict[str, Any], device: str, allow_code: bool) -> None:
        from ..train.rewards import build_rewards

        spec = RewardSpec.model_validate(reward)
        if spec.function is not None and not allow_code:
            raise UsageError(
                "reward.function runs Python code named by the caller; pass --allow-code."
            )
        funcs, self.weights = build_rewards(spec)
        self.funcs = [f if callable(f) else _reward_model(f, device) for f in funcs]

    def __call__(self, prompts: list[str], texts: list[str], ids: list[list[int]]) -> list[float]:
        total = [0.0] * len(texts)
        for f, w in zip(self.funcs, self.weights, strict=True):
            values = f(prompts, texts, completion_ids=ids)
            total = [t + w * float(v or 0.0) for t, v in zip(total, values, strict=True)]
        return total


def _reward_model(path: str, device: str) -> Callable[..., list[float]]:
    """A one-label sequence classifier scoring prompt + completion (as TRL's GRPO does)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def score(prompts: Sequence[str], completions: Sequence[str], **kw: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True).to(device)
        return model(**batch).logits[:, 0].float().tolist()

    return score


def load_model(ref: str, device: str) -> tuple[Any, nn.Module]:
    """Tokenizer (left padding, a pad token) and causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load: noise next to ours
    try:
        tok = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref)
    except OSError as e:
        raise InputNotFoundError(
            f"model '{ref}' cannot be loaded as a causal LM with its tokenizer ({e})."
        ) from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model.to(device).eval()


def _forward(model: nn.Module, seq: Tensor, attn: Tensor, keep: int) -> Tensor:
    """Logits [B, keep, V] of the last `keep` positions, with padding-aware positions.

    `logits_to_keep` spares the [B, T, V] logits of the prompt (GBs at a 150k vocabulary);
    models whose forward lacks it compute them all."""
    kw = dict(input_ids=seq, attention_mask=attn, position_ids=metrics.position_ids(attn))
    try:
        out = model(**kw, logits_to_keep=keep).logits
    except TypeError:
        out = model(**kw).logits
    return out[:, -keep:]


@torch.no_grad()
def sample(
    model: nn.Module,
    tok: Any,
    prompts: list[str],
    s: EvalSettings,
    reference: nn.Module | None = None,
    on_batch: OnBatch | None = None,
    label: str = "",
) -> Samples:
    """Sampled completions (seeded per batch, so every model sees the same random stream),
    and, with a reference, the summed per-token KL(model || reference) on them."""
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(s.samples)]
    out = Samples(rows, [], [])
    batches = math.ceil(len(rows) / s.batch_size)
    for b in range(batches):
        chunk = rows[b * s.batch_size : (b + 1) * s.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(s.seed * 100_003 + b)
            seq = model.generate(
                **enc,
                max_new_tokens=s.max_new_tokens,
                do_sample=s.temperature > 0,
                temperature=s.temperature if s.temperature > 0 else None,
                top_k=s.top_k or None,
                top_p=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # [B, P + C]
        prompt_len = enc["input_ids"].shape[1]
        completion = seq[:, prompt_len:]  # [B, C]
        mask = metrics.completion_mask(completion, tok.eos_token_id, tok.pad_token_id)
        for ids, m in zip(completion.tolist(), mask.tolist(), strict=True):
            kept = [i for i, keep in zip(ids, m, strict=True) if keep]
            out.ids.append(kept)
            out.texts.append(tok.decode(kept, skip_special_tokens=True))
        if reference is not None and completion.shape[1] > 0:
            attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)  # [B, P + C]
            keep = completion.shape[1] + 1  # position P-1 predicts the first completion token
            lp = _forward(model, seq, attn, keep)[:, :-1]
            lq = _forward(reference, seq, attn, keep)[:, :-1]
            kl, n = metrics.token_kl(lp, lq, mask)
            out.kl_sum += kl.item()  # one sync per batch
            out.kl_tokens += n.item()
        if on_batch:
            on_batch(label, b + 1, batches)
    return out


@torch.no_grad()
def perplexity(model: nn.Module, tok: Any, texts: list[str], s: EvalSettings) -> float:
    """exp(total NLL / total predicted tokens) over the held-out texts, batched."""
    device = next(model.parameters()).device
    nll, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for b in range(0, len(texts), s.batch_size):
        enc = tok(
            texts[b : b + s.batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=s.max_length,
        ).to(device)
        attn = enc["attention_mask"]  # [B, T]
        logits = model(
            input_ids=enc["input_ids"], attention_mask=attn, position_ids=metrics.position_ids(attn)
        ).logits
        # logits at t predict token t+1; count a target only where both are real tokens
        mask = (attn[:, 1:] * attn[:, :-1]).float()
        n, c = metrics.token_nll(logits[:, :-1], enc["input_ids"][:, 1:], mask)
        nll, count = nll + n, count + c
    return math.exp(nll.item() / count.item()) if count.item() else float("nan")


def evaluate(
    models: Sequence[str],
    s: EvalSettings,
    labels: Sequence[str] | None = None,
    on_batch: OnBatch | None = None,
) -> list[dict[str, Any]]:
    """One row per model: reward (mean, se), kl, ppl, win_rate, example completions."""
    prompts = read_lines(s.prompts, "prompts file", limit=s.max_prompts)
    heldout = (
        read_lines(s.heldout, "held-out text", key="text", limit=s.max_heldout)
        if s.heldout
        else None
    )
    scorer = Scorer(s.reward, s.device, s.allow_code)
    labels = list(labels) if labels else [str(m) for m in models]
    ref_model, ref_samples = None, None
    if s.reference is not None:
        ref_tok, ref_model = load_model(s.reference, s.device)
        if s.win_rate:
            ref_samples = sample(ref_model, ref_tok, prompts, s, None, on_batch, "reference")
            ref_samples.rewards = scorer(ref_samples.prompts, ref_samples.texts, ref_samples.ids)
    elif s.win_rate:
        raise UsageError("--win-rate compares against the reference: give --reference.")
    rows = []
    for ref, label in zip(models, labels, strict=True):
        t0 = time.time()
        tok, model = load_model(ref, s.device)
        got = sample(model, tok, prompts, s, ref_model, on_batch, label)
        got.rewards = scorer(got.prompts, got.texts, got.ids)
        mean, se = metrics.mean_se(got.rewards)
        rows.append(
            {
                "model": str(ref),
                "label": label,
                "reward": mean,
                "reward_se": se,
                "kl": got.kl_sum / got.kl_tokens if got.kl_tokens else None,
                "ppl": perplexity(model, tok, heldout, s) if heldout else None,
                "win_rate": (
                    metrics.win_rate(got.rewards, ref_samples.rewards) if ref_samples else None
                ),
                "samples": len(got.texts),
                "mean_tokens": sum(len(i) for i in got.ids) / max(len(got.ids), 1),
                "examples": [p + t for p, t in zip(got.prompts[:3], got.texts[:3], strict=True)],
                "seconds": round(time.time() - t0, 2),
            }
        )
        del model
    return rows


def settings_dict(s: EvalSettings) -> dict[str, Any]:
    return asdict(s)


def write_csv(path: Path, rows: list[dict[str, Any]], s: EvalSettings) -> None:
    """Rows as CSV, the settings as one leading `# settings: {json}` comment line."""
    import csv
    import io

    cols = [
        "label",
        "model",
        "reward",
        "reward_se",
        "kl",
        "ppl",
        "win_rate",
        "samples",
        "mean_tokens",
    ]
    buf = io.StringIO()
    buf.write(f"# settings: {json.dumps(settings_dict(s))}\n")
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)  # never a half-written file under the final name
