"""`e4t pretrain --domain NAME --data PATH --out DIR`: build a domain checkpoint."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.options import (
    BaseModelOption,
    CheckpointingFlag,
    DeviceOption,
    DomainOption,
    JsonFlag,
    PrecisionOption,
    SeedOption,
)
from e4tcli.cli.output import print_json, registry, reports_errors, step_progress, stdout_console, warn


@reports_errors
def pretrain(
    domain: DomainOption,
    data: Annotated[Path, typer.Option("--data", help="The domain's dataset (for image folders: a folder, searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write (replaced atomically).")],
    base_model: BaseModelOption = None,
    backbone: Annotated[
        Optional[str], typer.Option("--backbone", help="CLIP vision tower: a hub id or a local folder.")
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps (default: the domain's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Batch size (default: the domain's).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Learning rate (default: the domain's).")] = None,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", min=8, help="Training resolution (default: the domain's).")
    ] = None,
    seed: SeedOption = 0,
    offsets: Annotated[
        str, typer.Option("--offsets", help="Weight-offset parameterisation: 'paper' (E4T) or 'lowrank' (less memory).")
    ] = "paper",
    offset_rank: Annotated[int, typer.Option("--offset-rank", min=1, help="Rank of the 'lowrank' offsets.")] = 4,
    encoder_hidden_dim: Annotated[int, typer.Option("--encoder-hidden-dim", min=1, help="Width of the encoder head.")] = 768,
    device: DeviceOption = None,
    precision: PrecisionOption = "auto",
    gradient_checkpointing: CheckpointingFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Pre-train the domain's encoder and weight offsets on a large dataset (one process)."""
    from e4tcli import api
    from e4tcli.errors import UsageError

    if offsets not in ("paper", "lowrank"):
        raise UsageError(f"unknown --offsets '{offsets}'", hint="use 'paper' or 'lowrank'")
    entry = registry().get(domain)
    options = api.PretrainOptions(
        data=str(data),
        out=str(out),
        base_model=base_model,
        backbone=backbone,
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        resolution=resolution,
        seed=seed,
        offsets=offsets,
        offset_rank=offset_rank,
        encoder_hidden_dim=encoder_hidden_dim,
        device=device,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
    )
    total = steps or entry.domain.pretrain.steps
    with step_progress(total, "pre-training", enabled=not json_output) as on_step:
        result = api.pretrain(options, entry.domain, on_step)
    if result.skipped_images:
        warn(f"{result.skipped_images} unreadable images were skipped")
    final_loss = result.losses[-1]["total"] if result.losses else None
    if json_output:
        print_json(
            {
                "checkpoint": str(result.checkpoint),
                "steps": result.steps,
                "seconds": round(result.seconds, 3),
                "final_loss": final_loss,
                "skipped_images": result.skipped_images,
                "domain": domain,
            }
        )
        return
    stdout_console().print(
        f"Wrote domain checkpoint {result.checkpoint} after {result.steps} steps in {result.seconds:.1f} s",
        markup=False,
        highlight=False,
    )
