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
from typer.core import TyperGroup, TyperOption

from mergekit_rl import __version__

from . import demo, lab, lora, merge, models, plot, reproduce, train
from . import eval as eval_cli
from .errors import DEBUG

_display_type_rich = TyperOption.display_type_rich


def _flag_display_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """Help shows on/off flags as flags (`--json`), not `--json <bool>`: they take no value."""
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_display_type  # typer 0.29 labels every option's type


class _RLMergeGroup(TyperGroup):
    """Accept the global --debug anywhere before `--`: `rlmerge --debug soup ...` and
    `rlmerge soup ... --debug` both show tracebacks."""

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201 - click's signature
        cut = args.index("--") if "--" in args else len(args)
        DEBUG["on"] = "--debug" in args[:cut]
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RLMergeGroup,
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
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show tracebacks on errors (before or after the command name)."
        ),
    ] = False,
) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


models.register(app)
merge.register(app)
demo.register(app)
train.register(app)
lora.register(app)
reproduce.register(app)
eval_cli.register(app)
plot.register(app)
lab.register(app)


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
    app()


if __name__ == "__main__":
    main()
