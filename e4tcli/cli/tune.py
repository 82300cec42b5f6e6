"""`e4t tune IMAGE --domain NAME`: personalize from one image; writes one concept file."""

from e4tcli.cli.declared import declared_options
from e4tcli.cli.options import DomainOption, JsonFlag
from e4tcli.cli.output import human_size, print_json, registry, reports_errors, stdout_console, step_progress, tell
from e4tcli.domain import Domain
from e4tcli.io import hub
from e4tcli.options import TuneOptions


def fallback_notice(domain: Domain, checkpoint, steps: int) -> str:
    why = "--checkpoint none" if checkpoint is not None else f"domain '{domain.name}' has no checkpoint"
    return (
        f"{why}: tuning from the base model, {steps} steps (slower than the {domain.tune.steps} steps "
        "of a pre-trained domain); 'e4t domains' shows which domains have one, docs/pretraining.md how to make one"
    )


@reports_errors
@declared_options(TuneOptions)
def tune(options: dict, domain: DomainOption, json_output: JsonFlag = False) -> None:
    """Personalize the domain's model to the concept in IMAGE; write ONE concept file."""
    from e4tcli import api
    from e4tcli.cli.quiet import quiet_heavy_imports

    quiet_heavy_imports()

    entry = registry().get(domain)
    resolved = api.TuneOptions(**options)
    from_base = api.tunes_from_base(entry.domain, resolved.checkpoint)
    defaults = api.tuning_defaults(entry.domain, from_base)
    total = resolved.steps if resolved.steps is not None else defaults.steps
    if from_base:
        tell(fallback_notice(entry.domain, resolved.checkpoint, total))
    else:
        published = api.published_checkpoint(entry.domain, resolved.checkpoint)
        if published is not None and hub.cached(published) is None:  # before the tuning bar: the download has its own
            tell(f"pulling domain '{domain}' checkpoint {published.label} (first use; cached afterwards)")
            hub.pull(published, progress=not json_output)
        elif hub.is_hub_id(resolved.checkpoint):
            tell(f"downloading checkpoint {resolved.checkpoint} (its latest revision, not pinned by a plugin)")
            hub.download(str(resolved.checkpoint), None, progress=not json_output)
    with step_progress(total, "tuning", enabled=not json_output) as on_step:
        result = api.tune(resolved, entry.domain, on_step, progress=not json_output)
    final_loss = result.losses[-1]["total"] if result.losses else None
    checkpoint = "none" if from_base else str(resolved.checkpoint or entry.domain.checkpoint)
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
                "checkpoint": checkpoint,
            }
        )
        return
    stdout_console().print(
        f"Wrote {result.concept} ({human_size(result.size_bytes)}) after {result.steps} steps in {result.seconds:.1f} s",
        markup=False,
        highlight=False,
    )
