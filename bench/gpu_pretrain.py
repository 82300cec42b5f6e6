"""Cost of one domain pre-training step at SD 1.5 shapes (for a GPU).

What it measures: ``e4tcli.training.pretrain.pretrain_domain``, the function
``e4t pretrain`` runs, on random weights with the exact SD 1.5 shapes and a
ViT-H/14-shaped CLIP vision backbone, with the accelerator and placement
``e4t pretrain`` makes (``e4tcli.api.make_accelerator``: fp16/bf16 frozen
weights, fp32 trainable weights, mixed precision), on a dataset of random
512 px images held in memory. For each configuration (precision, offsets,
gradient checkpointing, decoded images or ``--cache-features``):

- seconds per step: the median of the per-step times ``pretrain_domain`` logs,
  leaving out the first two steps (CUDA warm-up); a step includes decoding,
  VAE and backbone encoding (unless cached), the E4T step, backward and AdamW;
- peak VRAM (``torch.cuda.max_memory_allocated`` over the whole run);
- the final checkpoint: gathering its state, writing it, and its size.

Each configuration runs in a fresh subprocess (accelerate's state is
per-process, and the peak memory of one must not carry into the next).

Why: the README's "expected time and memory on common GPUs" for the
paper-scale recipes (batch 16 at 512 px, tens of thousands of steps).

On a CPU it runs at ``--size tiny`` (the default there) so the script is
known to work; the times then say nothing about GPUs.

Usage: .venv/bin/python bench/gpu_pretrain.py [--size tiny|medium|sd15] [--batch-size 16]
       [--steps 8] [--configs fp16:paper:ckpt,bf16:lowrank:ckpt:cache,...] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TEMPLATES = ("a photo of S*", "a portrait of S*", "a close-up photo of S*")
GPU_CONFIGS = "fp16:paper:-,fp16:paper:ckpt,bf16:paper:ckpt,fp16:lowrank:ckpt,fp16:paper:ckpt:cache"
CPU_CONFIGS = "fp32:paper:-,fp32:paper:ckpt,fp32:lowrank:ckpt:cache"


@dataclass
class RunSpec:
    precision: str
    offsets: str
    gradient_checkpointing: bool
    cache_features: bool

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[2] not in ("ckpt", "-") or parts[3:] not in ([], ["cache"]):
            raise SystemExit(f"bad config '{text}': use PRECISION:paper|lowrank:ckpt|-[:cache]")
        return cls(parts[0], parts[1], parts[2] == "ckpt", parts[3:] == ["cache"])

    def label(self) -> str:
        return ":".join(
            [self.precision, self.offsets, "ckpt" if self.gradient_checkpointing else "-"]
            + (["cache"] if self.cache_features else [])
        )


def run_one(spec: RunSpec, size: str, batch_size: int, steps: int, device: Optional[str]) -> dict:
    import torch

    import e4tcli.training.pretrain as pretrain_module
    from e4tcli.api import enable_gradient_checkpointing, make_accelerator, training_scheduler
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.weight_offsets import OffsetConfig
    from e4tcli.training.pretrain import PretrainJob, PretrainSettings, pretrain_domain

    accelerator, placement = make_accelerator(device, spec.precision, 1)
    cuda = placement.device.type == "cuda"
    resolution = common.resolution_of(size)
    base = common.build_base(size, placement.device, placement.dtype)
    backbone = common.build_backbone(size, placement.device, placement.dtype)
    encoder_config = common.encoder_config_for(base, backbone.model.config)
    torch.manual_seed(0)
    model = E4TModel(base, "face", encoder_config, OffsetConfig(kind=spec.offsets), placement)
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = common.count(model.trainable_parameters())
    if cuda:
        torch.cuda.synchronize()
    resident_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None

    timings = {"gather": 0.0, "write": 0.0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] += time.perf_counter() - began

        return wrapper

    pretrain_module.gather_full_state = timed("gather", pretrain_module.gather_full_state)
    pretrain_module.save_training_checkpoint = timed("write", pretrain_module.save_training_checkpoint)

    dataset = [common.random_image(resolution, seed) for seed in range(2 * batch_size)]
    settings = PretrainSettings(
        steps=steps,
        learning_rate=1.6e-5,
        batch_size=batch_size,
        resolution=resolution,
        lambda_emb=1e-4,
        lambda_weights=1e-4,
        cache_features=spec.cache_features,
    )
    config = {"base_model": {"fingerprint": "random"}, "backbone": {"fingerprint": "random"}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        note = "ok"
        began = time.perf_counter()
        try:
            job = PretrainJob(
                model,
                backbone,
                dataset,
                TEMPLATES,
                settings,
                training_scheduler(base),
                Path(run_dir),
                config,
                accelerator,
            )
            history, checkpoint = pretrain_domain(job)
            checkpoint_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**20
        except torch.cuda.OutOfMemoryError:
            history, checkpoint_mb, note = [], None, "out of memory"
        total = time.perf_counter() - began
    measured = [record["seconds"] for record in history[2:]] or [record["seconds"] for record in history]
    seconds = common.median(measured) if measured else None
    return dict(
        config=spec.label(),
        trainable_m=trainable / 1e6,
        s_per_step=seconds,
        images_per_s=(batch_size / seconds if seconds else None),
        resident_gb=resident_gb,
        peak_gb=(torch.cuda.max_memory_allocated() / 2**30 if cuda else None),
        gather_s=timings["gather"],
        write_s=timings["write"],
        checkpoint_mb=checkpoint_mb,
        total_s=total,
        final_loss=(history[-1]["loss"] if history else None),
        note=note,
    )


def run_in_subprocess(spec: RunSpec, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        spec.label(),
        "--size",
        args.size,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
    ]
    if args.device:
        command += ["--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
        return dict(config=spec.label(), note=f"failed: {reason}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=common.SIZES, help="default: sd15 on CUDA, tiny elsewhere")
    parser.add_argument("--device")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (the paper's: 16)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--configs", help=f"comma-separated PRECISION:OFFSETS:ckpt|-[:cache] (CUDA default: {GPU_CONFIGS})"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.apply_common_args(args)
    import torch

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.size = args.size or ("sd15" if cuda else "tiny")
    args.configs = args.configs or (GPU_CONFIGS if cuda else CPU_CONFIGS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    json_out = common.reserve_stdout_for_json(args.json or bool(args.one))
    if args.one:
        print(
            json.dumps(run_one(RunSpec.parse(args.one), args.size, args.batch_size, args.steps, args.device)),
            file=json_out,
        )
        return
    specs = [RunSpec.parse(text) for text in args.configs.split(",")]
    rows = [run_in_subprocess(spec, args) for spec in specs]
    if args.json:
        print(
            json.dumps({"size": args.size, "batch_size": args.batch_size, "steps": args.steps, "rows": rows}, indent=2),
            file=json_out,
        )
        return
    import torch

    from e4tcli.device import choose_placement

    device = choose_placement(args.device, "auto").device
    print(
        f"pretrain bench: size={args.size} {common.resolution_of(args.size)}px batch={args.batch_size} "
        f"steps={args.steps} device={common.describe_device(device)} torch={torch.__version__}"
    )
    print(
        "config = precision:offsets:gradient checkpointing[:cached features]; s_per_step = median of steps 3..N; "
        "peak_gb = torch.cuda.max_memory_allocated over the run"
    )
    columns = [
        "config",
        "trainable_m",
        "s_per_step",
        "images_per_s",
        "resident_gb",
        "peak_gb",
        "gather_s",
        "write_s",
        "checkpoint_mb",
        "note",
    ]
    common.print_table(rows, columns)


if __name__ == "__main__":
    main()
