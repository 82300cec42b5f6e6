"""Every option of `pretrain`, `tune` and `generate`, declared once.

Each field of ``PretrainOptions``, ``TuneOptions`` and ``GenerateOptions`` carries
its type, default and a ``Flag`` (help text, command-line name, bounds, choices).
The CLI builds its commands from these declarations (``e4tcli.cli.declared``),
a pre-training recipe's keys are ``PretrainOptions``' field names
(``e4tcli.recipe``), and the library takes the dataclasses themselves, so adding
an option is one edit here. Values are checked here too, whichever way they
came in. Torch-free: the CLI imports this module at start-up.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from e4tcli.device import PRECISIONS
from e4tcli.domain import OFFSET_KINDS, OFFSET_LAYERS
from e4tcli.errors import UsageError
from e4tcli.io.concept import PRECISIONS as SAVE_PRECISIONS

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line."""

    help: str
    names: tuple[str, ...] = ()
    """Flag names; default ``--field-name``."""
    argument: bool = False
    """A positional argument instead of a flag."""
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple[str, ...] = ()
    path: bool = False
    """A filesystem path on the command line (completed as one); a ``str`` in the options."""
    complete: str = ""
    """Shell completion: ``path`` or ``domain``."""


def option(default: Any = dataclasses.MISSING, help: str = "", **flag: Any) -> Any:
    """A dataclass field with its ``Flag`` (typed ``Any``, as ``dataclasses.field`` is, so that the
    field keeps its declared type for type checkers)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help=help, **flag)})


def flag_of(field: dataclasses.Field) -> Flag:
    return field.metadata["flag"]


def flag_names(field: dataclasses.Field) -> tuple[str, ...]:
    return flag_of(field).names or ("--" + field.name.replace("_", "-"),)


def check_values(options) -> None:
    """Bounds and choices of every given value, named by its flag (CLI, recipe and API alike)."""
    for field in dataclasses.fields(options):
        value, flag = getattr(options, field.name), flag_of(field)
        if value is None or isinstance(value, bool):
            continue
        name = field.name.upper() if flag.argument else flag_names(field)[0]
        if flag.choices and value not in flag.choices:
            raise UsageError(f"unknown {name} '{value}'", hint="use " + " or ".join(flag.choices))
        if isinstance(value, (int, float)):
            if math.isnan(value) or (flag.minimum is not None and value < flag.minimum):
                raise UsageError(f"{name} must be at least {flag.minimum}, got {value}", hint=f"fix {name}")
            if flag.maximum is not None and value > flag.maximum:
                raise UsageError(f"{name} must be at most {flag.maximum}, got {value}", hint=f"fix {name}")


# ------------------------------------------------------------------ shared declarations
BASE_MODEL_HELP = "Stable Diffusion 1.x/2.x or XL: a hub id or a local diffusers folder."
DEVICE_HELP = "cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU)."
PRECISION_HELP = "auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."


def base_model_option():
    return option(None, BASE_MODEL_HELP)


def device_option():
    return option(None, DEVICE_HELP)


def precision_option():
    return option("auto", PRECISION_HELP, choices=PRECISIONS)


def lambda_emb_option():
    return option(None, "Weight of ||offset||^2 (default: the domain's).", minimum=0.0)


def lambda_weights_option():
    return option(None, "Weight of ||dW||^2 (default: the domain's).", minimum=0.0)


def bias_learning_rate_option(verb: str):
    return option(
        None,
        f"Also {verb} the UNet's biases and normalization parameters, additively, at this learning rate"
        f" (default: the domain's; 0: not {verb}d; a domain checkpoint's pre-trained ones are kept).",
        names=("--bias-lr",),
        minimum=0.0,
    )


# ------------------------------------------------------------------ pretrain
@dataclass
class PretrainOptions:
    """Every pre-training option; a YAML recipe sets the same names."""

    data: str = option(
        help="The domain's dataset: a folder, an LMDB, tar shards (local or https://...).", complete="path"
    )
    out: str = option(help="Run folder: checkpoints, log.jsonl, recipe.yaml.", names=("--out", "-o"), path=True)
    base_model: Optional[str] = base_model_option()
    backbone: Optional[str] = option(None, "CLIP vision tower: a hub id or a local folder.")
    steps: Optional[int] = option(None, "Training steps (default: the domain's).", minimum=1)
    batch_size: Optional[int] = option(None, "Global batch size (default: the domain's).", minimum=1)
    learning_rate: Optional[float] = option(
        None, "Learning rate (default: the domain's).", names=("--lr",), minimum=0.0
    )
    resolution: Optional[int] = option(None, "Training resolution (default: the domain's).", minimum=8)
    seed: int = option(0, "Random seed.")
    offsets: Optional[str] = option(None, "'paper' (E4T) or 'lowrank' (default: the domain's).", choices=OFFSET_KINDS)
    offset_rank: Optional[int] = option(None, "Rank of 'lowrank' offsets (default: the domain's).", minimum=1)
    offset_layers: Optional[str] = option(
        None, "'attention' (q, k, v; the paper) or 'attention+resnets' (default: the domain's).", choices=OFFSET_LAYERS
    )
    encoder_hidden_dim: Optional[int] = option(None, "Width of the encoder head (default: the domain's).", minimum=1)
    encoder_scale: Optional[float] = option(
        None, "s in S* = emb(class) + s * offset (default: the domain's).", minimum=0.0
    )
    device: Optional[str] = device_option()
    precision: str = precision_option()
    gradient_checkpointing: bool = option(False, "Trade compute for memory.")
    gradient_accumulation: int = option(1, "Micro-batches per optimizer step.", minimum=1)
    checkpoint_every: int = option(0, "Save a resumable checkpoint every N steps (0: at the end only).", minimum=0)
    keep_last: int = option(3, "Checkpoints to keep.", minimum=1)
    resume: Optional[str] = option(None, "'latest' or a checkpoint folder.")
    validate_every: int = option(0, "Save a grid for held-out images every N steps.", minimum=0)
    validation_images: int = option(4, "Held-out images in each validation grid.", minimum=0)
    optimizer: str = option("adamw", "adamw or adamw8bit (bitsandbytes).", choices=OPTIMIZERS)
    workers: int = option(0, "Data-loader processes decoding images.", minimum=0)
    cache_features: bool = option(False, "Pre-compute VAE latents and backbone features once.")
    ema_decay: float = option(0.0, "Keep an EMA of the trained weights (e.g. 0.999).", minimum=0.0, maximum=1.0)
    lambda_emb: Optional[float] = lambda_emb_option()
    lambda_weights: Optional[float] = lambda_weights_option()
    bias_learning_rate: Optional[float] = bias_learning_rate_option("pre-train")
    force: bool = option(False, "Start over in an --out folder that already holds files.")

    def __post_init__(self):
        check_values(self)


# ------------------------------------------------------------------ tune
@dataclass
class TuneOptions:
    image: str = option(help="The one image of the concept (jpg, png, webp).", argument=True, path=True)
    checkpoint: Optional[str] = option(
        None,
        "Domain checkpoint folder, or 'none' to tune from the base model"
        " (default: the domain's own, pulled on first use when published).",
    )
    out: Optional[str] = option(
        None, "Concept file to write (default: IMAGE.e4t.safetensors).", names=("--out", "-o"), path=True
    )
    steps: Optional[int] = option(
        None, "Optimisation steps (default: the domain's; more without a domain checkpoint).", minimum=0
    )
    batch_size: Optional[int] = option(None, "Batch size (default: the domain's).", minimum=1)
    learning_rate: Optional[float] = option(
        None,
        "The encoder's learning rate, and the offsets' where neither --offset-lr nor the domain sets theirs"
        " (default: the domain's).",
        names=("--lr",),
        minimum=0.0,
    )
    offset_learning_rate: Optional[float] = option(
        None,
        "Learning rate of the weight offsets (default: the domain's offset rate, else --lr's).",
        names=("--offset-lr",),
        minimum=0.0,
    )
    bias_learning_rate: Optional[float] = bias_learning_rate_option("tune")
    additive_rank: Optional[int] = option(
        None,
        "Also tune an additive change of this rank to every weight the offsets modulate, stored in the concept"
        " (default: the domain's; 0: none).",
        minimum=0,
    )
    additive_learning_rate: Optional[float] = option(
        None,
        "Learning rate of the additive changes (default: the domain's, else --lr's).",
        names=("--additive-lr",),
        minimum=0.0,
    )
    resolution: Optional[int] = option(
        None, "Training resolution (default: the checkpoint's, else the domain's).", minimum=8
    )
    seed: int = option(0, "Random seed; the same seed gives the same result.")
    base_model: Optional[str] = base_model_option()
    backbone: Optional[str] = option(
        None, "CLIP vision tower: a hub id or a local folder (default: the checkpoint's, else the domain's)."
    )
    device: Optional[str] = device_option()
    precision: str = precision_option()
    gradient_checkpointing: Optional[bool] = option(
        None, "Trade compute for memory (default: on with CUDA, off elsewhere)."
    )
    lambda_emb: Optional[float] = lambda_emb_option()
    lambda_weights: Optional[float] = lambda_weights_option()
    save_precision: str = option(
        "int8",
        "How the concept file stores its tensors: int8 (the encoder's matrices in 8 bits with a scale per row,"
        " the rest fp16), fp16, or fp32.",
        choices=SAVE_PRECISIONS,
    )
    force: bool = option(False, "Replace an existing --out file.")

    def __post_init__(self):
        check_values(self)


# ------------------------------------------------------------------ generate
@dataclass
class GenerateOptions:
    concept: str = option(help="Concept file written by 'e4t tune'.", argument=True, path=True)
    prompt: str = option(help="Prompt; 'S*' stands for the concept, e.g. \"S* as an astronaut\".", argument=True)
    num_images: int = option(1, "How many images.", names=("--num-images", "-n"), minimum=1)
    seed: int = option(0, "Random seed; image i uses SEED+i.")
    steps: int = option(30, "Denoising steps.", minimum=1)
    guidance: float = option(7.5, "Classifier-free guidance scale.", minimum=0.0)
    negative_prompt: str = option("", "What to steer away from.")
    height: Optional[int] = option(None, "Image height (default: the tuning resolution).", minimum=8)
    width: Optional[int] = option(None, "Image width (default: the tuning resolution).", minimum=8)
    out: str = option("outputs", "Output folder.", names=("--out", "-o"), path=True)
    base_model: Optional[str] = base_model_option()
    device: Optional[str] = device_option()
    precision: str = precision_option()
    batch_size: Optional[int] = option(
        None,
        "Images denoised at once (default: 4 on a CPU, 8 of 512x512 on a GPU); the pixels do not depend on it.",
        minimum=1,
    )
    encoder_every: int = option(
        1,
        "Run the encoder every K denoising steps and reuse S* between them (1: every step, as E4T does;"
        " larger is faster).",
        minimum=1,
    )
    force: bool = option(False, "Replace images of the same names in --out (without it: NAME-runK.png).")

    def __post_init__(self):
        check_values(self)
