"""`e4t pretrain`: build a domain checkpoint on one process, or many through accelerate."""

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.options import BaseModelOption, DeviceOption, ForceFlag, JsonFlag, LambdaEmbOption, LambdaWeightsOption
from e4tcli.cli.completion import complete_domain, complete_path
from e4tcli.cli.output import print_json, registry, reports_errors, step_progress, stdout_console, warn
from e4tcli.domain import OFFSET_KINDS, OFFSET_LAYERS
from e4tcli.errors import UsageError


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
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "e4tcli", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)  # the launcher takes this process's place: signals and exit code pass through


@reports_errors
def pretrain(
    domain: Annotated[
        Optional[str], typer.Option("--domain", "-d", help="Domain name (or 'domain:' in --config).", autocompletion=complete_domain)
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="The domain's dataset: a folder, an LMDB, tar shards (local or https://...).",
                     autocompletion=complete_path),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: checkpoints, log.jsonl, recipe.yaml.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML recipe; flags override it.")] = None,
    base_model: BaseModelOption = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="CLIP vision tower: a hub id or a local folder.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps (default: the domain's).")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Global batch size (default: the domain's).")
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Learning rate (default: the domain's).")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", min=8, help="Training resolution.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0).")] = None,
    offsets: Annotated[Optional[str], typer.Option("--offsets", help="'paper' (E4T) or 'lowrank' (default: the domain's).")] = None,
    offset_rank: Annotated[Optional[int], typer.Option("--offset-rank", min=1, help="Rank of 'lowrank' offsets.")] = None,
    offset_layers: Annotated[
        Optional[str],
        typer.Option("--offset-layers", help="'attention' (q, k, v; the paper) or 'attention+resnets' (default: the domain's)."),
    ] = None,
    encoder_hidden_dim: Annotated[
        Optional[int], typer.Option("--encoder-hidden-dim", min=1, help="Width of the encoder head (default: the domain's).")
    ] = None,
    encoder_scale: Annotated[
        Optional[float], typer.Option("--encoder-scale", min=0.0, help="s in S* = emb(class) + s * offset (default: the domain's).")
    ] = None,
    gradient_accumulation: Annotated[
        Optional[int], typer.Option("--gradient-accumulation", min=1, help="Micro-batches per optimizer step.")
    ] = None,
    checkpoint_every: Annotated[
        Optional[int], typer.Option("--checkpoint-every", min=0, help="Save a resumable checkpoint every N steps.")
    ] = None,
    keep_last: Annotated[Optional[int], typer.Option("--keep-last", min=1, help="Checkpoints to keep (default 3).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.")] = None,
    validate_every: Annotated[
        Optional[int], typer.Option("--validate-every", min=0, help="Save a grid for held-out images every N steps.")
    ] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw (default) or adamw8bit.")] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", min=0, help="Data-loader processes decoding images (default 0).")
    ] = None,
    cache_features: Annotated[
        Optional[bool],
        typer.Option("--cache-features/--no-cache-features", help="Pre-compute VAE latents and backbone features once."),
    ] = None,
    ema_decay: Annotated[
        Optional[float], typer.Option("--ema-decay", min=0.0, max=1.0, help="Keep an EMA of the trained weights (e.g. 0.999).")
    ] = None,
    lambda_emb: LambdaEmbOption = None,
    lambda_weights: LambdaWeightsOption = None,
    validation_images: Annotated[
        Optional[int], typer.Option("--validation-images", min=0, help="Held-out images in each validation grid.")
    ] = None,
    device: DeviceOption = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto, fp32, fp16 or bf16.")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory.")
    ] = None,
    num_processes: Annotated[
        Optional[int], typer.Option("--num-processes", min=1, help="Start N processes through `accelerate launch`.")
    ] = None,
    force: ForceFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Pre-train a domain's encoder and weight offsets (resumable; multi-GPU through accelerate)."""
    if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
        _launch_processes(num_processes)
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports
    from e4tcli.recipe import load_recipe, merge_recipe

    quiet_heavy_imports()

    flags = dict(
        domain=domain, data=data, out=str(out) if out else None, base_model=base_model,
        backbone=backbone, steps=steps, batch_size=batch_size, learning_rate=lr, resolution=resolution, seed=seed,
        offsets=offsets, offset_rank=offset_rank, offset_layers=offset_layers, encoder_hidden_dim=encoder_hidden_dim, encoder_scale=encoder_scale,
        gradient_accumulation=gradient_accumulation, checkpoint_every=checkpoint_every, keep_last=keep_last,
        resume=resume, validate_every=validate_every, optimizer=optimizer, device=device, precision=precision,
        gradient_checkpointing=gradient_checkpointing, workers=workers, cache_features=cache_features,
        ema_decay=ema_decay, lambda_emb=lambda_emb, lambda_weights=lambda_weights, force=force,
        validation_images=validation_images,
    )
    settings = merge_recipe(load_recipe(config) if config else {}, flags)
    for required, flag in (("domain", "--domain"), ("data", "--data"), ("out", "--out")):
        if not settings.get(required):
            raise UsageError(f"missing {flag}", hint=f"pass {flag}, or set '{required}:' in the --config recipe")
    if settings.get("offsets") not in (None, *OFFSET_KINDS):
        raise UsageError(f"unknown --offsets '{settings['offsets']}'", hint="use " + " or ".join(OFFSET_KINDS))
    if settings.get("offset_layers") not in (None, *OFFSET_LAYERS):
        raise UsageError(f"unknown --offset-layers '{settings['offset_layers']}'", hint="use " + " or ".join(OFFSET_LAYERS))
    entry = registry().get(settings.pop("domain"))
    options = api.PretrainOptions(**settings)
    total = options.steps or entry.domain.pretrain.steps
    with step_progress(total, "pre-training", enabled=not json_output) as on_step:
        result = api.pretrain(options, entry.domain, on_step)
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
