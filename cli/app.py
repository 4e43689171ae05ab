"""The `rlmerge` command line: a thin layer over the mergekit_rl library.

Each command parses options, builds the same objects a YAML recipe would, calls one library
function and prints the result. Errors are mapped to messages and exit codes in cli/errors.py.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Annotated

import typer

from mergekit_rl import __version__

from . import demo, merge, models, train
from .errors import DEBUG

app = typer.Typer(
    name="rlmerge",
    help="Merge LLM checkpoints around RLHF: soups, interpolation, task vectors, recipe merges "
    "and training with online merging optimizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"rlmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    DEBUG["on"] = debug


models.register(app)
merge.register(app)
demo.register(app)
train.register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"rlmerge: warning: {message}", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM interrupts like Ctrl-C (temporary files removed, exit 130); a file-size limit
    (`ulimit -f`) becomes a write error naming the file (exit 1) instead of killing us."""
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main() -> None:
    install_signal_handlers()
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    app()


if __name__ == "__main__":
    main()
