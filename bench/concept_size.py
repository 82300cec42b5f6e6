"""Size on disk of a concept file and of a domain checkpoint at SD 1.5 (or SDXL) shapes.

What it computes, from parameter counts (nothing is downloaded):

- a concept (``e4t tune``'s output) holds, in fp16 (``--save-precision fp32``
  doubles it): the tuned encoder folded on its reference
  (``ConceptEncoder``: the layers that read the noisy latent, and one vector
  for the reference; the image branch is gone), and for every to_q/to_k/to_v
  of every attention layer the two factors of dW
  (``E4TModel.concept_state_dict``: a column (out x k) and a row (in x k),
  k = 1 for 'paper', the rank for 'lowrank'). SD 1.5 + ViT-H/14: the encoder
  is configured as ``e4tcli.api.pretrain`` does it (backbone width 1280, every
  2nd of 32 layers, the UNet's block_out_channels + mid block, token width
  768, hidden 768);
- a domain checkpoint (``e4t pretrain``'s output) holds the encoder and the
  offsets in their trainable form: 'paper' has per projection the constant,
  the two maps to column and row, and the out x out and in x in maps (P, Q).

The UNet is instantiated on the meta device (shapes, no memory) and walked
the way ``add_weight_offsets`` walks it; offsets and the encoder are built on
the meta device from e4t's own classes, so the counts follow the code.

The formula is VERIFIED on the tiny model: a real concept is written with
``e4tcli.io.concept.save_concept`` and its size compared with 8 + header +
predicted tensor bytes. The SD 1.5-shaped concept is also written (zeros,
into a temp folder, ~80 MB) to measure its header.

Why: concepts are meant to be shared like LoRAs, not 4 GB UNets.
TARGET: a concept file <= 10 MB (MB = 10^6 bytes here); its kohya export
(``e4t export --format kohya``: LoRA + embedding) < 10 MB at the default rank.

``--model sdxl``: the same at SDXL's shapes (UNet 2.6 G, the token width 768 + 1280 of its two text
encoders, the embedding exported as ``clip_l`` and ``clip_g``), with the same ViT-H/14 backbone.

Usage: .venv/bin/python bench/concept_size.py [--model sd15|sdxl] [--rank 4] [--no-write] [--json]
"""

import argparse
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FP32 = 4
FP16 = 2


@dataclass
class Config:
    rank: int = 4
    write: bool = True
    json: bool = False
    model: str = "sd15"


@dataclass
class ModelShapes:
    label: str
    spec: common.SizeSpec
    token_widths: tuple[int, ...]
    """The text encoders' token widths: one per embedding table ``S*`` is a word of."""

    def embedding_file(self) -> dict[str, torch.Tensor]:
        """``e4t export --format kohya``'s embedding file, zeros."""
        if len(self.token_widths) == 1:
            return {"emb_params": torch.zeros(1, self.token_widths[0])}
        return {"clip_l": torch.zeros(1, self.token_widths[0]), "clip_g": torch.zeros(1, self.token_widths[1])}


MODELS = {
    "sd15": ModelShapes("SD 1.5", common.SD15, (768,)),
    "sdxl": ModelShapes("SDXL", common.SDXL, (768, 1280)),
}


@dataclass
class Counts:
    """Parameter counts of what a concept and a domain checkpoint store."""

    projections: int
    encoder: int
    concept_encoder: int
    encoder_parts: dict
    concept_offsets: int
    checkpoint_offsets: int
    encoder_matrix_values: int
    """Values in the concept encoder's weight matrices (``--save-precision int8`` stores them in a byte)."""
    encoder_matrix_rows: int

    def concept_bytes(self, precision: str = "fp16") -> int:
        values = self.concept_encoder + self.concept_offsets
        if precision == "fp32":
            return FP32 * values
        if precision == "int8":
            matrices = self.encoder_matrix_values
            return FP16 * (values - matrices + self.encoder_matrix_rows) + matrices
        return FP16 * values

    @property
    def checkpoint_bytes(self) -> int:
        return FP32 * (self.encoder + self.checkpoint_offsets)


def projections(unet) -> list[tuple[str, int, int]]:
    """(name, out, in) of every q/k/v projection that ``add_weight_offsets`` wraps."""
    from diffusers.models.attention_processor import Attention

    from e4tcli.models.weight_offsets import TARGETS, OffsetLinear

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for target in TARGETS:
                layer = getattr(module, target)
                layer = layer.base_layer if isinstance(layer, OffsetLinear) else layer
                found.append((f"{name}.{target}", layer.out_features, layer.in_features))
    return found


def count(unet, encoder_config, offset_config) -> Counts:
    from e4tcli.models.encoder import ConceptEncoder, E4TEncoder
    from e4tcli.models.weight_offsets import make_offset

    layers = projections(unet)
    concept_offsets = checkpoint_offsets = 0
    with torch.device("meta"):
        encoder = E4TEncoder(encoder_config)
        folded_state = ConceptEncoder(encoder_config).state_dict()
        folded = sum(t.numel() for t in folded_state.values())
        matrices = [t for t in folded_state.values() if t.ndim == 2]
        for _, out_features, in_features in layers:
            offset = make_offset(offset_config, out_features, in_features)
            checkpoint_offsets += common.count(offset.parameters())
            concept_offsets += sum(f.numel() for f in offset.factors())
    parts = {
        "image_layers": common.count(encoder.image_layers.parameters()),
        "unet_layer": common.count(encoder.unet_layer.parameters()),
        "head": common.count(encoder.head.parameters()),
    }
    return Counts(
        len(layers),
        common.count(encoder.parameters()),
        folded,
        parts,
        concept_offsets,
        checkpoint_offsets,
        sum(t.numel() for t in matrices),
        sum(t.shape[0] for t in matrices),
    )


def encoder_config_for(unet, shapes: ModelShapes):
    """As ``e4tcli.api.pretrain`` configures it for this UNet and a ViT-H/14 backbone."""
    from e4tcli.models.e4t import unet_channels
    from e4tcli.models.encoder import EncoderConfig

    return EncoderConfig(
        backbone_hidden_size=1280,
        backbone_layers=EncoderConfig.every_second_layer(32),
        unet_channels=unet_channels(unet),
        embedding_dim=sum(shapes.token_widths),
        hidden_dim=768,
    )


def concept_info(model, image: str = "image.png") -> dict:
    """Metadata shaped like ``e4tcli.api.tune``'s (the header holds it as JSON)."""
    from dataclasses import asdict

    from e4tcli import __version__
    from e4tcli.training.tune import TuneSettings

    tuning = TuneSettings(
        steps=5, learning_rate=1.6e-5, batch_size=16, resolution=512, lambda_emb=0.1, lambda_weights=1e-4
    )
    return {
        "domain": "faces",
        "class_word": model.class_word,
        "token": "S*",
        "base_model": {"source": "runwayml/stable-diffusion-v1-5", "fingerprint": "0123456789abcdef"},
        "backbone": {"source": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "fingerprint": "0123456789abcdef"},
        "checkpoint": {"source": "/checkpoints/faces", "fingerprint": "0123456789abcdef"},
        **model.describe(),
        "tuning": asdict(tuning),
        "image": image,
        "e4t_version": __version__,
    }


def header_bytes(path: Path) -> int:
    """safetensors: an 8-byte little-endian length, then a JSON header of that length."""
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def write_concept(tensors: dict, info: dict, precision: str = "fp16") -> tuple[int, int]:
    """(file bytes, header bytes) of ``tensors`` written with e4t's own ``save_concept``."""
    from e4tcli.io.concept import save_concept

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "concept.safetensors"
        size = save_concept(path, tensors, info, precision)
        return size, header_bytes(path)


def verify_tiny(kind: str, rank: int) -> dict:
    """Write a real tiny concept and compare its size with the formula."""
    from e4tcli.device import Placement
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.weight_offsets import OffsetConfig

    base = common.build_base("tiny")
    encoder_config = common.encoder_config_for(base, common.vision_config("tiny"))
    offset_config = OffsetConfig(kind=kind, rank=rank)
    predicted = count(base.unet, encoder_config, offset_config)
    model = E4TModel(base, "face", encoder_config, offset_config, Placement(torch.device("cpu"), torch.float32))
    features = torch.randn(1, len(encoder_config.backbone_layers), encoder_config.backbone_hidden_size)
    size, header = write_concept(model.concept_state_dict(features), concept_info(model))
    payload = size - 8 - header
    return {
        "model": "tiny",
        "offsets": kind,
        "predicted_tensor_bytes": predicted.concept_bytes(),
        "file_bytes": size,
        "header_bytes": header,
        "file_minus_header": payload,
        "match": payload == predicted.concept_bytes(),
    }


def model_rows(cfg: Config) -> tuple[list[dict], dict, dict]:
    from e4tcli.models.weight_offsets import OffsetConfig

    shapes = MODELS[cfg.model]
    with torch.device("meta"):
        torch.manual_seed(0)
        unet = common.build_unet(shapes.spec)
    encoder_config = encoder_config_for(unet, shapes)
    rows, parts, measured = [], None, {}
    for kind in ("paper", "lowrank"):
        offset_config = OffsetConfig(kind=kind, rank=cfg.rank)
        c = count(unet, encoder_config, offset_config)
        parts = c.encoder_parts
        label = kind if kind == "paper" else f"lowrank r={cfg.rank}"
        for precision in ("fp16", "int8"):
            header = None
            if cfg.write:
                header = measure_header(unet, encoder_config, offset_config, c, precision)
                measured[kind] = header
            rows.append(
                {
                    "file": f"concept {precision}",
                    "offsets": label,
                    "encoder_params": c.concept_encoder,
                    "offset_params": c.concept_offsets,
                    "MB": c.concept_bytes(precision) / 1e6,
                    "header_kB": None if header is None else header["header"] / 1e3,
                    "file_MB": None if header is None else header["size"] / 1e6,
                }
            )
        rows.append(
            {
                "file": "domain checkpoint",
                "offsets": label,
                "encoder_params": c.encoder,
                "offset_params": c.checkpoint_offsets,
                "MB": c.checkpoint_bytes / 1e6,
            }
        )
    bias_values = bias_change_count(unet)
    rows.append(
        {
            "file": "bias changes fp16 (tune --bias-lr)",
            "offsets": "-",
            "offset_params": bias_values,
            "MB": FP16 * bias_values / 1e6,
        }
    )
    additive_values, additive_rows = additive_change_count(unet, ADDITIVE_RANK)
    rows.append(
        {
            "file": f"additive changes int8 (tune --additive-rank {ADDITIVE_RANK})",
            "offsets": "-",
            "offset_params": additive_values,
            "MB": (additive_values + FP16 * additive_rows) / 1e6,
        }
    )
    unet_params = common.count(unet.parameters())
    rows.append(
        {"file": "dreambooth UNet fp16", "offsets": "-", "offset_params": unet_params, "MB": 2 * unet_params / 1e6}
    )
    width = sum(shapes.token_widths)
    rows.append({"file": "textual inversion fp32", "offsets": "-", "offset_params": width, "MB": FP32 * width / 1e6})
    meta = {"attention_projections": c.projections, "encoder_config": encoder_config.__dict__}
    return rows, parts, meta


ADDITIVE_RANK = 16
"""The rank minifaces tunes its additive changes at."""


def additive_change_count(unet, rank: int) -> tuple[int, int]:
    """Values and int8 rows (one fp16 scale each) a concept adds with ``tune --additive-rank``: ``U`` (out x
    rank) and ``V`` (in x rank) for every q/k/v projection."""
    rows = sum(out_features + in_features for _, out_features, in_features in projections(unet))
    return rank * rows, rows


def bias_change_count(unet) -> int:
    """Values a concept adds with ``tune --bias-lr``: one per UNet bias and normalization scale and shift."""
    from e4tcli.models.bias_offsets import bias_targets, change_size

    return sum(change_size(module) for module in bias_targets(unet).values())


def measure_header(unet, encoder_config, offset_config, counts: Counts, precision: str) -> dict:
    """Write a concept of zeros at these shapes through ``save_concept``; check the size and return it."""
    from e4tcli.models.encoder import ConceptEncoder
    from e4tcli.models.weight_offsets import make_offset

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ConceptEncoder(encoder_config).state_dict().items()}
    tensors = {f"encoder.{k}": torch.zeros(shape) for k, shape in shapes.items()}
    with torch.device("meta"):
        for name, out_features, in_features in projections(unet):
            column, row = make_offset(offset_config, out_features, in_features).factors()
            tensors[f"offsets.{name}.column"] = torch.zeros(column.shape, device="cpu")
            tensors[f"offsets.{name}.row"] = torch.zeros(row.shape, device="cpu")

    class Described:  # what concept_info needs of a model
        class_word = "face"

        @staticmethod
        def describe():
            from dataclasses import asdict

            return {"encoder": asdict(encoder_config), "offsets": asdict(offset_config)}

    size, header = write_concept(tensors, concept_info(Described), precision)
    assert size - 8 - header == counts.concept_bytes(precision), "the concept's size does not follow the formula"
    return {"size": size, "header": header}


EXPORT_RANKS = (4, 16, 64)


def kohya_export_rows(unet, shapes: ModelShapes) -> list[dict]:
    """``e4t export --format kohya`` at these shapes: the LoRA file (every q/k/v projection at the rank,
    factors in fp16, alphas) and the embedding file, both written (zeros) with export's own code."""
    from e4tcli.export import save_safetensors
    from e4tcli.export.lora import LoraLayer, kohya_tensors
    from e4tcli.io.concept import stored_tensors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        embedding = Path(tmp) / "token.safetensors"
        save_safetensors(shapes.embedding_file(), embedding, {"format": "e4t-export", "e4t": "{}"})
        for rank in EXPORT_RANKS:
            layers = {
                name: LoraLayer(torch.zeros(rank, in_features), torch.zeros(out_features, rank), 0.0, 0.0)
                for name, out_features, in_features in projections(unet)
            }
            path = Path(tmp) / f"lora-{rank}.safetensors"
            save_safetensors(stored_tensors(kohya_tensors(layers)), path, {"format": "e4t-export", "e4t": "{}"})
            values = sum(FP16 * rank * (o + i) for _, o, i in projections(unet)) // FP16
            rows.append(
                {
                    "file": f"export kohya, rank {rank}",
                    "lora_values": values,
                    "lora_MB": path.stat().st_size / 1e6,
                    "embedding_kB": embedding.stat().st_size / 1e3,
                    "total_MB": (path.stat().st_size + embedding.stat().st_size) / 1e6,
                }
            )
    return rows


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4, help="rank of the 'lowrank' offsets")
    parser.add_argument("--no-write", action="store_true", help="do not write the full-size concept")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", choices=tuple(MODELS), default="sd15", help="whose shapes (default: sd15)")
    args = parser.parse_args(argv)
    return Config(args.rank, not args.no_write, args.json, args.model)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    json_out = common.reserve_stdout_for_json(cfg.json)
    shapes = MODELS[cfg.model]
    rows, parts, meta = model_rows(cfg)
    with torch.device("meta"):
        torch.manual_seed(0)
        unet = common.build_unet(shapes.spec)
    exported = kohya_export_rows(unet, shapes)
    checks = [verify_tiny("paper", cfg.rank), verify_tiny("lowrank", cfg.rank)]
    concepts = {row["file"]: row for row in rows if row["offsets"] == "paper" and row["file"].startswith("concept")}
    if cfg.json:
        print(
            json.dumps(
                {cfg.model: rows, "encoder_parts": parts, **meta, "exported": exported, "tiny_checks": checks},
                indent=2,
                default=str,
            ),
            file=json_out,
        )
        return
    print(
        f"{shapes.label} + ViT-H/14 shapes; {meta['attention_projections']} q/k/v projections; "
        "concepts fp16 or int8 (--save-precision), checkpoints fp32; MB = 1e6 bytes"
    )
    common.print_table(rows, ["file", "offsets", "encoder_params", "offset_params", "MB", "header_kB", "file_MB"])
    print()
    total = sum(parts.values())
    common.print_table(
        [{"encoder part": k, "params": v, "MB (fp16)": FP16 * v / 1e6, "share": v / total} for k, v in parts.items()],
        title=f"domain encoder parameters ({shapes.label} + ViT-H/14); a concept keeps unet_layer and half of head",
    )
    print()
    common.print_table(checks, title="formula check on the tiny model (real concept written with save_concept)")
    common.print_table(
        exported,
        ["file", "lora_values", "lora_MB", "embedding_kB", "total_MB"],
        title="e4t export --format kohya (a LoRA on every q/k/v projection; target < 10 MB)",
    )
    print()
    for name, concept in concepts.items():
        size = concept["file_MB"] if concept["file_MB"] is not None else concept["MB"]
        print(f"target {name} <= 10 MB: {size:.2f} MB {'OK' if size <= 10 else 'MISSED'}")


if __name__ == "__main__":
    main()
