"""`e4t domains`: list the installed domains; `e4t domains show NAME`: every default."""

from typing import Annotated

import typer

from e4tcli.cli.completion import complete_domain
from e4tcli.cli.options import JsonFlag
from e4tcli.cli.output import print_json, print_table, registry, reports_errors, stdout_console
from e4tcli.plugins import RegisteredDomain

app = typer.Typer(help="List installed domains and show their defaults.", no_args_is_help=False)


def _summary(entry: RegisteredDomain) -> dict:
    domain = entry.domain
    return {
        "name": domain.name,
        "description": domain.description,
        "distribution": entry.plugin.distribution,
        "version": entry.plugin.version,
        "plugin": entry.plugin.name,
        "class_word": domain.class_word,
        "lambda_emb_pretrain": domain.pretrain.lambda_emb,
        "lambda_emb_tune": domain.tune.lambda_emb,
        "lambda_weights": domain.lambda_weights,
    }


def _row(entry: RegisteredDomain) -> tuple:
    s = _summary(entry)
    return (
        s["name"],
        f"{s['distribution'] or '-'} {s['version'] or ''}".strip(),
        s["class_word"],
        f"{s['lambda_emb_pretrain']:g} / {s['lambda_emb_tune']:g}",
        f"{s['lambda_weights']:g}",
        s["description"],
    )


@app.callback(invoke_without_command=True)
@reports_errors
def list_domains(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list the plugins that failed to load or register, and why.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """List the installed domains."""
    if ctx.invoked_subcommand is not None:
        return
    entries = [registry().domains[name] for name in registry().names()]
    broken = [
        {"plugin": plugin.name, "distribution": plugin.distribution, "version": plugin.version, "problem": problem}
        for plugin, problem in registry().broken
    ]
    if json_output:
        print_json({"domains": [_summary(entry) for entry in entries], **({"problems": broken} if show_all else {})})
        return
    if entries:
        print_table(
            ("domain", "distribution", "class word", "λ emb (pretrain / tune)", "λ weights", "description"),
            [_row(entry) for entry in entries],
            title="Installed domains",
        )
    else:
        stdout_console().print("No domains installed. Install one with 'pip install <plugin>'.", markup=False)
    if show_all and broken:
        print_table(
            ("plugin", "distribution", "problem"),
            [(b["plugin"], f"{b['distribution'] or '-'} {b['version'] or ''}".strip(), b["problem"]) for b in broken],
            title="Plugins with problems",
        )


@app.command("show")
@reports_errors
def show_domain(
    name: Annotated[str, typer.Argument(help="Domain name.", autocompletion=complete_domain)],
    json_output: JsonFlag = False,
) -> None:
    """Show every default of one domain."""
    entry = registry().get(name)
    data = {**_summary(entry), "defaults": entry.domain.defaults()}
    if json_output:
        print_json(data)
        return
    rows = [("distribution", f"{entry.plugin.distribution or '-'} {entry.plugin.version or ''}".strip())]
    for key, value in entry.domain.defaults().items():
        if isinstance(value, dict) and key in ("pretrain", "tune"):
            rows.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            rows.append((key, "\n".join(str(v) for v in value) if value else "-"))
        else:
            rows.append((key, "-" if value in (None, {}) else value))
    print_table(("setting", "value"), rows, title=f"Domain '{name}'")
