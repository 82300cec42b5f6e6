"""The library entry points behind `e4t pretrain`, `e4t tune` and `e4t generate`.

Each takes a dataclass of options (``e4tcli.options``) and a Domain (from the
registry, or built by hand), and returns a result dataclass; none prints.
``on_step`` callbacks receive (step, losses) for progress display.
"""

from e4tcli.api.common import (
    DOMAIN_DEFAULTED,
    OnStep,
    check_same,
    checkpointing_by_default,
    enable_gradient_checkpointing,
    installed_base_model,
    new_model,
    phase_values,
    training_scheduler,
)
from e4tcli.api.generation import (
    GenerateResult,
    GenerationProgress,
    default_batch_size,
    generate,
    load_concept_model,
    png_info,
    png_metadata,
)
from e4tcli.api.pretraining import PretrainResult, make_accelerator, pretrain, write_recipe
from e4tcli.api.tuning import (
    NO_CHECKPOINT,
    TuneResult,
    load_domain_checkpoint,
    load_user_image,
    published_checkpoint,
    tune,
    tunes_from_base,
    tuning_defaults,
)
from e4tcli.options import GenerateOptions, PretrainOptions, TuneOptions

__all__ = [
    "DOMAIN_DEFAULTED",
    "NO_CHECKPOINT",
    "GenerateOptions",
    "GenerateResult",
    "GenerationProgress",
    "OnStep",
    "PretrainOptions",
    "PretrainResult",
    "TuneOptions",
    "TuneResult",
    "check_same",
    "checkpointing_by_default",
    "default_batch_size",
    "enable_gradient_checkpointing",
    "generate",
    "installed_base_model",
    "load_concept_model",
    "load_domain_checkpoint",
    "new_model",
    "load_user_image",
    "make_accelerator",
    "phase_values",
    "png_info",
    "png_metadata",
    "pretrain",
    "published_checkpoint",
    "training_scheduler",
    "tune",
    "tunes_from_base",
    "tuning_defaults",
    "write_recipe",
]
