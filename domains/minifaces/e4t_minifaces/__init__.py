"""The minifaces domain: e4t's miniature world, small enough for a laptop CPU.

The base model, the image backbone and the pre-trained domain checkpoint ship
inside this package (``weights/``, fp16), all trained by e4t's own code from
the procedural generator in ``world.py`` (``python -m e4t_minifaces.build``
rebuilds them from scratch). ``examples/`` holds reference portraits of
identities the models never saw.
"""

from dataclasses import replace
from pathlib import Path

from e4t_minifaces.mask import face_region
from e4tcli import Domain, EncoderDefaults, OffsetDefaults, PhaseDefaults, hookimpl
from e4tcli.datasets import any_images

WEIGHTS = Path(__file__).parent / "weights"
EXAMPLES = Path(__file__).parent / "examples"


def minifaces_domain() -> Domain:
    # From the pre-trained domain, the encoder at lr 5e-4 keeps more of the prompted scene than 1e-3 or 3e-3
    # for the same identity, and the offsets need 1e-2 to add identity in 5 steps. A batch of 4 with the bias
    # changes at 3e-3 keeps the identity of a batch of 16 without them in about half the time; tuned from zero
    # (no checkpoint), 10 steps at 3e-3 throughout, at batch 16, come within 0.05 of the pre-trained domain's
    # margin (docs/minifaces.md, "The tuning learning rate", "The offsets' learning rate", "The tuning batch
    # and the bias changes" and "Without a domain checkpoint"). Rank-16 additive weight changes at 3e-3 add
    # the hair colour and eye spacing the offsets leave out (docs/minifaces.md, "Additive weight changes").
    tune = PhaseDefaults(
        steps=5,
        learning_rate=5e-4,
        batch_size=4,
        resolution=32,
        lambda_emb=1e-4,
        offset_learning_rate=1e-2,
        bias_learning_rate=3e-3,
        additive_rank=16,
        additive_learning_rate=3e-3,
    )
    return Domain(
        name="minifaces",
        description="Mini faces: e4t's 32 px miniature world (ships with its models; runs on a CPU).",
        class_word="face",
        prompt_templates=(
            "a photo of S*",
            "a photo of S* on a gray background",
            "S* in the center, gray background",
            "a photo of S* in the center",
        ),
        # Pre-training portraits have random backgrounds, named in their metadata.jsonl: the
        # encoder's word then has no reason to carry the background (README, "Does it work?").
        pretrain_templates=(
            "a photo of S* on a {background} background",
            "S* in the center, {background} background",
            "a photo of S* in the center, {background} background",
        ),
        base_model=str(WEIGHTS / "base"),
        backbone=str(WEIGHTS / "backbone"),
        checkpoint=str(WEIGHTS / "checkpoint"),
        pretrain=PhaseDefaults(steps=2000, learning_rate=1e-3, batch_size=16, resolution=32, lambda_emb=1e-4),
        tune=tune,
        fallback=replace(
            tune,
            steps=10,
            learning_rate=3e-3,
            batch_size=16,
            offset_learning_rate=None,
            bias_learning_rate=None,
            additive_rank=0,
        ),
        lambda_weights=1e-4,
        # This small UNet draws a face mostly with its convolutions (attention only at 8x8 and 4x4),
        # so the offsets also cover the ResNet convolutions, at full rank (README, "Does it work?").
        offsets=OffsetDefaults(kind="lowrank", rank=96, layers="attention+resnets"),
        dataset=any_images,
        # The reference's flat background is left out of the tuning loss, so that the prompt keeps choosing
        # it (docs/minifaces.md, "The tuning loss mask").
        loss_mask=face_region,
        # scale 1 (not 0.1): the word must move as far as two attribute words are apart to carry
        # an identity, and at 0.1 the regularizer held it near the class word (README, "Does it work?").
        encoder=EncoderDefaults(hidden_dim=256, scale=1.0),
        extra={"examples": str(EXAMPLES)},
    )


@hookimpl
def register_domains(register):
    register(minifaces_domain())
