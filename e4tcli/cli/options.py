"""Parameters of commands whose options are not declared in ``e4tcli.options`` (one definition each)."""

from typing import Annotated, Optional

import typer

from e4tcli.cli.completion import complete_domain
from e4tcli.options import BASE_MODEL_HELP, DEVICE_HELP, PRECISION_HELP

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
DomainOption = Annotated[
    str, typer.Option("--domain", "-d", help="Domain name (see 'e4t domains').", autocompletion=complete_domain)
]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace what --out already holds under the same names.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help=DEVICE_HELP)]
PrecisionOption = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
BaseModelOption = Annotated[Optional[str], typer.Option("--base-model", help=BASE_MODEL_HELP)]
