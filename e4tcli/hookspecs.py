"""The hooks a plugin can implement. Each is documented for plugin authors."""

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("e4t")
hookimpl = pluggy.HookimplMarker("e4t")


@hookspec
def register_domains(register: Callable[..., None]) -> None:
    """Register one or more domains by calling ``register(Domain(...))``.

    Called once per process, when the registry is first needed. Do not import
    torch (or anything heavy) here: a Domain holds factories that import what
    they need when e4t calls them.
    """
