"""Typer parameters built from the option declarations in ``e4tcli.options``.

A command is written as a function of the values of its own parameters (the
domain, ``--json``, ...) plus ``options``: the dict of every declared option
given on the command line. ``declared_options`` gives it the full signature
Typer reads, so help texts, flag names, bounds and defaults live in one place.
"""

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from e4tcli.cli.completion import complete_domain, complete_path
from e4tcli.options import flag_names, flag_of

COMPLETERS = {"path": complete_path, "domain": complete_domain}


def cli_parameter(field: dataclasses.Field, hint, *, all_optional: bool) -> inspect.Parameter:
    """One Typer parameter for one declared option. ``all_optional``: every flag defaults to None (a
    flag not given leaves the recipe's value or the option's default in place)."""
    flag = flag_of(field)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    python_type = Path if flag.path else base
    default = field.default if field.default is not dataclasses.MISSING else None
    shown_default = f" (default: {default})" if all_optional and default not in (None, False, "") else ""
    settings = {"help": flag.help + shown_default}
    if flag.minimum is not None:
        settings["min"] = flag.minimum
    if flag.maximum is not None:
        settings["max"] = flag.maximum
    completer = COMPLETERS.get(flag.complete or ("path" if flag.path else ""))
    if completer:
        settings["autocompletion"] = completer
    if flag.argument:
        info = typer.Argument(**settings)
        return inspect.Parameter(
            field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[python_type, info]
        )
    names = flag_names(field)
    optional = all_optional or default is None
    if base is bool:
        long = names[0]
        names = (f"{long}/--no-{long[2:]}", *names[1:]) if optional else names
    cli_default = None if optional else (Path(default) if flag.path and default is not None else default)
    annotation = Optional[python_type] if optional else python_type
    return inspect.Parameter(
        field.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[annotation, typer.Option(*names, **settings)],
        default=cli_default,
    )


def declared_options(options_class, *, all_optional: bool = False, skip: tuple[str, ...] = ()):
    """Decorate ``command(options, **own)``: Typer sees ``own``'s parameters and one per declared option
    of ``options_class`` (but ``skip``); the command receives the options given, paths as str."""
    hints = typing.get_type_hints(options_class)
    declared = [f for f in dataclasses.fields(options_class) if f.name not in skip]

    def decorate(command):
        own = list(inspect.signature(command).parameters.values())[1:]
        params = [cli_parameter(f, hints[f.name], all_optional=all_optional) for f in declared]
        arguments = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        flags = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]  # options (Typer reads the annotation)
        signature = inspect.Signature(arguments + own + flags)
        names = {f.name for f in declared}

        @functools.wraps(command)
        def wrapper(**values):
            given = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k in names}
            return command(given, **{k: v for k, v in values.items() if k not in names})

        wrapper.__signature__ = signature
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        del wrapper.__wrapped__  # Typer must read this signature, not the command's own
        return wrapper

    return decorate
