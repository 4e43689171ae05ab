"""The lab's data, made from templates with a seeded RNG (nothing is downloaded).

- "pretraining" text: plain sentences about everyday things, plus movie reviews of mixed
  sentiment; the held-out text is drawn from the same grammar (its perplexity is the alignment
  tax: a policy that only says "great" forgets how the rest of the language goes);
- SFT set: a review opening (prompt) and its continuation, positive and negative words drawn
  with equal odds, so the SFT model is neutral on average;
- prompts: review openings for RL (train) and evaluation (held out);
- the task, as in the Elastic Reset paper's IMDB setting: continue a review positively, scored
  by VADER's compound sentiment.

Held out means never seen in training: a fixed share of the (subject, verb) pairs of reviews and
of the (thing, action) pairs of plain sentences is kept for evaluation only. The corpus, the SFT
examples and the train prompts use the other pairs; each eval prompt is a distinct held-out
pair, and every held-out line holds a held-out pair, so no eval prompt is a training prompt and
no held-out line is a corpus line (each has a word pair, hence a 4-gram, that the corpus lacks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["great", "wonderful", "excellent", "good", "beautiful", "brilliant", "lovely", "fun"]
NEGATIVE = ["terrible", "awful", "bad", "boring", "horrible", "dull", "poor", "ugly"]
SUBJECTS = [
    "the movie",
    "the film",
    "the acting",
    "the story",
    "the ending",
    "the music",
    "the plot",
    "the cast",
    "the script",
    "the camera work",
    "the dialogue",
    "the director",
    "the soundtrack",
    "the pacing",
    "the lead actor",
    "the costumes",
]
VERBS = ["was", "felt", "seemed", "looked", "sounded", "became"]
THINGS = ["the train", "the farmer", "the river", "a teacher", "the old house", "my neighbour"]
ACTIONS = ["crossed", "painted", "visited", "carried", "followed", "cleaned"]
OBJECTS = ["the bridge", "a small boat", "the garden", "the market", "a red door", "the hill"]
TIMES = ["in the morning", "after lunch", "on sunday", "before the rain", "at night"]


Pair = tuple[str, str]


def _split(pairs: list[Pair], held: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs): a fixed seeded choice of `held` pairs (the same for
    every lab run, so quick and default runs hold out the same ones)."""
    order = list(pairs)
    random.Random(20_001).shuffle(order)
    return order[held:], order[:held]


# 40 of 96 review openings and 9 of 36 plain-sentence openings are never trained on
REVIEW_TRAIN, REVIEW_HELD = _split([(s, v) for s in SUBJECTS for v in VERBS], 40)
PLAIN_TRAIN, PLAIN_HELD = _split([(t, a) for t in THINGS for a in ACTIONS], 9)


def review_clause(rng: random.Random, pairs: list[Pair]) -> str:
    """`the plot was dull`: a (subject, verb) pair and a positive or negative word (even odds)."""
    subject, verb = rng.choice(pairs)
    words = POSITIVE if rng.random() < 0.5 else NEGATIVE
    return f"{subject} {verb} {rng.choice(words)}"


def review(rng: random.Random, pairs: list[Pair]) -> str:
    joiner = rng.choice([" and ", " but ", " , "])
    return review_clause(rng, pairs) + joiner + review_clause(rng, pairs) + " ."


def plain_sentence(rng: random.Random, pairs: list[Pair]) -> str:
    thing, action = rng.choice(pairs)
    return f"{thing} {action} {rng.choice(OBJECTS)} {rng.choice(TIMES)} ."


def corpus_line(rng: random.Random, held: bool = False) -> str:
    """A plain sentence or a review (even odds), from the training pairs or the held-out ones."""
    if rng.random() < 0.5:
        return plain_sentence(rng, PLAIN_HELD if held else PLAIN_TRAIN)
    return review(rng, REVIEW_HELD if held else REVIEW_TRAIN)


def sft_example(rng: random.Random) -> dict[str, str]:
    """prompt `the acting was`, completion ` brilliant but the music felt dull .`"""
    first = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
    joiner = rng.choice([" and ", " but ", " , "])
    return {
        "prompt": prompt_line(rng),
        "completion": f" {first}{joiner}{review_clause(rng, REVIEW_TRAIN)} .",
    }


def prompt_line(rng: random.Random) -> str:
    """A training review opening."""
    subject, verb = rng.choice(REVIEW_TRAIN)
    return f"{subject} {verb}"


def eval_prompt_lines(n: int) -> list[str]:
    """n distinct held-out review openings."""
    if n > len(REVIEW_HELD):
        raise ValueError(f"the lab holds out {len(REVIEW_HELD)} review openings, not {n}.")
    return [f"{s} {v}" for s, v in REVIEW_HELD[:n]]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(root: Path, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """Write corpus.txt, heldout.txt, sft.jsonl, prompts.jsonl, eval_prompts.jsonl under root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {
        k: root / n
        for k, n in [
            ("corpus", "corpus.txt"),
            ("heldout", "heldout.txt"),
            ("sft", "sft.jsonl"),
            ("prompts", "prompts.jsonl"),
            ("eval_prompts", "eval_prompts.jsonl"),
        ]
    }
    paths["corpus"].write_text("\n".join(corpus_line(rng) for _ in range(sizes["corpus"])) + "\n")
    held = random.Random(seed + 1)  # a separate stream for the held-out lines
    paths["heldout"].write_text(
        "\n".join(corpus_line(held, held=True) for _ in range(sizes["heldout"])) + "\n"
    )
    write_jsonl(paths["sft"], [sft_example(rng) for _ in range(sizes["sft"])])
    write_jsonl(paths["prompts"], [{"prompt": prompt_line(rng)} for _ in range(sizes["prompts"])])
    write_jsonl(
        paths["eval_prompts"], [{"prompt": p} for p in eval_prompt_lines(sizes["eval_prompts"])]
    )
    return paths


def tokenizer_corpus() -> list[str]:
    """Every word the templates use, so the BPE vocabulary holds each as one token."""
    words = POSITIVE + NEGATIVE + SUBJECTS + VERBS + THINGS + ACTIONS + OBJECTS + TIMES
    rng = random.Random(0)
    return [corpus_line(rng) for _ in range(2000)] + words * 5  # every word, held out or not
