"""The `e4t` Typer application. Command modules register here; none imports torch at load."""

import sys
from typing import Annotated, Optional

import typer

from e4tcli import __version__
from e4tcli.cli import concept, domains, export, generate, pretrain, tune

app = typer.Typer(
    name="e4t",
    help="Personalize a text-to-image diffusion model to a new concept from ONE image (E4T).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
)
app.add_typer(domains.app, name="domains")
app.add_typer(concept.app, name="concept")
app.command("tune")(tune.tune)
app.command("generate")(generate.generate)
app.command("pretrain")(pretrain.pretrain)
app.command("export")(export.export)


def _print_version(value: bool) -> None:
    if not value:
        return
    from e4tcli.cli.output import registry

    lines = [f"e4t {__version__}"]
    for plugin in sorted(registry().plugins, key=lambda p: p.name):
        lines.append(f"  plugin {plugin.name}: {plugin.distribution or '-'} {plugin.version or ''}".rstrip())
    typer.echo("\n".join(lines))
    raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the core and plugin versions."),
    ] = None,
) -> None:
    """Personalize a text-to-image diffusion model to a new concept from ONE image (E4T)."""


def main() -> None:
    app(prog_name="e4t")
