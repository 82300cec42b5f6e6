"""Random-weight Stable Diffusion parts for the benchmarks, at three sizes.

- ``tiny``: exactly the shapes of ``e4tcli.tiny`` (built there into a temp
  folder, then loaded with ``load_base_model`` / ``load_backbone``, the code
  path tests use). 64 px, UNet 1.4 M params.
- ``medium``: the SD 1.5 *layout* (3 CrossAttnDownBlock2D + DownBlock2D, the
  mirrored up blocks, 2 layers per block, cross-attention width 768, the real
  49,408-token text vocabulary) with fewer channels and text layers; 128 px.
  Big enough that the cost *ratios* between methods resemble SD 1.5's, small
  enough to time on a laptop CPU.
- ``sd15``: the exact SD 1.5 shapes (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text
  123 M) and a ViT-H/14-shaped CLIP vision tower (632 M) as the encoder
  backbone. For GPUs and for counting parameters (build it on
  ``torch.device("meta")``).
- ``tiny-sdxl``, ``medium-sdxl``, ``sdxl``: the same three for Stable Diffusion
  XL: ``e4tcli.tiny``'s SDXL folder; the SDXL layout (three levels, the last
  two with 2 and 4 transformer blocks instead of 2 and 10, two text encoders
  of widths 768 and 1280 with 2 layers each, the pooled embedding and time ids)
  at 128 px; and the exact SDXL shapes (UNet 2.6 G, CLIP ViT-L 123 M and
  OpenCLIP bigG 695 M text encoders) at 1024 px.

``medium`` and ``sd15`` are built in memory; only the tokenizer goes through
a temp folder (``CLIPTokenizer`` reads files). Weights are random but seeded.
"""

import copy
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns as time_ns  # noqa: F401 (the benchmarks' clock, re-exported)
from typing import Optional

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from e4tcli.models.family import ModelFamily, StableDiffusionXL
from e4tcli.models.loading import Backbone, BaseModel

SIZES = ("tiny", "medium", "sd15", "tiny-sdxl", "medium-sdxl", "sdxl")
SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class SizeSpec:
    name: str
    resolution: int
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    text_2: dict = field(default_factory=dict)
    """SDXL's second text encoder (with a projection); empty for SD 1.x/2.x."""


MEDIUM = SizeSpec(
    name="medium",
    resolution=128,
    unet=dict(
        sample_size=16,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=SD15_DOWN,
        up_block_types=SD15_UP,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32, sample_size=128),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12),
    vision=dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
    ),
)

SD15 = SizeSpec(
    name="sd15",
    resolution=512,
    unet=dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=SD15_DOWN,
        up_block_types=SD15_UP,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
)

SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SDXL_TEXT_TIME = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
    use_linear_projection=True,
)

MEDIUM_SDXL = SizeSpec(
    name="medium-sdxl",
    resolution=128,
    unet=dict(
        sample_size=16,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 4),
        down_block_types=SDXL_DOWN,
        up_block_types=SDXL_UP,
        cross_attention_dim=768 + 1280,
        attention_head_dim=(2, 4, 8),
        norm_num_groups=32,
        **SDXL_TEXT_TIME,
    ),
    vae=MEDIUM.vae,
    text=MEDIUM.text,
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=20),
    vision=MEDIUM.vision,
)

SDXL = SizeSpec(
    name="sdxl",
    resolution=1024,
    unet=dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        down_block_types=SDXL_DOWN,
        up_block_types=SDXL_UP,
        cross_attention_dim=768 + 1280,
        attention_head_dim=(5, 10, 20),
        norm_num_groups=32,
        **SDXL_TEXT_TIME,
    ),
    vae={**SD15.vae, "sample_size": 1024},
    text=SD15.text,
    text_2=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu"
    ),
    vision=SD15.vision,
)

SPECS = {"medium": MEDIUM, "sd15": SD15, "medium-sdxl": MEDIUM_SDXL, "sdxl": SDXL}
TINY_RESOLUTION = 64


def resolution_of(size: str) -> int:
    return TINY_RESOLUTION if size.startswith("tiny") else SPECS[size].resolution


def is_sdxl(size: str) -> bool:
    return size.endswith("sdxl")


# --------------------------------------------------------------------------- pieces
def scheduler_config() -> dict:
    """SD 1.x's scheduler: PNDM (skip_prk_steps), scaled-linear betas, epsilon, steps_offset 1."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        skip_prk_steps=True,
        prediction_type="epsilon",
    )
    return dict(scheduler.config)


def sdxl_scheduler_config() -> dict:
    """SDXL's scheduler (``e4tcli.tiny.sdxl_scheduler``), its class named as a saved config names it."""
    from e4tcli.tiny import sdxl_scheduler

    scheduler = sdxl_scheduler()
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


_TOKENIZER = None


def tokenizer():
    """A fresh copy of the real CLIP tokenizer (49,408 tokens, max length 77)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import CLIPTokenizer

        from e4tcli.clip_bpe import write_tokenizer_files

        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer_files(tmp)
            _TOKENIZER = CLIPTokenizer.from_pretrained(tmp)
        _TOKENIZER.model_max_length = 77
    return copy.deepcopy(_TOKENIZER)


def build_unet(spec: SizeSpec):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=4, out_channels=4, **spec.unet)


def build_vae(spec: SizeSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **spec.vae,
    )


def build_text_encoder(text: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=text["hidden_size"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **text,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_vision(spec: SizeSpec):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(projection_dim=1024, **spec.vision))


def _place(modules, device, dtype):
    for module in modules:
        module.requires_grad_(False).eval()
        module.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- public
def build_base(size: str, device="cpu", dtype=torch.float32, seed: int = 0) -> BaseModel:
    """A frozen random-weight ``BaseModel`` of ``size`` on ``device`` in ``dtype``."""
    if size.startswith("tiny"):
        from e4tcli.models.loading import load_base_model
        from e4tcli.tiny import build_tiny_base_model, build_tiny_sdxl

        build_tiny = build_tiny_sdxl if is_sdxl(size) else build_tiny_base_model
        with tempfile.TemporaryDirectory() as tmp:
            base = load_base_model(str(build_tiny(Path(tmp) / "model", seed=seed)), device, dtype)
        base.source = size
        return base
    spec = SPECS[size]
    # Construct directly on the target device: initialising SD 1.5 on a CPU takes ~20 s.
    with torch.device(device):
        torch.manual_seed(seed)
        unet = build_unet(spec)
        torch.manual_seed(seed)
        vae = build_vae(spec)
        torch.manual_seed(seed)
        text_encoders = [build_text_encoder(spec.text)]
        if spec.text_2:
            torch.manual_seed(seed + 1)
            text_encoders.append(build_text_encoder(spec.text_2, with_projection=True))
    _place((unet, vae, *text_encoders), device, dtype)
    if spec.text_2:
        family, scheduler = StableDiffusionXL(pooled_width=spec.text_2["hidden_size"]), sdxl_scheduler_config()
    else:
        family, scheduler = ModelFamily(), scheduler_config()
    tokenizers = tuple(tokenizer() for _ in text_encoders)
    return BaseModel(size, family, tokenizers, tuple(text_encoders), vae, unet, scheduler, "random")


def build_backbone(size: str, device="cpu", dtype=torch.float32, seed: int = 0) -> Backbone:
    """A frozen random-weight CLIP vision tower and a matching image processor."""
    if size.startswith("tiny"):
        from e4tcli.models.loading import load_backbone
        from e4tcli.tiny import build_tiny_backbone

        with tempfile.TemporaryDirectory() as tmp:
            backbone = load_backbone(str(build_tiny_backbone(Path(tmp) / "backbone", seed=seed)), device, dtype)
        backbone.source = "tiny"
        return backbone
    from transformers import CLIPImageProcessor

    spec = SPECS[size]
    with torch.device(device):
        torch.manual_seed(seed)
        model = build_vision(spec)
    _place((model,), device, dtype)
    side = spec.vision["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return Backbone(size, model, processor, "random")


def vision_config(size: str):
    """The backbone's ``CLIPVisionConfig`` (all the encoder needs to know of it)."""
    if size.startswith("tiny"):
        return build_backbone("tiny").model.config
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(projection_dim=1024, **SPECS[size].vision)


def copy_base(base: BaseModel) -> BaseModel:
    """An independent copy (E4TModel wraps the UNet and the text embedding in place)."""
    return copy.deepcopy(base)


def encoder_config_for(base: BaseModel, backbone_config, hidden_dim: int = 768):
    """The encoder configuration ``e4tcli.api.pretrain`` builds for this base model and backbone."""
    from e4tcli.models.e4t import unet_channels
    from e4tcli.models.encoder import EncoderConfig

    return EncoderConfig(
        backbone_hidden_size=backbone_config.hidden_size,
        backbone_layers=EncoderConfig.every_second_layer(backbone_config.num_hidden_layers),
        unet_channels=unet_channels(base.unet),
        embedding_dim=sum(encoder.get_input_embeddings().weight.shape[1] for encoder in base.text_encoders),
        hidden_dim=hidden_dim,
    )


def text_unet_flop_ratio(base: BaseModel, size: str) -> float:
    """Forward FLOPs of the text encoder (77 tokens) over those of the UNet, batch 1.

    SD 1.5 at 512 px: 0.017. The small sizes have a relatively dear text
    encoder (width 768 on a tiny UNet), which inflates the cost of methods that
    run it more (E4T: twice, once with gradient; Textual Inversion: with gradient).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = base.unet.device
    side = resolution_of(size) // 8
    latents = torch.zeros(1, 4, side, side, device=device, dtype=base.unet.dtype)
    ids = base.family.tokenize(base.tokenizers, [""]).to(device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as text:
            states = base.family.encode(base.text_encoders, ids)
        with FlopCounterMode(display=False) as unet:
            conditioning = base.family.unet_conditioning(states, (side * 8, side * 8))
            base.unet(latents, torch.tensor([10], device=device), **conditioning)
    return text.get_total_flops() / unet.get_total_flops()


def random_image(resolution: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


# --------------------------------------------------------------------------- timing and output
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def print_table(rows: list[dict], columns: Optional[list[str]] = None, title: str = "") -> None:
    """A plain-text table; floats get 3 significant decimals."""
    columns = columns or list(rows[0])

    def text(value):
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[text(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


def add_common_args(parser) -> None:
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)"
    )


def add_loss_mask_arg(parser) -> None:
    """``--no-loss-mask``: tune E4T on the whole reference image, not only where the domain's loss mask keeps it."""
    parser.add_argument(
        "--no-loss-mask",
        dest="loss_mask",
        action="store_false",
        help="E4T tunes on the whole image, ignoring the domain's loss mask (default: the mask, as e4t tune does)",
    )


def add_additive_rank_arg(parser) -> None:
    """``--additive-rank R``: the rank of E4T's additive weight changes in tuning."""
    parser.add_argument(
        "--additive-rank",
        type=int,
        help="rank of E4T's additive weight changes (e4t tune --additive-rank; default: the domain's; 0: none)",
    )


def reserve_stdout_for_json(enabled: bool):
    """With --json, stdout carries only the JSON: from here on, whatever else is printed goes to
    stderr (DeepSpeed, which accelerate and transformers import once it is installed, logs to stdout).
    Returns the stream to print the JSON on."""
    json_out = sys.stdout
    if enabled:
        sys.stdout = sys.stderr
    return json_out


def apply_common_args(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by subprocesses


def describe_device(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
