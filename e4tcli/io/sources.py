"""How checkpoints, concepts and images name the models they were made with.

A hub id is recorded as it is. A local folder that is a domain's own model
(the weights a plugin package ships) is recorded as ``domain:NAME``, never as
the folder of the machine that wrote it: the file then works, and tells
nothing about that machine, wherever the package is installed. Loading a
recorded source resolves ``domain:NAME`` (and a recorded folder that is not on
this machine) to the installed domain's model; the fingerprint check that
follows every load makes sure it is the same model.
"""

from pathlib import Path
from typing import Callable, Optional, Union

from e4tcli.errors import UsageError

DOMAIN_PREFIX = "domain:"


def portable_source(source: str, domain_name: str, domain_default: Optional[str]) -> str:
    """``source`` as it is written into a file: ``domain:NAME`` when it is that domain's own local folder."""
    if domain_default and Path(source).is_dir() and Path(domain_default).is_dir():
        if Path(source).resolve() == Path(domain_default).resolve():
            return f"{DOMAIN_PREFIX}{domain_name}"
    return source


Fallback = Union[Optional[str], Callable[[], Optional[str]]]


def recorded_source(recorded: str, fallback: Fallback, flag: str = "--base-model") -> str:
    """The source to load for a ``recorded`` one: the domain's default (``fallback``, a source or a
    function returning one) for ``domain:NAME`` or for a recorded folder that is not here."""
    by_domain = recorded.startswith(DOMAIN_PREFIX)
    if by_domain or (Path(recorded).is_absolute() and not Path(recorded).exists()):
        chosen = fallback() if callable(fallback) else fallback
        if chosen:
            return chosen
        if by_domain:
            name = recorded.removeprefix(DOMAIN_PREFIX)
            raise UsageError(
                f"made with the models of domain '{name}', which is not installed",
                hint=f"install the package of domain '{name}' (see 'e4t domains'), or pass {flag}",
            )
    return recorded
