"""Shell-completion callbacks. They run on every TAB: torch-free and quick."""


def complete_domain(incomplete: str) -> list[str]:
    from e4tcli.cli.output import registry

    return [name for name in registry().names() if name.startswith(incomplete)]
