"""Model families: the one place that knows how a family of base models reads its prompts.

Stable Diffusion 1.x and 2.x have one tokenizer and one CLIP text encoder, and the UNet is conditioned on
that encoder's last hidden state. Stable Diffusion XL has two (CLIP ViT-L, and OpenCLIP bigG with a
projection); their penultimate hidden states are concatenated, and the UNet also takes the second encoder's
pooled, projected embedding and the image's size and crop (``added_cond_kwargs``).

Everything outside this module handles a prompt's conditioning as ONE tensor, the *text states*: for SDXL
the pooled embedding travels as one extra last token (zero-padded to the states' width), so batching,
caching, guidance and the encoder's UNet pass need no family-specific code; only the UNet call and the
diffusers pipeline split it again (``unet_conditioning``, ``pipeline_embeds``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from e4tcli.errors import UsageError

if TYPE_CHECKING:
    import torch

SD = "stable-diffusion"
SDXL = "stable-diffusion-xl"


class ModelFamily:
    """Stable Diffusion 1.x / 2.x: one tokenizer, one text encoder."""

    name = SD
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_parts: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    """(tokenizer, text encoder) subfolders, in the order the text states concatenate them."""

    def load_text(self, source: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True)
        return (tokenizer,), (text_encoder,)

    def tokenize(self, tokenizers, prompts: list[str]) -> torch.Tensor:
        """Token ids: (B, length) for one tokenizer, (B, tokenizers, length) for several."""
        import torch

        ids = [
            tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            for tokenizer in tokenizers
        ]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def encode(self, text_encoders, ids: torch.Tensor) -> torch.Tensor:
        return text_encoders[0](ids)[0]

    def unet_conditioning(self, states: torch.Tensor, pixel_size: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments of the UNet's forward for these text states, for images of ``pixel_size`` (h, w)."""
        return {"encoder_hidden_states": states}

    def pipeline(self, base, unet, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def pipeline_embeds(self, states: torch.Tensor, negative: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pipeline call's prompt-embedding arguments."""
        return {"prompt_embeds": states, "negative_prompt_embeds": negative}

    def step_embeds(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a ``callback_on_step_end`` returns to change the prompt embeddings (guided: negative first)."""
        return {"prompt_embeds": states}

    callback_inputs: tuple[str, ...] = ("latents", "prompt_embeds")
    zeros_for_empty_prompt = False
    vae_upcast = False
    """Whether training encodes images with an fp16 VAE upcast to fp32 (``latent_distribution``)."""
    """Whether an empty negative prompt is drawn as all-zero text states (SDXL's convention) or encoded."""

    def embedding_file(self, parts: list[torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        """A textual-inversion file's tensors for a fixed ``S*`` (one part per text encoder, each 1 x width):
        one vector under ``key`` (the token for diffusers, ``emb_params`` for kohya)."""
        return {key: parts[0]}


class StableDiffusionXL(ModelFamily):
    """Two tokenizers and text encoders; pooled embedding and size/crop time ids through ``added_cond_kwargs``."""

    name = SDXL
    label = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    callback_inputs = ("latents", "prompt_embeds", "add_text_embeds")
    vae_upcast = True

    def embedding_file(self, parts: list[torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        """SDXL embeddings hold one vector per text encoder, ``clip_l`` and ``clip_g``, whatever the tool."""
        return {"clip_l": parts[0], "clip_g": parts[1]}

    def __init__(self, pooled_width: int = 1280, zeros_for_empty_prompt: bool = True):
        self.pooled_width = pooled_width
        """The second text encoder's projection width (the UNet's pooled text input)."""
        self.zeros_for_empty_prompt = zeros_for_empty_prompt
        """``force_zeros_for_empty_prompt`` of the model's ``model_index.json``, as its pipeline draws."""

    def load_text(self, source: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = tuple(CLIPTokenizer.from_pretrained(source, subfolder=t) for t, _ in self.text_parts)
        text_encoders = (
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True),
            CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", use_safetensors=True),
        )
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            # SDXL's released configs say eos_token_id 2, for which transformers pools at the highest token id:
            # S*'s, once added. Pooled at the real end of text, the whole prompt conditions the UNet.
            text_encoder.config.eos_token_id = tokenizer.eos_token_id
            for module in text_encoder.modules():  # the module that pools holds its own copy
                if hasattr(module, "eos_token_id"):
                    module.eos_token_id = tokenizer.eos_token_id
        return tokenizers, text_encoders

    def encode(self, text_encoders, ids: torch.Tensor) -> torch.Tensor:
        import torch

        first = text_encoders[0](ids[:, 0], output_hidden_states=True)
        second = text_encoders[1](ids[:, 1], output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds.to(states.dtype)
        if pooled.shape[-1] > states.shape[-1]:
            raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the text states' width {states.shape[-1]}")
        pooled_token = torch.nn.functional.pad(pooled, (0, states.shape[-1] - pooled.shape[-1]))[:, None]
        return torch.cat([states, pooled_token], dim=1)

    @staticmethod
    def split(states: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return states[:, :-1], states[:, -1, :pooled_width]

    def unet_conditioning(self, states: torch.Tensor, pixel_size: tuple[int, int]) -> dict[str, Any]:
        import torch

        hidden, pooled = self.split(states, self.pooled_width)
        height, width = pixel_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=states.device, dtype=states.dtype)
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(states.shape[0], -1)},
        }

    def pipeline(self, base, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=self.zeros_for_empty_prompt,
            add_watermarker=False,
        )

    def pipeline_embeds(self, states: torch.Tensor, negative: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, pooled = self.split(states, self.pooled_width)
        negative_hidden, negative_pooled = self.split(negative, self.pooled_width)
        return {
            "prompt_embeds": hidden,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_hidden,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def step_embeds(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, pooled = self.split(states, self.pooled_width)
        return {"prompt_embeds": hidden, "add_text_embeds": pooled}


def detect_family(source: str, unet_config: dict) -> ModelFamily:
    """The family of a diffusers model: its ``model_index.json`` pipeline class when it has one, else its UNet
    (SDXL's is conditioned on ``text_time``)."""
    model_index: dict = {}
    try:
        from diffusers import DiffusionPipeline

        model_index = dict(DiffusionPipeline.load_config(source))
    except (OSError, ValueError):
        pass
    if model_index and not any(model_index.get("text_encoder") or ()):
        raise UsageError(
            f"'{source}' has no first text encoder (an SDXL refiner?); e4t personalizes base models",
            hint="pass --base-model a Stable Diffusion 1.x/2.x or XL base model",
        )
    if "XL" in str(model_index.get("_class_name", "")) or unet_config.get("addition_embed_type") == "text_time":
        projection = unet_config.get("projection_class_embeddings_input_dim") or 0
        time_width = 6 * (unet_config.get("addition_time_embed_dim") or 0)
        zeros = bool(model_index.get("force_zeros_for_empty_prompt", True))
        return StableDiffusionXL(pooled_width=projection - time_width, zeros_for_empty_prompt=zeros)
    return ModelFamily()
