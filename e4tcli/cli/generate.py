"""`e4t generate CONCEPT PROMPT`: images of the concept, prompted with S*."""

from e4tcli.cli.declared import declared_options
from e4tcli.cli.options import JsonFlag
from e4tcli.cli.output import generation_progress, print_json, reports_errors, stdout_console, warn
from e4tcli.domain import PLACEHOLDER
from e4tcli.options import GenerateOptions


@reports_errors
@declared_options(GenerateOptions)
def generate(options: dict, json_output: JsonFlag = False) -> None:
    """Generate images of a tuned concept. Image i uses seed SEED+i; a grid is added for several images."""
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports

    quiet_heavy_imports()

    resolved = api.GenerateOptions(**options)
    if PLACEHOLDER not in resolved.prompt:
        warn(f"the prompt does not contain '{PLACEHOLDER}', so the concept will not appear; generating anyway")
    with generation_progress(enabled=not json_output) as progress:
        result = api.generate(resolved, progress)
    if result.renamed:
        warn(
            f"{resolved.out} already had images of these names, so these are {result.images[0].name} and on "
            "(--force replaces the old ones)"
        )
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
