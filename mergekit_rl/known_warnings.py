"""Warnings that libraries raise on our behalf and that we know to be harmless.

They are ignored by category and message only, and only around our own calls into those
libraries (`harmless_warnings_ignored`), or in processes that run nothing else (the lab's
workers): any other warning, from the same libraries included, still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# (category, regular expression matched against the start of the message, why it is harmless)
HARMLESS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        FutureWarning,
        r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated and will be "
        r"removed in v6",
        "transformers 5 renamed gradient checkpointing to activation checkpointing; TRL's "
        "configs (gradient_checkpointing=True by default) and trainers still use the old "
        "names, which forward to the new ones",
    ),
)


def ignore_harmless_warnings() -> None:
    """Install the HARMLESS filters in this process's current warning filters."""
    for category, message, _ in HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def harmless_warnings_ignored() -> Iterator[None]:
    """The HARMLESS filters for the duration of the block; the previous filters after it."""
    with warnings.catch_warnings():
        ignore_harmless_warnings()
        yield
