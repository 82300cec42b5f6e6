"""The art domain: artistic styles, pre-trained on WikiArt-style paintings."""

from e4tcli import Domain, PhaseDefaults, hookimpl
from e4tcli.datasets import any_images, wikiart


def wikiart_or_shards(path):
    """WikiArt as distributed (style folders, CSV split when present), or tar shards / LMDB."""
    return any_images(path, folder=wikiart)


@hookimpl
def register_domains(register):
    register(
        Domain(
            name="art",
            description="Artistic styles (pre-trained on WikiArt-style paintings).",
            class_word="painting",
            prompt_templates=(
                "art by S*",
                "a painting in the style of S*",
                "a picture in the style of S*",
                "an artwork in the style of S*",
                "a rendition in the style of S*",
                "a {style} painting by S*",
            ),
            base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            backbone="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            pretrain=PhaseDefaults(steps=100_000, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.01),
            tune=PhaseDefaults(steps=5, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.1),
            lambda_weights=1e-4,
            dataset=wikiart_or_shards,
        )
    )
