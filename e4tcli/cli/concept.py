"""`e4t concept info FILE`: what a concept or an exported file holds."""

from pathlib import Path
from typing import Annotated

import typer

from e4tcli.cli.options import JsonFlag
from e4tcli.cli.output import human_size, print_json, print_table, reports_errors, stdout_console

app = typer.Typer(help="Inspect concept files and exported files.", no_args_is_help=True)


def _summary_lines(described: dict) -> list[tuple[str, str]]:
    def source(entry):
        return f"{entry['source']} (fingerprint {entry['fingerprint']})" if isinstance(entry, dict) else "-"

    lines = [("kind", described["kind"]), ("domain", str(described.get("domain")))]
    checkpoint = source(described.get("checkpoint"))
    if "checkpoint" in described and described["checkpoint"] is None:
        checkpoint = "none (tuned from the base model)"
    if described["kind"] == "concept":
        offsets = described["offsets"]
        lines += [
            ("class word", str(described.get("class_word"))),
            ("tuning steps", str(described.get("steps"))),
            ("offsets", f"{offsets.get('kind')} on {offsets.get('layers')}, {offsets['count']} layers"),
            ("additive", f"rank {described['additive_rank']}" if described.get("additive_rank") else "none"),
            ("precision", str(described.get("precision"))),
        ]
    else:
        lines += [
            ("format", str(described.get("export_format"))),
            ("token", str(described.get("token"))),
            ("rank", f"{described.get('rank')} (keeps {described.get('energy_kept', 0):.1%} of the weight change)"),
        ]
    lines += [
        ("base model", source(described.get("base_model"))),
        ("checkpoint", checkpoint),
        ("created", str(described.get("created"))),
        ("size", human_size(described["size_bytes"])),
    ]
    return lines


@app.command("info")
@reports_errors
def info(
    file: Annotated[Path, typer.Argument(help="A concept (from 'e4t tune') or a file from 'e4t export'.")],
    json_output: JsonFlag = False,
) -> None:
    """Show what a concept or an exported file holds: recipe, models, tensors and sizes."""
    from e4tcli.io.describe import describe_file

    described = describe_file(file)
    if json_output:
        print_json(described)
        return
    console = stdout_console()
    for label, value in _summary_lines(described):
        console.print(f"{label:>13}: {value}", markup=False, highlight=False)
    rows = [
        (group, entry["tensors"], human_size(entry["bytes"])) for group, entry in described["tensor_groups"].items()
    ]
    print_table(("tensors", "count", "size"), rows)
