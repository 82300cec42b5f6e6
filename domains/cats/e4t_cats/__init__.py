"""The cats domain: house cats, pre-trained on LSUN-Cat-style photos.

Data: LSUN-Cat as distributed (an LMDB folder holding data.mdb), a folder of
photos, or tar shards: ``any_images`` picks by what is on disk.
"""

from e4tcli import Domain, PhaseDefaults, hookimpl
from e4tcli.datasets import any_images


@hookimpl
def register_domains(register):
    register(
        Domain(
            name="cats",
            description="House cats (pre-trained on LSUN-Cat-style photos).",
            class_word="cat",
            prompt_templates=(
                "a photo of S*",
                "a close-up photo of S*",
                "a photo of a cute S*",
                "a good photo of S*",
                "a photo of S* sitting",
            ),
            base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            backbone="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            pretrain=PhaseDefaults(steps=60_000, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.01),
            tune=PhaseDefaults(steps=5, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.1),
            lambda_weights=1e-4,
            dataset=any_images,
        )
    )
