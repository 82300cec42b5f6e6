"""`e4t export CONCEPT --format FORMAT --out DIR`: a concept as a fixed embedding and a LoRA."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.options import BaseModelOption, DeviceOption, ForceFlag, JsonFlag, PrecisionOption
from e4tcli.cli.output import print_json, reports_errors, stdout_console
from e4tcli.errors import UsageError
from e4tcli.export import DEFAULT_RANK


def parse_rank(value: str) -> int:
    if value == "full":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--rank '{value}' is not a positive number", hint="pass e.g. --rank 16, or --rank full")
    return int(value)


@reports_errors
def export(
    concept: Annotated[Path, typer.Argument(help="Concept file written by 'e4t tune'.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="diffusers (a folder for diffusers scripts) or kohya (AUTOMATIC1111, Forge, ComfyUI).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the files into.")],
    rank: Annotated[
        Optional[str], typer.Option("--rank", help=f"LoRA rank per layer, or 'full' (default: {DEFAULT_RANK}).")
    ] = None,
    token: Annotated[
        Optional[str],
        typer.Option("--token", help="The word to type in prompts (default: from the concept's file name)."),
    ] = None,
    force: ForceFlag = False,
    base_model: BaseModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = "auto",
    json_output: JsonFlag = False,
) -> None:
    """Export a concept as a textual-inversion embedding and a LoRA that other tools load."""
    from e4tcli.cli.quiet import quiet_heavy_imports
    from e4tcli.export import ExportOptions
    from e4tcli.export import export as run_export

    options = ExportOptions(
        concept=str(concept),
        format=format,
        out=str(out),
        rank=DEFAULT_RANK if rank is None else parse_rank(rank),
        token=token,
        base_model=base_model,
        device=device,
        precision=precision,
        force=force,
    )
    quiet_heavy_imports()
    result = run_export(options)
    if json_output:
        print_json(
            {
                "files": [str(p) for p in result.files],
                "token": result.token,
                "rank": result.rank,
                "energy_kept": round(result.energy_kept, 6),
                "bias_changes_left_out": result.bias_changes_left_out,
                "seconds": round(result.seconds, 3),
            }
        )
        return
    console = stdout_console()
    for path in result.files:
        console.print(f"Wrote {path}", markup=False, highlight=False)
    console.print(
        f"Type '{result.token}' in prompts. The LoRA (rank {result.rank}) keeps {result.energy_kept:.1%} of the "
        "concept's weight change.",
        markup=False,
        highlight=False,
    )
    if result.bias_changes_left_out:
        console.print(
            f"The concept's {result.bias_changes_left_out:,} bias changes are not exported: "
            "a kohya LoRA changes weights only, so it draws the concept without them (--format diffusers keeps them).",
            markup=False,
            highlight=False,
        )
