"""Library exceptions.

Every user-facing failure is one of these types. Each also subclasses the matching builtin, so
callers can catch either. The CLI maps them to messages and exit codes in one table
(`mergekit_rl.cli.errors`): `UsageError` and its children exit 2 (found before any work),
`RunError` exits 1 (failed while running).
"""

from __future__ import annotations


class RLMergeError(Exception):
    """Base class of every rlmerge error."""


class UsageError(RLMergeError, ValueError):
    """Bad usage or bad input, found before any output was written."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A model, file or hub id that does not exist."""


class PickleRefusedError(UsageError):
    """A pickle checkpoint given without --allow-pickle."""


class OutputExistsError(UsageError, FileExistsError):
    """The output exists (and --force was not given) or overlaps an input."""


class MismatchError(UsageError):
    """Inputs disagree on tensor names, shapes or vocabulary."""


class RecipeError(UsageError):
    """A recipe failed validation; `problems` holds every (yaml path, message) pair."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems)
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in the recipe:\n{lines}")


class RunError(RLMergeError, RuntimeError):
    """A failure while running (for example a non-finite output tensor)."""
