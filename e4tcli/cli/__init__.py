"""The command-line interface. Importing it must never import torch."""

from e4tcli.cli.app import app, main

__all__ = ["app", "main"]
