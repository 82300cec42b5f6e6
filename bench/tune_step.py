"""Cost of one optimisation step: E4T tuning vs Textual Inversion vs DreamBooth.

What it measures, on one model size, batch and resolution:

- ``e4t-paper`` / ``e4t-lowrank``: ``e4tcli.training.step.training_step``
  (the encoder's no-grad UNet pass to the mid block, the encoder, the text
  encoder with S*, the UNet with q/k/v offsets; the class prompt's text
  states computed once, as ``tune`` does) + backward + e4t's AdamW over
  ``model.trainable_parameters()``;
- ``textual-inversion``: one trainable embedding vector for S* (through the
  text encoder), frozen UNet, the same noise-prediction loss, AdamW;
- ``dreambooth``: the whole UNet trainable (fp32 master weights, autocast on
  GPUs, as diffusers' train_dreambooth.py does), frozen text encoder, the same
  loss, AdamW. No prior-preservation batch (it would double DreamBooth's batch).

Every method steps with torch's fused AdamW on CPU and CUDA (the fastest
kernel for each, as e4t's tuning uses).

Why: E4T's selling point is personalization in 5-15 steps; that only matters
if each step is not much dearer than the methods it replaces. TARGET: the E4T
('paper') step takes <= 1.3x the DreamBooth step.

Timing: one process, every method on its own copy of the same random base
model, 2 warm-up steps each, then N rounds in which the methods take turns
(the order rotates every round); the median is reported, and each method's
ratio to DreamBooth as the median of the per-round ratios (a round's methods
ran within a second of one another, so machine noise cancels in the ratio)
with the quartiles of those ratios as its spread.

Memory: a fresh subprocess per method imports everything, builds only that
method's model and runs 1 + 2 steps. ``resident_mb``: memory held after the
first step (model, optimizer state); ``peak_mb``: the peak over the 2 more
steps (adds activations and gradients). CUDA: torch.cuda.memory_allocated /
max_memory_allocated. CPU: process RSS / peak RSS (VmHWM, reset through
/proc/self/clear_refs before the 2 steps), minus the RSS after the imports.

Usage: .venv/bin/python bench/tune_step.py [--size tiny|medium|sd15] [--batch-size N]
       [--steps N] [--device cpu|cuda] [--no-memory] [--json]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

METHODS = ("e4t-paper", "e4t-lowrank", "textual-inversion", "dreambooth")
CLASS_WORD = "face"
LAMBDA_EMB, LAMBDA_WEIGHTS = 0.1, 1e-4  # the faces domain's tuning defaults


@dataclass
class Config:
    size: str = "tiny"
    batch_size: Optional[int] = None  # default: 16 on CUDA (the paper's), 4 on CPU
    steps: int = 10  # timed rounds
    warmup: int = 2
    device: Optional[str] = None
    methods: tuple = METHODS
    memory: bool = True
    json: bool = False
    probe: Optional[str] = None  # internal: measure memory of one method and print JSON


@dataclass
class Runner:
    method: str
    step: Callable[[], None]
    trainable: int


def make_placement(device: str):
    from e4tcli.device import choose_placement

    return choose_placement(device)


def noisy_inputs(latents, scheduler, generator):
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator, device=latents.device)
    return noise, timesteps, scheduler.add_noise(latents, noise, timesteps)


def setup_e4t(base, placement, cfg: Config, kind: str) -> Runner:
    from diffusers import DDPMScheduler

    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.weight_offsets import OffsetConfig
    from e4tcli.training.step import Batch, training_step
    from e4tcli.training.tune import optimizer_for

    encoder_config = common.encoder_config_for(base, common.vision_config(cfg.size))
    model = E4TModel(base, CLASS_WORD, encoder_config, OffsetConfig(kind=kind), placement)
    optimizer = optimizer_for(model, 1.6e-5, 0.0)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    device, b = placement.device, cfg.batch_size
    side = common.resolution_of(cfg.size) // 8
    prompts = ["a photo of S*"] * b
    batch = Batch(
        latents=torch.randn(b, 4, side, side, device=device),
        image_features=torch.randn(
            b, len(encoder_config.backbone_layers), encoder_config.backbone_hidden_size, device=device
        ),
        prompt_ids=model.tokenize(prompts),
        class_prompt_ids=model.tokenize([p.replace("S*", CLASS_WORD) for p in prompts]),
    )
    with torch.no_grad():  # as tune_concept does: each template's class prompt is encoded once
        batch.class_states = model.encode_text(batch.class_prompt_ids)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        losses = training_step(model, batch, scheduler, LAMBDA_EMB, LAMBDA_WEIGHTS, generator)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()

    return Runner(f"e4t-{kind}", step, common.count(model.trainable_parameters()))


def setup_textual_inversion(base, placement, cfg: Config) -> Runner:
    from contextlib import ExitStack

    from diffusers import DDPMScheduler

    from e4tcli.models.placeholder import PlaceholderEmbedding

    wrappers = []
    for tokenizer, text_encoder in zip(base.tokenizers, base.text_encoders):
        tokenizer.add_tokens(["S*"])
        class_id = tokenizer(CLASS_WORD, add_special_tokens=False).input_ids[0]
        placeholder_id = tokenizer.convert_tokens_to_ids("S*")
        wrappers.append(PlaceholderEmbedding(text_encoder.get_input_embeddings(), placeholder_id, class_id))
        text_encoder.set_input_embeddings(wrappers[-1])
    vector = torch.nn.Parameter(torch.cat([w.weight[w.class_id].detach().float() for w in wrappers]))
    widths = [w.weight.shape[1] for w in wrappers]
    optimizer = torch.optim.AdamW([vector], lr=5e-3, **fastest_adamw(placement))
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    device, b = placement.device, cfg.batch_size
    side = common.resolution_of(cfg.size) // 8
    latents = torch.randn(b, 4, side, side, device=device)
    ids = base.family.tokenize(base.tokenizers, ["a photo of S*"] * b).to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        noise, timesteps, noisy = noisy_inputs(latents, scheduler, generator)
        with placement.autocast:
            with ExitStack() as stack:
                for wrapper, part in zip(wrappers, torch.split(vector, widths)):
                    stack.enter_context(wrapper.using(part[None].expand(b, -1)))
                states = base.family.encode(base.text_encoders, ids)
            conditioning = base.family.unet_conditioning(states, (side * 8, side * 8))
            prediction = base.unet(noisy.to(base.unet.dtype), timesteps, **conditioning).sample
        loss = ((prediction.float() - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner("textual-inversion", step, vector.numel())


def fastest_adamw(placement) -> dict[str, bool]:
    """Every method gets the fastest AdamW torch has for the device, as e4t's tuning does."""
    return {"fused": True} if placement.device.type in ("cpu", "cuda") else {"foreach": True}


def setup_dreambooth(base, placement, cfg: Config) -> Runner:
    from diffusers import DDPMScheduler

    unet = base.unet
    unet.to(torch.float32).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, **fastest_adamw(placement))
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    device, b = placement.device, cfg.batch_size
    side = common.resolution_of(cfg.size) // 8
    latents = torch.randn(b, 4, side, side, device=device)
    ids = base.family.tokenize(base.tokenizers, ["a photo of sks face"] * b).to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        noise, timesteps, noisy = noisy_inputs(latents, scheduler, generator)
        with placement.autocast:
            with torch.no_grad():
                states = base.family.encode(base.text_encoders, ids)
            conditioning = base.family.unet_conditioning(states, (side * 8, side * 8))
            prediction = unet(noisy, timesteps, **conditioning).sample
        loss = ((prediction.float() - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner("dreambooth", step, common.count(unet.parameters()))


def setup(method: str, base, placement, cfg: Config) -> Runner:
    if method.startswith("e4t-"):
        return setup_e4t(base, placement, cfg, method.removeprefix("e4t-"))
    if method == "textual-inversion":
        return setup_textual_inversion(base, placement, cfg)
    return setup_dreambooth(base, placement, cfg)


# --------------------------------------------------------------------------- memory (one method per process)
def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(cfg: Config) -> dict:
    """Memory of one method: resident after its first step, and peak over 2 more steps (MB)."""
    import diffusers  # noqa: F401  (import everything first: imports are not the method's memory)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPVisionModel  # noqa: F401

    import e4tcli.models.e4t  # noqa: F401
    import e4tcli.training.step  # noqa: F401

    common.tokenizer()
    placement = make_placement(cfg.device)
    cuda = placement.device.type == "cuda"
    before = rss_bytes()
    base = common.build_base(cfg.size, placement.device, placement.dtype)
    runner = setup(cfg.probe, base, placement, cfg)
    runner.step()  # the first step allocates the optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    else:
        resident = rss_bytes() - before
        reset_peak_rss()
    for _ in range(2):
        runner.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - before
    return {"resident_mb": resident / 2**20, "peak_mb": peak / 2**20}


def measure_memory(cfg: Config, method: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--size",
        cfg.size,
        "--batch-size",
        str(cfg.batch_size),
        "--probe",
        method,
    ] + (["--device", cfg.device] if cfg.device else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe for {method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing (all methods, interleaved)
def run(cfg: Config) -> tuple[list[dict], float]:
    placement = make_placement(cfg.device)
    device = placement.device
    base = common.build_base(cfg.size, device, placement.dtype)
    flop_ratio = common.text_unet_flop_ratio(base, cfg.size)
    runners = []
    for i, method in enumerate(cfg.methods):
        copy = base if i == len(cfg.methods) - 1 else common.copy_base(base)
        runners.append(setup(method, copy, placement, cfg))
    for runner in runners:
        for _ in range(cfg.warmup):
            runner.step()
    times = {r.method: [] for r in runners}
    for round_ in range(cfg.steps):
        order = runners[round_ % len(runners) :] + runners[: round_ % len(runners)]
        for runner in order:
            common.sync(device)
            start = common.time_ns()
            runner.step()
            common.sync(device)
            times[runner.method].append((common.time_ns() - start) / 1e6)
    reference = times.get("dreambooth")
    rows = []
    for runner in runners:
        ms = times[runner.method]
        ratios = sorted(m / d for m, d in zip(ms, reference)) if reference else None
        rows.append(
            {
                "method": runner.method,
                "ms_per_step": common.median(ms),
                "min_ms": min(ms),
                "x_dreambooth": common.median(ratios) if ratios else None,
                "x_dreambooth_quartiles": quartiles(ratios) if ratios else None,
                "trainable_params": runner.trainable,
            }
        )
    if cfg.memory:
        for row in rows:
            row.update(measure_memory(cfg, row["method"]))
    return rows, flop_ratio


def quartiles(values: list[float]) -> str:
    """The middle half of the per-round ratios, "low-high": how much one round's ratio can be trusted."""
    ordered = sorted(values)
    last = len(ordered) - 1
    return f"{ordered[last // 4]:.2f}-{ordered[(3 * last + 3) // 4]:.2f}"


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=common.SIZES, default="tiny")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (each method steps once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--probe", choices=METHODS, help=argparse.SUPPRESS)
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.apply_common_args(args)
    cfg = Config(
        args.size,
        args.batch_size,
        args.steps,
        args.warmup,
        args.device,
        tuple(args.methods.split(",")),
        not args.no_memory,
        args.json,
        args.probe,
    )
    if cfg.batch_size is None:
        cfg.batch_size = 16 if make_placement(cfg.device).device.type == "cuda" else 4
    return cfg


def main(argv=None) -> None:
    cfg = parse_args(argv)
    json_out = common.reserve_stdout_for_json(cfg.json or bool(cfg.probe))
    torch.manual_seed(0)
    if cfg.probe:
        print(json.dumps(probe(cfg)), file=json_out)
        return
    rows, flop_ratio = run(cfg)
    if cfg.json:
        print(
            json.dumps(
                {"size": cfg.size, "batch_size": cfg.batch_size, "text_unet_flop_ratio": flop_ratio, "rows": rows},
                indent=2,
            ),
            file=json_out,
        )
        return
    placement = make_placement(cfg.device)
    side = common.resolution_of(cfg.size)
    memory = (
        "CUDA memory allocated"
        if placement.device.type == "cuda"
        else "process RSS minus RSS after imports (VmHWM for the peak)"
    )
    print(
        f"tune step: size={cfg.size} {side}px batch={cfg.batch_size} "
        f"device={common.describe_device(placement.device)} "
        f"frozen dtype={str(placement.dtype).removeprefix('torch.')} rounds={cfg.steps} (median)"
    )
    print(f"resident_mb / peak_mb = {memory}, after 1 step / over 2 more steps; fresh process per method")
    print(f"text-encoder/UNet forward FLOPs = {flop_ratio:.3f} (SD 1.5: 0.017; higher inflates e4t and TI)")
    common.print_table(rows)
    e4t = next((r for r in rows if r["method"] == "e4t-paper"), None)
    if e4t and e4t["x_dreambooth"] is not None:
        verdict = "OK" if e4t["x_dreambooth"] <= 1.3 else "MISSED"
        spread = e4t["x_dreambooth_quartiles"]
        print(f"target e4t-paper <= 1.3x dreambooth: {e4t['x_dreambooth']:.2f}x (quartiles {spread}) {verdict}")


if __name__ == "__main__":
    main()
