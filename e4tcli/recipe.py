"""Pre-training recipes: every `e4t pretrain` option in a YAML file.

Flags given on the command line override the file; the resolved recipe is
saved in the run folder (``recipe.yaml``) and in every checkpoint's config.
Torch-free.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from e4tcli.errors import UsageError


def recipe_fields() -> dict[str, type]:
    """Recipe key -> expected Python type (``domain`` plus every PretrainOptions field)."""
    from e4tcli.options import PretrainOptions

    fields: dict[str, type] = {"domain": str}
    for field in dataclasses.fields(PretrainOptions):
        hint = typing.get_type_hints(PretrainOptions)[field.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        fields[field.name] = hint
    return fields


def load_recipe(path: Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}", hint="pass --config a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(
            f"{path} is not valid YAML ({str(error).splitlines()[0]})", hint="fix the recipe file"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping of option names to values", hint="e.g. 'steps: 1000'")
    known = recipe_fields()
    for key, value in data.items():
        key_name = str(key).replace("-", "_")
        if key_name not in known:
            raise UsageError(f"unknown recipe key '{key}' in {path}", hint=f"valid keys: {', '.join(sorted(known))}")
        expected = known[key_name]
        ok = value is None or isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not ok or (expected is int and isinstance(value, bool)):
            raise UsageError(
                f"recipe key '{key}' in {path} must be {expected.__name__}, got {value!r}", hint="fix the recipe file"
            )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_recipe(recipe: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Flags that were given (not None) win over the recipe."""
    return {**recipe, **{k: v for k, v in flags.items() if v is not None}}
