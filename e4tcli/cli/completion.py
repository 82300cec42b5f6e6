"""Shell-completion callbacks. They run on every TAB: torch-free and quick."""


def complete_domain(incomplete: str) -> list[str]:
    from e4tcli.cli.output import registry

    return [name for name in registry().names() if name.startswith(incomplete)]


def complete_path(incomplete: str) -> list[str]:
    """Files and folders starting with ``incomplete`` (``--data`` is text, so URLs keep their ``//``)."""
    import glob
    import os

    return sorted(m + os.sep if os.path.isdir(m) else m for m in glob.glob(glob.escape(incomplete) + "*"))[:200]
