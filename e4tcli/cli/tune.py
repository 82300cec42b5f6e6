"""`e4t tune IMAGE --domain NAME`: personalize from one image; writes one concept file."""

from e4tcli.cli.declared import declared_options
from e4tcli.cli.options import DomainOption, JsonFlag
from e4tcli.cli.output import human_size, print_json, registry, reports_errors, stdout_console, step_progress
from e4tcli.options import TuneOptions


@reports_errors
@declared_options(TuneOptions)
def tune(options: dict, domain: DomainOption, json_output: JsonFlag = False) -> None:
    """Personalize the domain's model to the concept in IMAGE; write ONE concept file."""
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports

    quiet_heavy_imports()

    entry = registry().get(domain)
    resolved = api.TuneOptions(**options)
    total = resolved.steps if resolved.steps is not None else entry.domain.tune.steps
    with step_progress(total, "tuning", enabled=not json_output) as on_step:
        result = api.tune(resolved, entry.domain, on_step)
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
