"""The CLIP tokenizer rebuilt from clip-anytorch's BPE file, the CLIP word list,
and the tiny random-weight models of e4tcli.tiny."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from e4tcli import clip_bpe

A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
WORDS_FILE = Path(clip_bpe.__file__).parent / "data" / "clip_words.txt.gz"


def test_vocab_follows_openai_rule():
    vocab = clip_bpe.build_vocab(clip_bpe.load_merges())
    assert len(vocab) == 49408
    assert len(set(vocab)) == 49408
    assert vocab[:2] == ["!", '"']
    assert vocab[320] == "a</w>" and vocab[2368] == "cat</w>"
    assert vocab[49406:] == ["<|startoftext|>", "<|endoftext|>"]


def test_clip_words_file():
    words = set(gzip.open(WORDS_FILE, "rt", encoding="utf-8").read().splitlines())
    assert {"face", "cat", "painting", "dog"} <= words
    assert "xyzzyq" not in words
    assert "" not in words


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")


def test_tokenizer_matches_clip(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    assert tokenizer("A  Photo of a CAT").input_ids == A_PHOTO_OF_A_CAT
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    padded = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[3:]) == {49407}


def test_added_placeholder_is_one_token(tiny_sd):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    assert tok.add_tokens(["S*"]) == 1
    assert tok.convert_tokens_to_ids("S*") == 49408
    assert tok("a photo of S*").input_ids == [49406, 320, 1125, 539, 49408, 49407]


def _load_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_generates_deterministically(tiny_sd):
    import numpy as np
    import torch

    pipe = _load_pipe(tiny_sd)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32

    def generate(seed):
        gen = torch.Generator().manual_seed(seed)
        out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=gen)
        return np.asarray(out.images[0])

    first, again, other = generate(0), generate(0), generate(1)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_unet_has_self_and_cross_attention(tiny_sd):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    names = list(unet.attn_processors)
    n_self = sum(".attn1." in n for n in names)
    n_cross = sum(".attn2." in n for n in names)
    assert n_self >= 4 and n_cross >= 4
    assert sum(n.startswith("down_blocks.") and ".attn2." in n for n in names) >= 2


def test_build_is_deterministic(tiny_sd, tmp_path):
    from e4tcli.tiny import build_tiny_base_model

    def digest(folder):
        files = sorted(p for p in folder.rglob("*.safetensors"))
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]

    again = build_tiny_base_model(tmp_path / "sd", seed=0)
    assert len(digest(again)) == 3
    assert digest(again) == digest(tiny_sd)


def test_v_prediction_scheduler(tiny_sd_v):
    pipe = _load_pipe(tiny_sd_v)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.steps_offset == 1


def test_backbone_hidden_states(tiny_backbone):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tiny_backbone).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_backbone)
    images = [Image.fromarray(np.full((48, 64, 3), v, dtype=np.uint8)) for v in (40, 200)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for h in out.hidden_states:
        assert h.shape == (2, 1 + (32 // 8) ** 2, 32)
        assert h[:, 0].shape == (2, 32)  # CLS token


def test_tiny_sdxl_draws_with_the_diffusers_pipeline(tmp_path):
    """The tiny SDXL folder has SDXL's layout: two text encoders whose states are concatenated for
    cross-attention, the second's projected pooled output and the time ids through ``added_cond_kwargs``."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from e4tcli.tiny import build_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == widths
    out = pipe(
        "a photo of a cat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    )
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
