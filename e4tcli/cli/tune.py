"""`e4t tune IMAGE --domain NAME`: personalize from one image; writes one concept file."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.options import (
    BaseModelOption,
    DeviceOption,
    DomainOption,
    ForceFlag,
    JsonFlag,
    LambdaEmbOption,
    LambdaWeightsOption,
    PrecisionOption,
    SeedOption,
    TuneCheckpointingFlag,
)
from e4tcli.cli.output import human_size, print_json, registry, reports_errors, step_progress, stdout_console


@reports_errors
def tune(
    image: Annotated[Path, typer.Argument(help="The one image of the concept (jpg, png, webp).")],
    domain: DomainOption,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Domain checkpoint folder (default: the domain's published one).")
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=0, help="Optimisation steps (default: the domain's).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Learning rate (default: the domain's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Batch size (default: the domain's).")] = None,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", min=8, help="Training resolution (default: the checkpoint's).")
    ] = None,
    seed: SeedOption = 0,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Concept file to write (default: IMAGE.e4t.safetensors).")
    ] = None,
    base_model: BaseModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = "auto",
    gradient_checkpointing: TuneCheckpointingFlag = None,
    lambda_emb: LambdaEmbOption = None,
    lambda_weights: LambdaWeightsOption = None,
    save_precision: Annotated[
        str, typer.Option("--save-precision", help="How the concept file stores its tensors: fp16 (half the size) or fp32.")
    ] = "fp16",
    force: ForceFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Personalize the domain's model to the concept in IMAGE; write ONE concept file."""
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports

    quiet_heavy_imports()

    entry = registry().get(domain)
    options = api.TuneOptions(
        image=str(image),
        checkpoint=checkpoint,
        out=str(out) if out else None,
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        resolution=resolution,
        seed=seed,
        base_model=base_model,
        device=device,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        lambda_emb=lambda_emb,
        lambda_weights=lambda_weights,
        save_precision=save_precision,
        force=force,
    )
    total = steps if steps is not None else entry.domain.tune.steps
    with step_progress(total, "tuning", enabled=not json_output) as on_step:
        result = api.tune(options, entry.domain, on_step)
    final_loss = result.losses[-1]["total"] if result.losses else None
    if json_output:
        print_json(
            {
                "concept": str(result.concept),
                "size_bytes": result.size_bytes,
                "steps": result.steps,
                "seconds": round(result.seconds, 3),
                "seed": result.seed,
                "final_loss": final_loss,
                "domain": domain,
            }
        )
        return
    stdout_console().print(
        f"Wrote {result.concept} ({human_size(result.size_bytes)}) after {result.steps} steps in {result.seconds:.1f} s",
        markup=False,
        highlight=False,
    )
