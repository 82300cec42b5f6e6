"""Option types shared by several commands (one definition, one help text)."""

from typing import Annotated, Optional

import typer

from e4tcli.cli.completion import complete_domain

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
DomainOption = Annotated[
    str, typer.Option("--domain", "-d", help="Domain name (see 'e4t domains').", autocompletion=complete_domain)
]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace what --out already holds under the same names.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]
DeviceOption = Annotated[
    Optional[str], typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU).")
]
PrecisionOption = Annotated[
    str, typer.Option("--precision", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16.")
]
BaseModelOption = Annotated[
    Optional[str], typer.Option("--base-model", help="Stable Diffusion 1.x/2.x: a hub id or a local diffusers folder.")
]
CheckpointingFlag = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory while training.")
]
TuneCheckpointingFlag = Annotated[
    Optional[bool],
    typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                 help="Trade compute for memory (default: on with CUDA, off elsewhere)."),
]
LambdaEmbOption = Annotated[
    Optional[float], typer.Option("--lambda-emb", min=0.0, help="Weight of ||offset||^2 (default: the domain's).")
]
LambdaWeightsOption = Annotated[
    Optional[float], typer.Option("--lambda-weights", min=0.0, help="Weight of ||dW||^2 (default: the domain's).")
]
