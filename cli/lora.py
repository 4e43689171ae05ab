"""`rlmerge lora extract`: a task vector's best rank-r approximation as a PEFT LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_rl.engine import parse_dtype

from .common import Device, Dtype, Force, Json, Quiet, command_line, emit_json, err_console
from .errors import boundary

lora_app = typer.Typer(help="LoRA adapters: extract one from a fine-tuned model.")


@lora_app.command("extract")
def extract(
    base: Annotated[str, typer.Argument(help="The base model (a path, hub id or BASE+ADAPTER).")],
    finetuned: Annotated[str, typer.Argument(help="The fine-tuned model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The adapter directory to write.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.", min=1)] = 16,
    device: Device = "cpu",
    dtype: Dtype = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Save a task vector's best rank-r approximation as a PEFT LoRA adapter.

    tau = finetuned - base is approximated by a truncated SVD of each linear layer's matrix;
    `peft` loads the adapter, and BASE+ADAPTER is then an input to every rlmerge command.
    Embedding, lm_head and norm changes are not carried (they are listed).

    Example: rlmerge lora extract models/base models/sft1 --rank 8 -o sft1-lora
    """
    with boundary("lora extract", json):
        from mergekit_rl.lora import extract_lora

        summary = extract_lora(
            base, finetuned, output, rank, device, parse_dtype(dtype), force, command_line()
        )
        if json:
            emit_json("lora extract", outputs=summary.outputs, **summary.to_dict())
        elif not quiet:
            dropped = f"; not carried: {len(summary.dropped)} tensors" if summary.dropped else ""
            err_console.print(
                f"[green]wrote[/green] {output}: rank {rank} on {summary.modules} matrices, "
                f"{summary.kept:.1%} of the task vector's squared norm kept{dropped}",
                soft_wrap=True,
            )


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")
