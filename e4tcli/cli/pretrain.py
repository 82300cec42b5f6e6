"""`e4t pretrain`: build a domain checkpoint on one process, or many through accelerate."""

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.completion import complete_domain
from e4tcli.cli.declared import declared_options
from e4tcli.cli.options import JsonFlag
from e4tcli.cli.output import print_json, registry, reports_errors, stdout_console, step_progress, warn
from e4tcli.errors import UsageError
from e4tcli.options import PretrainOptions


def _launch_processes(count: int) -> None:
    """Hand off to `accelerate launch` with the same arguments, minus --num-processes."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        args.append(arg)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(count),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",  # a free port: two runs on one machine never meet on accelerate's default one
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "e4tcli",
        *args,
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)  # the launcher takes this process's place: signals and exit code pass through


@reports_errors
@declared_options(PretrainOptions, all_optional=True)
def pretrain(
    options: dict,
    domain: Annotated[
        Optional[str],
        typer.Option("--domain", "-d", help="Domain name (or 'domain:' in --config).", autocompletion=complete_domain),
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML recipe; flags override it.")] = None,
    num_processes: Annotated[
        Optional[int], typer.Option("--num-processes", min=1, help="Start N processes through `accelerate launch`.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Pre-train a domain's encoder, weight offsets and (--bias-lr) bias changes; resumable, multi-GPU."""
    if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
        _launch_processes(num_processes)
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports
    from e4tcli.recipe import load_recipe, merge_recipe

    quiet_heavy_imports()

    flags = {"domain": domain, **options}
    settings = merge_recipe(load_recipe(config) if config else {}, flags)
    for required, flag in (("domain", "--domain"), ("data", "--data"), ("out", "--out")):
        if not settings.get(required):
            raise UsageError(f"missing {flag}", hint=f"pass {flag}, or set '{required}:' in the --config recipe")
    entry = registry().get(settings.pop("domain"))
    resolved = api.PretrainOptions(**settings)
    total = resolved.steps or entry.domain.pretrain.steps
    with step_progress(total, "pre-training", enabled=not json_output) as on_step:
        result = api.pretrain(resolved, entry.domain, on_step)
    if "RANK" in os.environ and os.environ["RANK"] != "0":
        return
    if result.skipped_images:
        warn(f"{result.skipped_images} unreadable images were skipped")
    final_loss = result.losses[-1]["loss"] if result.losses else None
    if json_output:
        print_json(
            {
                "checkpoint": str(result.checkpoint),
                "steps": result.steps,
                "seconds": round(result.seconds, 3),
                "final_loss": final_loss,
                "skipped_images": result.skipped_images,
                "domain": entry.domain.name,
            }
        )
        return
    stdout_console().print(
        f"Wrote domain checkpoint {result.checkpoint} after {result.steps} steps in {result.seconds:.1f} s",
        markup=False,
        highlight=False,
    )
