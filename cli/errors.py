"""The one table that maps library exceptions to messages and exit codes.

Exit codes: 0 success; 2 bad usage, bad recipe or bad input found before any work;
1 failure while running; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

import typer

from mergekit_rl.errors import (
    InputNotFoundError,
    MismatchError,
    OutputExistsError,
    PickleRefusedError,
    RecipeError,
    RunError,
    UsageError,
)

# (exception type, exit code, label); the first matching row wins, so subclasses come first.
ERROR_TABLE: list[tuple[type[BaseException], int, str]] = [
    (RecipeError, 2, "invalid recipe"),
    (PickleRefusedError, 2, "refused"),
    (InputNotFoundError, 2, "not found"),
    (OutputExistsError, 2, "output refused"),
    (MismatchError, 2, "inputs do not match"),
    (UsageError, 2, "error"),
    (RunError, 1, "failed"),
    (KeyboardInterrupt, 130, "interrupted; no output was written"),
    (MemoryError, 1, "out of memory; no output was written"),
    (OSError, 1, "I/O error; no output was written"),
]

DEBUG = {"on": False}  # set by the --debug global option


def classify(exc: BaseException) -> tuple[int, str]:
    for kind, code, label in ERROR_TABLE:
        if isinstance(exc, kind):
            return code, label
    return 1, "internal error (rerun with --debug for the traceback)"


@contextlib.contextmanager
def boundary(command: str = "", as_json: bool = False) -> Iterator[None]:
    """Turn library exceptions into one short stderr paragraph and an exit code; with --json,
    also the failure envelope on stdout (so a script reading stdout always gets one object)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the CLI boundary
        code, label = classify(exc)
        if DEBUG["on"]:
            traceback.print_exc()
        message = f"{label}: {str(exc) or type(exc).__name__}"
        print(f"rlmerge: {message}", file=sys.stderr)
        if as_json:
            from .common import json_error, print_json

            print_json(json_error(command, message, code))
        raise typer.Exit(code) from None
