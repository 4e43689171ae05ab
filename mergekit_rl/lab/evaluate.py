"""`rlmerge eval`: score checkpoints side by side on reward and drift (the alignment tax).

For each model, on the same prompts with the same seed:
- prompts are encoded as training feeds them (train.data.prompt_ids: the tokenizer's special
  tokens, BOS included where it adds one; the chat template for message lists);
- reward: completions sampled per prompt (batched, left-padded), scored by a reward that
  `rlmerge train` accepts, through the same scorer as training's held-out evaluation
  (train.rewards.score, reward models as train.rewards.RewardModel, the prompts file's other
  columns passed to reward functions by name); mean and standard error over all samples;
- KL per token between the distributions sampled from: at each completion position of the
  model's own samples, the exact KL over the vocabulary between the model's sampling
  distribution (logits / temperature, then top-k) and the reference's, processed the same way;
  summed over tokens and divided by their count. With greedy decoding (temperature 0) the
  sampler is a point mass, so the KL is of the untempered distributions (as training's held-out
  eval/kl). It is infinite where the model's top-k holds a token outside the reference's;
- perplexity on held-out text (train.data.document_ids): exp(total NLL / tokens);
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
from ..train.data import (
    document_ids,
    is_conversational,
    pad_left,
    prompt_ids,
    read_records,
    reward_columns,
)
from ..train.recipe import RewardSpec, known_keys
from . import metrics

OnBatch = Callable[[str, int, int], None]  # (model label, batches done, batches in all)


@dataclass
class Prompts:
    """Prompts (text or chat messages) and the file's other columns, as TRL passes them."""

    prompts: list[Any]
    columns: dict[str, list[Any]]
    where: str  # the file, for error messages


def read_prompts(path: str | Path, what: str, limit: int | None = None) -> Prompts:
    """Each record's `prompt` (text, or a list of chat messages) and its other fields as columns
    (train.data.read_records: .jsonl / .json objects, or one prompt per line of any other file)."""
    records = read_records(path, what, "prompt", limit)
    for n, r in enumerate(records, 1):
        if not (isinstance(r["prompt"], str) or is_conversational(r["prompt"])):
            raise UsageError(
                f"{what} {path} record {n}: 'prompt' must be text or a list of chat messages "
                f"(role, content), got {r['prompt']!r:.80}."
            )
    return Prompts([r["prompt"] for r in records], reward_columns(records), f"{what} {path}")


def read_documents(path: str | Path, what: str, limit: int | None = None) -> list[Any]:
    """The `text` of each held-out record (text or chat messages)."""
    return [r["text"] for r in read_records(path, what, "text", limit)]


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

    prompts: list[Any]  # one per completion: text or chat messages
    index: list[int]  # the prompt's row in the prompts file, per completion
    texts: list[str]  # decoded without special tokens, as TRL decodes completions
    ids: list[list[int]]  # up to and including the first eos
    rewards: list[float] = field(default_factory=list)
    kl_sum: float = 0.0
    kl_tokens: float = 0.0

    @property
    def completions(self) -> list[Any]:
        """What reward functions get, as in TRL: the text, or one assistant message for a chat
        prompt."""
        return [
            [{"role": "assistant", "content": t}] if is_conversational(p) else t
            for p, t in zip(self.prompts, self.texts, strict=True)
        ]


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
    """The weighted sum of a reward mapping's functions, through the scorer training's held-out
    evaluation uses (train.rewards.score; reward models as train.rewards.RewardModel)."""

    def __init__(
        self,
        reward: dict[str, Any],
        device: str,
        allow_code: bool,
        columns: Sequence[str] = (),
        where: str = "the prompts file",
    ) -> None:
        from ..train.rewards import RewardModel, build_rewards, check_columns

        spec = RewardSpec.model_validate(reward)
        if spec.function is not None and not allow_code:
            raise UsageError(
                "reward.function runs Python code named by the caller; pass --allow-code."
            )
        funcs, self.weights = build_rewards(spec)
        check_columns(funcs, list(columns), where)  # fail before any model is loaded
        self.funcs = [
            RewardModel(f, torch.device(device), torch.float32) if isinstance(f, str) else f
            for f in funcs
        ]

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        ids: list[list[int]],
        columns: dict[str, list[Any]] | None = None,
        tokenizer: Any = None,
    ) -> list[float]:
        """One reward per completion; `columns` hold one value per completion; `tokenizer`
        (the sampled model's) decodes `ids` for the keyword reward, as in training."""
        from ..train.rewards import score, with_tokenizer

        values = score(
            with_tokenizer(self.funcs, tokenizer),
            self.weights,
            prompts,
            completions,
            ids,
            columns,
            log_extra=_ignore,
            log_metric=_ignore,
        )
        return [float(v) for v in values]

    def samples(self, got: Samples, data: Prompts, tokenizer: Any) -> list[float]:
        """The rewards of completions sampled with `tokenizer`, each with its prompt's columns."""
        columns = {k: [v[i] for i in got.index] for k, v in data.columns.items()}
        return self(got.prompts, got.completions, got.ids, columns, tokenizer)


def _ignore(*args: Any, **kw: Any) -> None:
    """TRL's log_extra / log_metric hooks: eval reports only the rewards."""


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


def kl_definition(s: EvalSettings) -> str:
    """Which KL the `kl` column holds, in words (written beside it in the table and --json)."""
    if s.temperature == 0:
        return (
            "KL(model || reference) per token of the untempered next-token distributions, "
            "on the model's greedy completions"
        )
    proc = f"softmax(logits / {s.temperature:g})" + (f", top-{s.top_k}" if s.top_k else "")
    return (
        f"KL(model || reference) per token between the sampling distributions ({proc}, each "
        "model's own), on the model's samples"
    )


def encode(tok: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Each prompt's tokens as training feeds them (train.data.prompt_ids)."""
    return [prompt_ids(tok, p) for p in prompts]


@torch.no_grad()
def sample(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[Any],
    s: EvalSettings,
    reference: nn.Module | None = None,
    on_batch: OnBatch | None = None,
    label: str = "",
) -> Samples:
    """Sampled completions (seeded per batch, so every model sees the same random stream),
    and, with a reference, the summed per-token KL (kl_definition) on them."""
    device = next(model.parameters()).device
    encoded = encode(tok, prompts)
    index = [i for i in range(len(prompts)) for _ in range(s.samples)]
    out = Samples([prompts[i] for i in index], index, [], [])
    batches = math.ceil(len(index) / s.batch_size)
    for b in range(batches):
        chunk = index[b * s.batch_size : (b + 1) * s.batch_size]
        ids, attn = pad_left([encoded[i] for i in chunk], tok.pad_token_id)  # [B, P]
        ids, attn = ids.to(device), attn.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(s.seed * 100_003 + b)
            seq = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=s.max_new_tokens,
                do_sample=s.temperature > 0,
                temperature=s.temperature if s.temperature > 0 else None,
                top_k=s.top_k or None,
                top_p=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # [B, P + C]
        completion = seq[:, ids.shape[1] :]  # [B, C]
        mask = metrics.completion_mask(completion, tok.eos_token_id, tok.pad_token_id)
        for row, m in zip(completion.tolist(), mask.tolist(), strict=True):
            kept = [i for i, keep in zip(row, m, strict=True) if keep]
            out.ids.append(kept)
            out.texts.append(tok.decode(kept, skip_special_tokens=True))
        if reference is not None and completion.shape[1] > 0:
            full = torch.cat([attn, mask.long()], dim=1)  # [B, P + C]
            keep = completion.shape[1] + 1  # position P-1 predicts the first completion token
            lp = _forward(model, seq, full, keep)[:, :-1]  # [B, C, V]
            lq = _forward(reference, seq, full, keep)[:, :-1]
            kl, n = metrics.token_kl(lp, lq, mask, s.temperature, s.top_k)
            out.kl_sum += kl.item()  # one sync per batch
            out.kl_tokens += n.item()
        if on_batch:
            on_batch(label, b + 1, batches)
    return out


@torch.no_grad()
def perplexity(model: nn.Module, tok: Any, texts: Sequence[Any], s: EvalSettings) -> float:
    """exp(total NLL / total predicted tokens) over the held-out texts, batched; each text
    encoded as training's held-out perplexity encodes it, cut to its first max_length tokens."""
    device = next(model.parameters()).device
    docs = [document_ids(tok, t, "held-out text")[: s.max_length] for t in texts]
    nll, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for b in range(0, len(docs), s.batch_size):
        ids, attn = pad_left(docs[b : b + s.batch_size], tok.pad_token_id)  # [B, T]
        ids, attn = ids.to(device), attn.to(device)
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=metrics.position_ids(attn)
        ).logits
        # logits at t predict token t+1; count a target only where both are real tokens
        mask = (attn[:, 1:] * attn[:, :-1]).float()
        n, c = metrics.token_nll(logits[:, :-1], ids[:, 1:], mask)
        nll, count = nll + n, count + c
    return math.exp(nll.item() / count.item()) if count.item() else float("nan")


def example(tok: Any, prompt: Any, text: str) -> str:
    """A prompt and its completion as one string (a chat prompt through its template)."""
    if is_conversational(prompt):
        prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt + text


def evaluate(
    models: Sequence[str],
    s: EvalSettings,
    labels: Sequence[str] | None = None,
    on_batch: OnBatch | None = None,
) -> list[dict[str, Any]]:
    """One row per model: reward (mean, se), kl (and kl_definition), ppl, win_rate, example
    completions."""
    data = read_prompts(s.prompts, "prompts file", limit=s.max_prompts)
    heldout = read_documents(s.heldout, "held-out text", s.max_heldout) if s.heldout else None
    scorer = Scorer(s.reward, s.device, s.allow_code, list(data.columns), data.where)
    labels = list(labels) if labels else [str(m) for m in models]
    ref_model, ref_samples = None, None
    if s.reference is not None:
        ref_tok, ref_model = load_model(s.reference, s.device)
        if s.win_rate:
            ref_samples = sample(ref_model, ref_tok, data.prompts, s, None, on_batch, "reference")
            ref_samples.rewards = scorer.samples(ref_samples, data, ref_tok)
    elif s.win_rate:
        raise UsageError("--win-rate compares against the reference: give --reference.")
    rows = []
    for ref, label in zip(models, labels, strict=True):
        t0 = time.time()
        tok, model = load_model(ref, s.device)
        got = sample(model, tok, data.prompts, s, ref_model, on_batch, label)
        got.rewards = scorer.samples(got, data, tok)
        mean, se = metrics.mean_se(got.rewards)
        rows.append(
            {
                "model": str(ref),
                "label": label,
                "reward": mean,
                "reward_se": se,
                "kl": got.kl_sum / got.kl_tokens if got.kl_tokens else None,
                "kl_definition": kl_definition(s) if ref_model is not None else None,
                "ppl": perplexity(model, tok, heldout, s) if heldout else None,
                "win_rate": (
                    metrics.win_rate(got.rewards, ref_samples.rewards) if ref_samples else None
                ),
                "samples": len(got.texts),
                "mean_tokens": sum(len(i) for i in got.ids) / max(len(got.ids), 1),
                "examples": [
                    example(tok, p, t) for p, t in zip(got.prompts[:3], got.texts[:3], strict=True)
                ],
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
