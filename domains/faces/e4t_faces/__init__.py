"""The faces domain: human faces, pre-trained on FFHQ-style aligned photos.

Data: FFHQ or CelebA-HQ as distributed (folders of aligned PNG/JPG), or tar
shards / LMDB. ``tune`` first finds, levels and crops the face of the user's
photo (``faces.align_face``) and weights the loss by a face ellipse
(``faces.face_mask``).
"""

from e4t_faces.faces import align_face, face_mask
from e4tcli import Domain, PhaseDefaults, hookimpl
from e4tcli.datasets import any_images


@hookimpl
def register_domains(register):
    register(
        Domain(
            name="faces",
            description="Human faces (pre-trained on FFHQ-style aligned face photos).",
            class_word="face",
            prompt_templates=(
                "a photo of S*",
                "a portrait of S*",
                "a close-up photo of S*",
                "a headshot of S*",
                "a cropped photo of S*",
            ),
            base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            backbone="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            pretrain=PhaseDefaults(steps=30_000, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.01),
            tune=PhaseDefaults(steps=5, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.1),
            lambda_weights=1e-4,
            dataset=any_images,
            preprocess=align_face,
            loss_mask=face_mask,
        )
    )
