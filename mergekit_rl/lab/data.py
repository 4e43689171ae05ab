"""The lab's data, made from templates with a seeded RNG (nothing is downloaded).

- "pretraining" text: plain sentences about everyday things, plus movie reviews of mixed
  sentiment; the held-out text is fresh draws from the same mixture (its perplexity is the
  alignment tax: a policy that only says "great" forgets how the rest of the language goes);
- SFT set: a review opening (prompt) and its continuation, positive and negative words drawn
  with equal odds, so the SFT model is neutral on average;
- prompts: review openings for RL (train) and evaluation (held out);
- the task, as in the Elastic Reset paper's IMDB setting: continue a review positively, scored
  by VADER's compound sentiment.
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
]
VERBS = ["was", "felt", "seemed", "looked"]
THINGS = ["the train", "the farmer", "the river", "a teacher", "the old house", "my neighbour"]
ACTIONS = ["crossed", "painted", "visited", "carried", "followed", "cleaned"]
OBJECTS = ["the bridge", "a small boat", "the garden", "the market", "a red door", "the hill"]
TIMES = ["in the morning", "after lunch", "on sunday", "before the rain", "at night"]


def review_clause(rng: random.Random, subject: str | None = None) -> str:
    """`the plot was dull`: a subject, a verb, and a positive or negative word (even odds)."""
    words = POSITIVE if rng.random() < 0.5 else NEGATIVE
    return f"{subject or rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(words)}"


def review(rng: random.Random) -> str:
    joiner = rng.choice([" and ", " but ", " , "])
    return review_clause(rng) + joiner + review_clause(rng) + " ."


def plain_sentence(rng: random.Random) -> str:
    return f"{rng.choice(THINGS)} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)} ."


def corpus_line(rng: random.Random) -> str:
    return plain_sentence(rng) if rng.random() < 0.5 else review(rng)


def sft_example(rng: random.Random) -> dict[str, str]:
    """prompt `the acting was`, completion ` brilliant but the music felt dull .`"""
    subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
    first = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
    joiner = rng.choice([" and ", " but ", " , "])
    return {
        "prompt": f"{subject} {verb}",
        "completion": f" {first}{joiner}{review_clause(rng)} .",
    }


def prompt_line(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}"


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
    held = random.Random(seed + 1)  # a separate stream: held-out lines are fresh draws
    paths["heldout"].write_text(
        "\n".join(corpus_line(held) for _ in range(sizes["heldout"])) + "\n"
    )
    write_jsonl(paths["sft"], [sft_example(rng) for _ in range(sizes["sft"])])
    write_jsonl(paths["prompts"], [{"prompt": prompt_line(rng)} for _ in range(sizes["prompts"])])
    write_jsonl(
        paths["eval_prompts"], [{"prompt": prompt_line(held)} for _ in range(sizes["eval_prompts"])]
    )
    return paths


def tokenizer_corpus() -> list[str]:
    """Every word the templates use, so the BPE vocabulary holds each as one token."""
    words = POSITIVE + NEGATIVE + SUBJECTS + VERBS + THINGS + ACTIONS + OBJECTS + TIMES
    rng = random.Random(0)
    return [corpus_line(rng) for _ in range(2000)] + words * 5
