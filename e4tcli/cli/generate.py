"""`e4t generate CONCEPT PROMPT`: images of the concept, prompted with S*."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.options import BaseModelOption, DeviceOption, ForceFlag, JsonFlag, PrecisionOption, SeedOption
from e4tcli.cli.output import generation_progress, print_json, reports_errors, stdout_console, warn
from e4tcli.domain import PLACEHOLDER


@reports_errors
def generate(
    concept: Annotated[Path, typer.Argument(help="Concept file written by 'e4t tune'.")],
    prompt: Annotated[str, typer.Argument(help="Prompt; 'S*' stands for the concept, e.g. \"S* as an astronaut\".")],
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, help="How many images.")] = 1,
    seed: SeedOption = 0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")] = 30,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")] = 7.5,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="What to steer away from.")] = "",
    height: Annotated[Optional[int], typer.Option("--height", min=8, help="Image height (default: the tuning resolution).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", min=8, help="Image width (default: the tuning resolution).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("outputs"),
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", min=1, help="Images denoised at once (default: 4 on a CPU, 8 of 512x512 on a GPU)."),
    ] = None,
    force: ForceFlag = False,
    base_model: BaseModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = "auto",
    json_output: JsonFlag = False,
) -> None:
    """Generate images of a tuned concept. Image i uses seed SEED+i; a grid is added for several images."""
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports

    quiet_heavy_imports()

    if PLACEHOLDER not in prompt:
        warn(f"the prompt does not contain '{PLACEHOLDER}', so the concept will not appear; generating anyway")
    options = api.GenerateOptions(
        concept=str(concept),
        prompt=prompt,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance=guidance,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        out=str(out),
        base_model=base_model,
        device=device,
        precision=precision,
        batch_size=batch_size,
        force=force,
    )
    with generation_progress(enabled=not json_output) as progress:
        result = api.generate(options, progress)
    if result.renamed:
        warn(f"{out} already had images of these names, so these are {result.images[0].name} and on "
             "(--force replaces the old ones)")
    if json_output:
        print_json(
            {
                "images": [str(p) for p in result.images],
                "grid": str(result.grid) if result.grid else None,
                "seconds": round(result.seconds, 3),
                "seed": result.seed,
                "renamed": result.renamed,
            }
        )
        return
    console = stdout_console()
    for path in result.images:
        console.print(f"Wrote {path}", markup=False, highlight=False)
    if result.grid:
        console.print(f"Wrote {result.grid}", markup=False, highlight=False)
