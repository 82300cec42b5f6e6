"""`e4t domains`: list the installed domains; `show NAME`: every default; `pull NAME` and
`push RUN_DIR REPO_ID`: published domain checkpoints."""

from pathlib import Path
from typing import Annotated

import typer

from e4tcli.cli.completion import complete_domain
from e4tcli.cli.options import JsonFlag
from e4tcli.cli.output import print_json, print_table, registry, reports_errors, stdout_console, tell
from e4tcli.domain import Domain
from e4tcli.errors import UsageError
from e4tcli.io import hub
from e4tcli.plugins import RegisteredDomain

app = typer.Typer(help="List installed domains, show their defaults, pull and push their checkpoints.")


def checkpoint_status(domain: Domain) -> str:
    """Where ``tune`` gets this domain's checkpoint, in words."""
    if domain.checkpoint is None:
        return "none (tune starts from the base model)"
    on_hub = hub.published(domain)
    if on_hub is None:
        return "shipped with the plugin" if Path(domain.checkpoint).exists() else f"missing: {domain.checkpoint}"
    return f"{on_hub.label} ({'pulled' if hub.cached(on_hub) else 'not pulled yet'})"


def _summary(entry: RegisteredDomain) -> dict:
    domain = entry.domain
    return {
        "name": domain.name,
        "description": domain.description,
        "distribution": entry.plugin.distribution,
        "version": entry.plugin.version,
        "plugin": entry.plugin.name,
        "class_word": domain.class_word,
        "checkpoint": domain.checkpoint,
        "checkpoint_status": checkpoint_status(domain),
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
        s["checkpoint_status"],
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
            (
                "domain",
                "distribution",
                "class word",
                "checkpoint",
                "λ emb (pretrain / tune)",
                "λ weights",
                "description",
            ),
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
        if isinstance(value, dict) and key in ("pretrain", "tune", "fallback"):
            rows.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            rows.append((key, "\n".join(str(v) for v in value) if value else "-"))
        else:
            rows.append((key, "-" if value in (None, {}) else value))
    print_table(("setting", "value"), rows, title=f"Domain '{name}'")


@app.command("pull")
@reports_errors
def pull_domain(
    name: Annotated[str, typer.Argument(help="Domain name.", autocompletion=complete_domain)],
    json_output: JsonFlag = False,
) -> None:
    """Download a domain's published checkpoint into the Hugging Face cache and verify it."""
    domain = registry().get(name).domain
    if domain.checkpoint is None:
        raise UsageError(
            f"domain '{name}' has no published checkpoint",
            hint="'e4t tune' tunes from the base model without one (slower); "
            "docs/pretraining.md shows how to pre-train and publish one",
        )
    target = hub.published(domain)
    if target is None:
        message = f"domain '{name}' ships its checkpoint with the plugin ({domain.checkpoint}); nothing to pull"
        if json_output:
            print_json({"domain": name, "folder": domain.checkpoint, "pulled": False})
        else:
            stdout_console().print(message, markup=False, highlight=False)
        return
    if not json_output:
        tell(f"pulling domain '{name}' checkpoint {target.label}")
    checkpoint = hub.pull(target, progress=not json_output)
    if json_output:
        print_json(
            {
                "domain": name,
                "repo_id": target.repo_id,
                "revision": target.revision,
                "fingerprint": checkpoint.fingerprint,
                "folder": str(checkpoint.folder),
                "pulled": True,
            }
        )
        return
    stdout_console().print(
        f"Domain '{name}': {target.label} verified (fingerprint {checkpoint.fingerprint}) in {checkpoint.folder}",
        markup=False,
        highlight=False,
    )


@app.command("push")
@reports_errors
def push_domain(
    run_dir: Annotated[Path, typer.Argument(help="A pre-training run folder, or one checkpoint folder in it.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository to publish to: OWNER/NAME.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Publish a pre-trained domain checkpoint, with a model card, to the Hugging Face Hub."""
    result = hub.push(run_dir, repo_id, private=private)
    if json_output:
        print_json(
            {
                "repo_id": result.repo_id,
                "revision": result.revision,
                "fingerprint": result.fingerprint,
                "url": result.url,
            }
        )
        return
    console = stdout_console()
    console.print(f"Published {result.repo_id} at commit {result.revision}", markup=False, highlight=False)
    console.print("Name it in your domain plugin (e4tcli.Domain):", markup=False, highlight=False)
    for line in (
        f'    checkpoint="{result.repo_id}",',
        f'    checkpoint_revision="{result.revision}",',
        f'    checkpoint_fingerprint="{result.fingerprint}",',
    ):
        console.print(line, markup=False, highlight=False)
